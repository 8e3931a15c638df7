"""The RFC 5322 message and the envelope for a :class:`~relay.webapi.request.SendRequest`.

The standard library's ``email`` package builds it (``EmailMessage``, the SMTP policy: CRLF,
the MIME tree, RFC 2231 for non-ASCII attachment names); bodies are 7-bit (quoted-printable
or base64, whichever is shorter), names and subjects RFC 2047 encoded words, so the message
needs neither 8BITMIME nor SMTPUTF8 anywhere on its way. Attachments are base64-encoded
straight into the output (placeholders in the tree, replaced after generation), so a 5 MB
file costs about one copy of the message, not the six the ``email`` package would hold.

Header order: From, To, Cc, Reply-To, Subject, Date, Message-ID, Disposition-Notification-To,
the client's ``headers`` in their order, the MIME headers, and X-SMTPAPI last, on one line.
Free-text values (From's name, Subject, the client's headers, X-SMTPAPI) are folded here and
handed to the ``email`` package raw (``set_raw``; its policy never refolds them), because its
own folding breaks three things: it turns a long word into encoded words (a List-Unsubscribe
URL breaks, ``SC-Custom-*`` values SendCloud returns change), it loses a space at each fold
between encoded words (a long Chinese subject with spaces), and it folds X-SMTPAPI, which
SendCloud then drops. ASCII is folded only at its own blanks; non-ASCII becomes RFC 2047
encoded words (:func:`encoded_words`). Bcc never appears in the headers, only in the envelope.

xsmtpapi ``to`` and separate copies: SendCloud sends each address of X-SMTPAPI ``to``
separately (``sources/email_v2/send_email.md``, note 4), and the relay's delivery already
rewrites X-SMTPAPI ``to`` (with ``sub``) to each upstream transaction's own recipients
(``relay.rewrite.xsmtpapi.for_transaction``). So the caller spools ONE message, ``build_message``
with ``envelope``: one queue ID, one emailId per ``to`` address. Its To header is
``undisclosed-recipients:;`` (with a single address, that address), so even an upstream that
ignores X-SMTPAPI (``kind: smtp``) shows no recipient the others. A caller that wants each
copy to name its recipient in To instead spools :func:`per_recipient_copies`.
"""

from __future__ import annotations

import base64
import dataclasses
import email.policy
import email.utils
import io
import json
import re
import uuid
from datetime import UTC, datetime
from email.generator import BytesGenerator
from email.headerregistry import Address, Group
from email.message import EmailMessage

from relay.webapi.request import SendRequest

XSMTPAPI_HEADER = "X-SMTPAPI"
UNDISCLOSED = Group("undisclosed-recipients")

# SMTP's CRLF; bodies 7-bit so no hop needs 8BITMIME; values given with set_raw are written
# as given (this module folds them), header objects (addresses, Date, MIME) fold themselves.
_POLICY = email.policy.SMTP.clone(cte_type="7bit", refold_source="none")


def envelope(request: SendRequest) -> tuple[str, list[str]]:
    """(MAIL FROM, RCPT TO list): to, cc, bcc in that order, or xsmtpapi ``to``; no repeats."""
    return request.sender, list(request.recipients)


def per_recipient_copies(request: SendRequest) -> list[SendRequest]:
    """One request per xsmtpapi ``to`` address (its ``sub`` values follow it); else ``[request]``.

    Each copy's X-SMTPAPI ``to`` and To header name its one recipient. The copies are
    separate messages with separate queue IDs: the answer's ``emailIdList`` is then
    ``email_ids(queue_id_of_copy, [recipient])`` of each, in ``to`` order.
    """
    to = request.xsmtpapi_to
    if not to:
        return [request]
    copies = []
    for index, address in enumerate(to):
        xsmtpapi = dict(request.xsmtpapi, to=[address])
        if "sub" in xsmtpapi:
            xsmtpapi["sub"] = {name: [values[index]] for name, values in xsmtpapi["sub"].items()}
        copies.append(dataclasses.replace(request, xsmtpapi=xsmtpapi))
    return copies


