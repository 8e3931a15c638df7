"""A SendCloud ``apiv2/mail/send`` form, checked and turned into a frozen :class:`SendRequest`.

Parameter names and meanings follow SendCloud's own documentation
(``sendcloud2013/sendcloud_docs``, ``sources/email_v2/send_email.md``); where the relay must
differ, it refuses with a clear message rather than send something the client did not mean:

- ``to``, ``cc``, ``bcc``: ``;``-separated (SendCloud's separator; a ``,`` is not one), empty
  items skipped, at most 100 each; an address may be bare, ``<addr>`` or ``Name <addr>`` (the
  name is dropped). Envelope addresses are ASCII only: the upstream hop has no SMTPUTF8.
- ``xsmtpapi`` (a JSON object, not base64) with ``to``: those are the recipients and ``to``,
  ``cc``, ``bcc`` are ignored, unchecked, as SendCloud ignores them (its note 4).
- ``from`` may carry a display name (``爱发信支持<support@ifaxin.com>``); it becomes the
  ``fromName`` when ``fromName`` is empty (SendCloud's note 1).
- ``html`` and ``plain``: at least one (note 6); both make a multipart/alternative.
- Refused: ``useAddressList=true`` (address lists live at SendCloud), ``gzipCompress=true``,
  ``templateInvokeName`` (no templates through the relay), a parameter given twice.
- Honoured: ``useNotification=true`` (a read receipt to the ``from`` address, note 8) and the
  older ``dispositionNotificationTo`` (a receipt address; it wins when both are given).
- Other parameters (the calendar ones, unknown ones) are ignored, as an HTTP API does.
- ``headers`` (a JSON object of names to string values, one line each; ``SC-Custom-*`` come
  back in webhook events, note 9): surrounding blanks trimmed; an ASCII value is written as
  given (folded only at its own spaces), so a word in it must fit a 998-character line; a
  non-ASCII value becomes RFC 2047 encoded words. They may not set: what a parameter sets (From, To, Cc, Bcc,
  Subject, Reply-To, Disposition-Notification-To, X-SMTPAPI: use the parameter); what the
  relay owns (Sender, Date, Received, Return-Path, DKIM-Signature, Content-Length, Resent-*,
  SC-Custom-Relay-*); the MIME structure (MIME-Version, Content-Type,
  Content-Transfer-Encoding, Content-Disposition, Content-ID). ``Message-ID`` may be set
  (``<id@domain>``; applications thread with it) and replaces the relay's.
- ``attachments``: the file's own name (no path), a ``type/subtype`` content type without
  parameters; an unusable one, ``multipart/*`` or ``message/*`` becomes
  application/octet-stream (every attachment is carried as base64). No per-file limit:
  the whole message is bounded by ``max_message_size`` (413, decided by the caller).

Every error is a :class:`RequestError` with the HTTP status: 401 when ``apiUser`` or
``apiKey`` is missing (checked first), 400 for everything else. Whether the key is right, the
sender allowed or the size acceptable is decided by the caller, not here.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from relay.rewrite.xsmtpapi import check as check_xsmtpapi

MAX_PER_FIELD = 100  # SendCloud: to, cc, bcc and xsmtpapi "to" each at most 100 (note 5)
MAX_XSMTPAPI = 1_000_000  # SendCloud's limit for the X-SMTPAPI header, as base64
DEFAULT_CONTENT_TYPE = "application/octet-stream"
MAX_LINE = 998  # RFC 5322's limit for a header line, without its CRLF

# Headers the client may not set through ``headers``, with the reason it is told.
_PARAMETER_HEADERS = {
    "from": "from/fromName", "to": "to", "cc": "cc", "bcc": "bcc", "subject": "subject",
    "reply-to": "replyTo", "disposition-notification-to": "useNotification", "x-smtpapi": "xsmtpapi",
}
_RELAY_HEADERS = frozenset({
    "sender", "date", "orig-date", "received", "return-path", "dkim-signature", "content-length",
})
_STRUCTURAL_HEADERS = frozenset({
    "mime-version", "content-type", "content-transfer-encoding", "content-disposition", "content-id",
})
_RELAY_PREFIXES = ("sc-custom-relay-", "resent-")

_HEADER_NAME = re.compile(r"^[!-9;-~]+$")
_ATEXT = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+$")
_DOMAIN_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_MESSAGE_ID = re.compile(r"^<[!-;=?-~]+@[!-;=?-~]+>$")
_TOKEN = r"[a-z0-9!#$&^_.+-]+"
_CONTENT_TYPE = re.compile(rf"^{_TOKEN}/{_TOKEN}$")


class RequestError(Exception):
    """A request the relay will not take: ``status`` is the HTTP status of the JSON answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    data: bytes = field(repr=False)


