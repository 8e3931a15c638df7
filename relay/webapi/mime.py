"""The RFC 5322 message and the envelope for a :class:`~relay.webapi.request.SendRequest`.

The standard library's ``email`` package builds it (``EmailMessage``, the SMTP policy: CRLF,
RFC 2047 encoded words for UTF-8 names and subjects, RFC 2231 for non-ASCII attachment
names); bodies are 7-bit (quoted-printable or base64, whichever is shorter), so the message
needs neither 8BITMIME nor SMTPUTF8 anywhere on its way.

Header order: From, To, Cc, Reply-To, Subject, Date, Message-ID, Disposition-Notification-To,
the client's ``headers`` in their order, the MIME headers, and X-SMTPAPI last, on one line,
written into the bytes after generation (the ``email`` package would fold it; SendCloud drops
a folded or not-last X-SMTPAPI). Bcc never appears in the headers, only in the envelope.

xsmtpapi ``to`` and separate copies: SendCloud sends each address of X-SMTPAPI ``to``
separately (``sources/email_v2/send_email.md``, note 4), and the relay's delivery already
rewrites X-SMTPAPI ``to`` (with ``sub``) to each upstream transaction's own recipients
(``relay.xsmtpapi.for_transaction``). So the caller spools ONE message, ``build_message``
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
import uuid
from datetime import datetime, timezone
from email.generator import BytesGenerator
from email.headerregistry import Address, Group
from email.message import EmailMessage

from relay.webapi.request import SendRequest

XSMTPAPI_HEADER = b"X-SMTPAPI"
UNDISCLOSED = Group("undisclosed-recipients")

# SMTP's CRLF and 78-column folding; bodies 7-bit so no hop needs 8BITMIME.
_POLICY = email.policy.SMTP.clone(cte_type="7bit")


def envelope(request: SendRequest) -> tuple[str, list[str]]:
    """(MAIL FROM, RCPT TO list): to, cc, bcc in that order, or xsmtpapi ``to``; no repeats."""
    return request.sender, list(request.recipients)


def per_recipient_copies(request: SendRequest) -> list[SendRequest]:
    """One request per xsmtpapi ``to`` address (its ``sub`` values follow it); else ``[request]``.

    Each copy's X-SMTPAPI ``to`` and To header name its one recipient. The copies are
    separate messages (separate queue IDs): the caller answers with the emailIds of all.
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
    """Base64 of the compact UTF-8 JSON, as SendCloud reads it (and ``relay.xsmtpapi`` writes it)."""
    return base64.b64encode(json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def _mailboxes(addresses: tuple[str, ...]) -> tuple[Address, ...]:
    return tuple(Address(addr_spec=address) for address in addresses)


def _headers(message: EmailMessage, request: SendRequest, message_id_domain: str, now: float) -> None:
    message["From"] = Address(display_name=request.from_name or "", addr_spec=request.sender)
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
    message["Subject"] = request.subject
    message["Date"] = datetime.fromtimestamp(now, timezone.utc)
    if not any(name.lower() == "message-id" for name, _ in request.headers):
        message["Message-ID"] = email.utils.make_msgid(domain=message_id_domain)
    if request.disposition_notification_to:
        message["Disposition-Notification-To"] = request.disposition_notification_to
    for name, value in request.headers:
        message[name] = value


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
    for start in range(0, len(view), _CHUNK):
        out.write(base64.encodebytes(view[start:start + _CHUNK]).replace(b"\n", b"\r\n"))


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


def _insert_last_header(data: bytes, line: bytes) -> bytes:
    """``data`` with ``line`` (CRLF-terminated) added after its last header, unfolded."""
    end = data.index(b"\r\n\r\n") + 2  # the generator always writes the blank line
    return b"".join((data[:end], line, data[end:]))


def build_message(request: SendRequest, message_id_domain: str, now: float) -> bytes:
    """The message as CRLF bytes, X-SMTPAPI (when ``xsmtpapi`` is not empty) the last header.

    Text bodies are in MIME's canonical form: line ends CRLF, a final line end added.
    """
    message = EmailMessage(policy=_POLICY)
    _headers(message, request, message_id_domain, now)
    marker = f"RELAY-ATTACHMENT-{uuid.uuid4().hex}-"  # never in the encoded text parts
    tokens = _body(message, request, marker)
    buffer = io.BytesIO()
    BytesGenerator(buffer, policy=_POLICY).flatten(message)
    skeleton = buffer.getvalue()
    if request.xsmtpapi:  # an empty object says nothing: no header, as relay.xsmtpapi.apply writes none
        line = XSMTPAPI_HEADER + b": " + xsmtpapi_value(dict(request.xsmtpapi)) + b"\r\n"
        skeleton = _insert_last_header(skeleton, line)
    return _splice(skeleton, tokens, request) if tokens else skeleton
