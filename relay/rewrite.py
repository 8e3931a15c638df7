"""Changes made to a message's bytes before it is spooled (Postfix's ``cleanup``)."""

from __future__ import annotations

import email.policy
import re
from collections.abc import Callable
from email.parser import BytesHeaderParser

_LONE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def normalise_line_endings(data: bytes) -> bytes:
    """Turn every bare CR and bare LF into CRLF.

    Legacy applications send bare LF; passed on unchanged, a ``\\n.\\n`` could end the DATA of
    a lenient upstream early and smuggle a second message. Normalised, it becomes an ordinary
    line that the upstream client dot-stuffs, so one DATA stays exactly one message.
    """
    if b"\r" not in data:
        return data.replace(b"\n", b"\r\n")
    return _LONE_CR_OR_LF.sub(b"\r\n", data)


def header_block(data: bytes) -> bytes:
    """The header section of a message (up to the first empty line)."""
    if data.startswith(b"\r\n"):
        return b""
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[: end + 2]


def header_reader(data: bytes) -> Callable[[str], str | None]:
    """A ``header(name)`` lookup that parses the header block only if something asks."""
    parsed = None

    def header(name: str) -> str | None:
        nonlocal parsed
        if parsed is None:
            parsed = BytesHeaderParser(policy=email.policy.default).parsebytes(header_block(data))
        value = parsed.get(name)
        return None if value is None else str(value)

    return header