@dataclass(frozen=True, kw_only=True)
class SendRequest:
    """A checked request. ``to``/``cc``/``bcc`` are empty when ``xsmtpapi`` has ``to``.

    ``headers`` keep the client's order and spelling; ``xsmtpapi`` is the client's object with
    its ``to`` addresses trimmed (treat it as read-only). ``api_key`` never appears in a repr.
    """

    api_user: str
    api_key: str = field(repr=False)
    sender: str
    from_name: str | None = None
    to: tuple[str, ...] = ()
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    subject: str
    html: str | None = None
    plain: str | None = None
    reply_to: str | None = None
    label_id: int | None = None
    headers: tuple[tuple[str, str], ...] = ()
    xsmtpapi: Mapping | None = None
    resp_email_id: bool = True
    disposition_notification_to: str | None = None
    attachments: tuple[Attachment, ...] = ()

    @property
    def xsmtpapi_to(self) -> tuple[str, ...]:
        """The recipients named by ``xsmtpapi``'s ``to``; empty when it names none."""
        if self.xsmtpapi is None:
            return ()
        return tuple(self.xsmtpapi.get("to") or ())

    @property
    def recipients(self) -> tuple[str, ...]:
        """The envelope recipients: xsmtpapi ``to``, else to, cc, bcc with repeats dropped.

        An address in both ``to`` and ``bcc`` gets one copy (the first place it appears
        counts); repeats compare case-insensitively, as the relay's X-SMTPAPI checks do.
        """
        listed = self.xsmtpapi_to or (*self.to, *self.cc, *self.bcc)
        seen: set[str] = set()
        unique = []
        for address in listed:
            if address.lower() not in seen:
                seen.add(address.lower())
                unique.append(address)
        return tuple(unique)


def _bad(message: str) -> RequestError:
    return RequestError(400, message)