def xsmtpapi_value(data: dict) -> bytes:
    """Base64 of the compact UTF-8 JSON, as SendCloud reads it (and ``relay.rewrite.xsmtpapi`` writes it)."""
    return base64.b64encode(json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def _mailboxes(addresses: tuple[str, ...]) -> tuple[Address, ...]:
    return tuple(Address(addr_spec=address) for address in addresses)


def encoded_words(text: str, first_line_used: int = 0) -> str:
    """``text`` as RFC 2047 base64 UTF-8 encoded words, folded (``\\r\\n ``) between words.

    Each word carries whole characters and at most 45 bytes (a 72-character word), the first
    fewer when the line already holds ``first_line_used`` characters. Blanks are encoded inside
    the words, since a decoder drops the whitespace between two encoded words: the text comes
    back exactly. (The ``email`` package folds a long value with blanks between its encoded
    words, and so loses one space at each fold: not used for these values.)
    """
    words, chunk, room = [], b"", max(6, min(45, (78 - first_line_used - 12) // 4 * 3))
    for char in text:
        encoded = char.encode("utf-8")
        if len(chunk) + len(encoded) > room:
            words.append(chunk)
            chunk, room = b"", 45
        chunk += encoded
    words.append(chunk)
    return "\r\n ".join(f"=?utf-8?b?{base64.b64encode(word).decode('ascii')}?=" for word in words)


def _fold_ascii(name: str, value: str) -> str:
    """``value`` folded before its own blanks to 78 columns where it can: it unfolds to itself."""
    pieces = re.split(r"(?=[ \t])", value)  # each piece after the first starts with a blank
    lines, current = [], pieces[0]
    used = len(name) + 2
    for piece in pieces[1:]:
        if used + len(current) + len(piece) > 78 and current.strip():
            lines.append(current)
            current, used = piece, 0
        else:
            current += piece
    lines.append(current)
    return "\r\n".join(lines)


def unstructured(name: str, value: str) -> str:
    """A header value as it is written: ASCII folded at its blanks, else encoded words.

    ASCII with a word too long for a 998-character line is written as encoded words too.
    """
    if value.isascii() and len(name) + 2 + max(map(len, re.split(r"[ \t]", value))) <= 998:
        return _fold_ascii(name, value)
    return encoded_words(value, len(name) + 2)


def _from(request: SendRequest) -> str:
    if not request.from_name:
        return request.sender
    if request.from_name.isascii():
        value = email.utils.formataddr((request.from_name, request.sender))  # quotes specials
        if len("From: ") + len(value) <= 78:
            return value
    return f"{encoded_words(request.from_name, len('From: '))} <{request.sender}>"


def _headers(message: EmailMessage, request: SendRequest, message_id_domain: str, now: float) -> None:
    """Everything but the MIME headers and X-SMTPAPI. Values with free text are written raw
    (``set_raw``, never refolded by this policy); address lists go through the ``email`` package."""
    message.set_raw("From", _from(request))
    listed = request.xsmtpapi_to
    if len(listed) == 1:
        message["To"] = _mailboxes(listed)
    elif listed:
        message["To"] = UNDISCLOSED
    else:
        message["To"] = _mailboxes(request.to)
        if request.cc:
            message["Cc"] = _mailboxes(request.cc)
    if request.reply_to:
        message["Reply-To"] = Address(addr_spec=request.reply_to)
    message.set_raw("Subject", unstructured("Subject", request.subject))
    message["Date"] = datetime.fromtimestamp(now, UTC)
    client_id = next((value for name, value in request.headers if name.lower() == "message-id"), None)
    message.set_raw("Message-ID", client_id or email.utils.make_msgid(domain=message_id_domain))
    if request.disposition_notification_to:
        message.set_raw("Disposition-Notification-To", request.disposition_notification_to)
    for name, value in request.headers:
        if name.lower() != "message-id":
            message.set_raw(name, unstructured(name, value))


def _body(message: EmailMessage, request: SendRequest, marker: str) -> list[bytes]:
    """Text parts and attachment parts; each attachment's payload is a placeholder token.

    The ``email`` package would hold an attachment base64-encoded as a str, split it into
    lines and copy it again into its output: about six copies of a 5 MB file at once. The
    tokens are replaced by the encoded data, streamed into the output (see :func:`_splice`).
    """
    if request.plain is not None:
        message.set_content(request.plain)
        if request.html is not None:
            message.add_alternative(request.html, subtype="html")
    else:
        message.set_content(request.html, subtype="html")
    tokens = []
    for index, attachment in enumerate(request.attachments):
        maintype, _, subtype = attachment.content_type.partition("/")
        message.add_attachment(b"", maintype=maintype, subtype=subtype, filename=attachment.filename, cte="base64")
        token = f"{marker}{index}."
        message.get_payload()[-1].set_payload(token)
        tokens.append(token.encode("ascii"))
    for part in message.walk():
        if part is not message:
            del part["MIME-Version"]  # the email package stamps every part it creates; RFC 2045: top level only
    return tokens


_CHUNK = 57 * 1024  # 57 bytes make one 76-character base64 line


def _write_base64(out: io.BytesIO, data: bytes) -> None:
    view = memoryview(data)
    out.writelines(
        base64.encodebytes(view[start:start + _CHUNK]).replace(b"\n", b"\r\n") for start in range(0, len(view), _CHUNK)
    )


def _splice(skeleton: bytes, tokens: list[bytes], request: SendRequest) -> bytes:
    """The skeleton with each token replaced by its attachment as CRLF base64 lines."""
    out = io.BytesIO()
    view = memoryview(skeleton)
    position = 0
    for token, attachment in zip(tokens, request.attachments):
        at = skeleton.index(token, position)
        out.write(view[position:at])
        _write_base64(out, attachment.data)
        position = at + len(token)
        if attachment.data and skeleton.startswith(b"\r\n", position):
            position += 2  # the encoded lines end with their own CRLF; an empty body keeps the delimiter's
    out.write(view[position:])
    return out.getvalue()


def build_message(request: SendRequest, message_id_domain: str, now: float) -> bytes:
    """The message as CRLF bytes, X-SMTPAPI (when ``xsmtpapi`` is not empty) the last header.

    Text bodies are in MIME's canonical form: line ends CRLF, a final line end added.
    """
    message = EmailMessage(policy=_POLICY)
    _headers(message, request, message_id_domain, now)
    marker = f"RELAY-ATTACHMENT-{uuid.uuid4().hex}-"  # never in the encoded text parts
    tokens = _body(message, request, marker)
    if request.xsmtpapi:  # an empty object says nothing: no header, as relay.rewrite.xsmtpapi.apply writes none
        # last, after the MIME headers the body added; written as one line however long
        message.set_raw(XSMTPAPI_HEADER, xsmtpapi_value(dict(request.xsmtpapi)).decode("ascii"))
    buffer = io.BytesIO()
    BytesGenerator(buffer, policy=_POLICY).flatten(message)
    skeleton = buffer.getvalue()
    return _splice(skeleton, tokens, request) if tokens else skeleton
