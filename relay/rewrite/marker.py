"""The advertising marker on the Subject ("(AD)" before or after it), added exactly once."""

from __future__ import annotations

from email.header import Header

from relay.rewrite.fields import Field, Message, make_field


def add_marker(message: Message, position: str, text: str) -> None:
    """Put ``text`` before (``prefix``) or after (``suffix``) the Subject unless it is already there.

    The check reads the decoded subject, so an RFC 2047-encoded one that already carries the
    marker is left alone. The marker is inserted next to the existing bytes rather than the
    whole subject being re-encoded: encoded words stay as they were, and a space separates
    the marker from them, so decoders show ``(AD) 主题``. No line grows past 998 characters:
    the marker goes on a folded line of its own instead.
    """
    field = message.first("Subject")
    if field is None:
        message.fields.append(make_field("Subject", text))
        return
    subject = field.text().strip()
    if (subject.startswith(text) if position == "prefix" else subject.endswith(text)):
        return
    name = field.raw.split(b":", 1)[0]
    value = field.raw_value.strip(b" \t")
    lines = value.split(b"\r\n")
    if position == "prefix":
        marker = _encoded(text) + b" "
        fold = len(name) + 2 + len(marker) + len(lines[0]) > _MAX_LINE
        value = marker.rstrip(b" ") + b"\r\n " + value if fold else marker + value
    else:
        marker = b" " + _encoded(text)
        fold = len(lines[-1]) + len(marker) + (len(name) + 2 if len(lines) == 1 else 0) > _MAX_LINE
        value = value + b"\r\n" + marker if fold else value + marker
    message.replace(field, Field(name + b": " + value + b"\r\n"))


_MAX_LINE = 998  # RFC 5322 2.1.1, without the CRLF: a marker never makes a line longer


def _encoded(text: str) -> bytes:
    """ASCII as is; anything else as an encoded word (a CJK marker next to an encoded subject
    then reads without a space between, as such markers are usually written anyway)."""
    return text.encode("ascii") if text.isascii() else Header(text, "utf-8").encode().encode("ascii")