def _text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise _bad(f"{name} must be text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(f"{name} is not UTF-8 text") from None
    if "\x00" in value:
        raise _bad(f"{name} contains a NUL character")
    return value


def _one(fields: Mapping[str, list[str]], name: str) -> str | None:
    """The parameter's value, or ``None`` when it is absent or empty (SendCloud treats both alike)."""
    values = fields.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise _bad(f"{name} is given {len(values)} times; give it once")
    value = _text(name, values[0])
    return value if value.strip() else None


def _line(fields: Mapping[str, list[str]], name: str) -> str | None:
    """A value that becomes (part of) a header: one line."""
    value = _one(fields, name)
    if value is not None and ("\r" in value or "\n" in value):
        raise _bad(f"{name} must be one line")
    return value


def _bool(fields: Mapping[str, list[str]], name: str, default: bool) -> bool:
    value = _one(fields, name)
    if value is None:
        return default
    word = value.strip().lower()
    if word not in ("true", "false"):
        raise _bad(f"{name} must be true or false")
    return word == "true"


def check_address(name: str, address: str) -> str:
    """A bare ASCII mailbox ``local@domain.tld`` (dot-atom local part), else 400 naming the field."""
    local, at, domain = address.rpartition("@")
    if not address.isascii():
        raise _bad(f"{name}: <{address}> is not ASCII; the relay sends without SMTPUTF8")
    if "," in address:
        raise _bad(f"{name}: <{address}> is not one address; separate addresses with ';'")
    valid = (
        at and 0 < len(local) <= 64 and len(address) <= 254
        and _ATEXT.match(local) and not local.startswith(".") and not local.endswith(".") and ".." not in local
        and "." in domain.strip(".") and all(_DOMAIN_LABEL.match(label) for label in domain.split("."))
    )
    if not valid:
        raise _bad(f"{name}: <{address}> is not a valid email address")
    return address


def split_mailbox(name: str, text: str) -> tuple[str | None, str]:
    """``addr``, ``<addr>`` or ``Display Name <addr>`` → (display name or None, checked address)."""
    text = text.strip()
    display = None
    if text.endswith(">") and "<" in text:
        start = text.rindex("<")
        display = text[:start].strip()
        if len(display) >= 2 and display[0] == display[-1] == '"':
            display = display[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        text = text[start + 1:-1].strip()
    return display or None, check_address(name, text)


def _address_list(fields: Mapping[str, list[str]], name: str) -> tuple[str, ...]:
    value = _line(fields, name)
    if value is None:
        return ()
    items = [item for item in value.split(";") if item.strip()]
    if len(items) > MAX_PER_FIELD:
        raise _bad(f"{name} lists {len(items)} addresses; at most {MAX_PER_FIELD} are allowed")
    return tuple(split_mailbox(name, item)[1] for item in items)


def _label(fields: Mapping[str, list[str]]) -> int | None:
    value = _one(fields, "labelId")
    if value is None:
        return None
    value = value.strip()
    if not value.isascii() or not value.isdigit() or len(value) > 10 or int(value) == 0:
        raise _bad("labelId must be a positive integer (a SendCloud label ID)")
    return int(value)


def _headers(fields: Mapping[str, list[str]]) -> tuple[tuple[str, str], ...]:
    value = _one(fields, "headers")
    if value is None:
        return ()
    try:
        data = json.loads(value)
    except ValueError:
        raise _bad("headers is not valid JSON") from None
    if not isinstance(data, dict):
        raise _bad("headers must be a JSON object of header names to text values")
    seen: set[str] = set()
    headers = []
    for name, text in data.items():
        key = name.lower()
        if not _HEADER_NAME.match(name):
            raise _bad(f"headers: {name!r} is not a header name")
        if key in seen:
            raise _bad(f"headers: {name} is given twice")
        seen.add(key)
        if key in _PARAMETER_HEADERS:
            raise _bad(f"headers: {name} is set by the {_PARAMETER_HEADERS[key]} parameter, not by headers")
        if key in _RELAY_HEADERS or key.startswith(_RELAY_PREFIXES):
            raise _bad(f"headers: {name} is set by the relay")
        if key in _STRUCTURAL_HEADERS:
            raise _bad(f"headers: {name} is part of the MIME structure the relay builds")
        if not isinstance(text, str):
            raise _bad(f"headers: the value of {name} must be a string")
        _text(f"headers: {name}", text)
        if "\r" in text or "\n" in text:
            raise _bad(f"headers: the value of {name} must be one line")
        if any(char < " " and char != "\t" or char == "\x7f" for char in text):
            raise _bad(f"headers: the value of {name} contains a control character")
        text = text.strip(" \t")  # unfolding drops them anyway; a folded line must not be blank
        if text.isascii() and len(name) + 2 + max(map(len, re.split(r"[ \t]", text))) > MAX_LINE:
            # written as is (encoded words would change what SendCloud returns in userHeaders)
            raise _bad(f"headers: the value of {name} has a word too long for a {MAX_LINE}-character header line")
        if key == "message-id" and not _MESSAGE_ID.match(text):
            raise _bad("headers: Message-ID must look like <id@domain>")
        headers.append((name, text))
    return tuple(headers)


def _xsmtpapi(fields: Mapping[str, list[str]]) -> dict | None:
    value = _one(fields, "xsmtpapi")
    if value is None:
        return None
    try:
        data = json.loads(value)
    except ValueError:
        raise _bad("xsmtpapi is not valid JSON") from None
    if not isinstance(data, dict):
        raise _bad("xsmtpapi must be a JSON object")
    check_xsmtpapi(data, lambda why: _bad(f"xsmtpapi: {why}"))
    to = data.get("to")
    if to is not None:
        to = [check_address("xsmtpapi to", item.strip()) for item in to]
        lowered = [address.lower() for address in to]
        repeated = next((address for index, address in enumerate(to) if lowered.index(address.lower()) != index), None)
        if repeated is not None:
            # "sub" values are positional: a repeat cannot be dropped without guessing which one.
            raise _bad(f'xsmtpapi: "to" lists <{repeated}> twice')
        data = {**data, "to": to}
    for key in ("section", "settings"):
        if key in data and not isinstance(data[key], dict):
            raise _bad(f'xsmtpapi: "{key}" must be an object')
    encoded = base64.b64encode(json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    if len(encoded) > MAX_XSMTPAPI:
        raise _bad(f"xsmtpapi is larger than SendCloud's {MAX_XSMTPAPI} bytes once encoded")
    return data


def _attachment(item: Attachment) -> Attachment:
    """Keep only the file's own name, and a content type the MIME builder can carry as base64."""
    if not isinstance(item, Attachment) or not isinstance(item.data, (bytes, bytearray)):
        raise _bad("attachments must be uploaded files")
    name = re.split(r"[/\\]", _text("attachment filename", item.filename or ""))[-1]
    name = "".join(char for char in name if char >= " " and char != "\x7f").strip() or "attachment"
    content_type = (item.content_type or "").split(";")[0].strip().lower()
    if not _CONTENT_TYPE.match(content_type) or content_type.startswith(("multipart/", "message/")):
        content_type = DEFAULT_CONTENT_TYPE
    return dataclasses.replace(item, filename=name, content_type=content_type, data=bytes(item.data))


def parse_send_request(fields: Mapping[str, list[str]], files: list[Attachment], max_recipients: int) -> SendRequest:
    """The checked request, or :class:`RequestError` (401 without credentials, else 400).

    ``fields`` are the decoded form fields (each name to its values, as aiohttp's
    ``MultiDict`` gives them), ``files`` the uploaded ``attachments``; ``max_recipients`` is
    ``server.max_recipients`` and bounds the envelope.
    """
    api_user = _line(fields, "apiUser")
    api_key = _line(fields, "apiKey")
    if api_user is None or api_key is None:
        raise RequestError(401, "apiUser and apiKey are required")

    if _bool(fields, "useAddressList", False):
        raise _bad("useAddressList is not available through the relay: address lists live at SendCloud")
    if _bool(fields, "gzipCompress", False):
        raise _bad("gzipCompress is not supported by the relay; send html and plain uncompressed")
    if _one(fields, "templateInvokeName") is not None:
        raise _bad("templates are not available through the relay; send html or plain")

    raw_from = _line(fields, "from")
    if raw_from is None:
        raise _bad("from is required")
    display, sender = split_mailbox("from", raw_from)
    from_name = _line(fields, "fromName") or display

    subject = _line(fields, "subject")
    if subject is None:
        raise _bad("subject is required")
    html = _one(fields, "html")
    plain = _one(fields, "plain")
    if html is None and plain is None:
        raise _bad("html and plain cannot both be empty")

    reply_to = _line(fields, "replyTo")
    if reply_to is not None:
        reply_to = split_mailbox("replyTo", reply_to)[1]
    receipt = _line(fields, "dispositionNotificationTo")
    if receipt is not None:
        receipt = split_mailbox("dispositionNotificationTo", receipt)[1]
    elif _bool(fields, "useNotification", False):
        receipt = sender

    xsmtpapi = _xsmtpapi(fields)
    if xsmtpapi is not None and "to" in xsmtpapi:
        to = cc = bcc = ()  # SendCloud: with xsmtpapi "to", the to, cc and bcc parameters are ignored
    else:
        to, cc, bcc = (_address_list(fields, name) for name in ("to", "cc", "bcc"))
        if not to:
            raise _bad("to is required (or xsmtpapi with \"to\")")

    request = SendRequest(
        api_user=api_user.strip(), api_key=api_key, sender=sender, from_name=from_name,
        to=to, cc=cc, bcc=bcc, subject=subject, html=html, plain=plain, reply_to=reply_to,
        label_id=_label(fields), headers=_headers(fields), xsmtpapi=xsmtpapi,
        resp_email_id=_bool(fields, "respEmailId", True), disposition_notification_to=receipt,
        attachments=tuple(_attachment(item) for item in files),
    )
    if len(request.recipients) > max_recipients:
        raise _bad(f"{len(request.recipients)} recipients; at most {max_recipients} per request")
    return request
