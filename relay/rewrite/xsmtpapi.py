"""SendCloud's X-SMTPAPI header: base64 of a JSON object, the last header, never folded.

SendCloud accepts a broken X-SMTPAPI at SMTP time and drops the mail later, and its ``to``
replaces the envelope recipients. So a client's header is checked at DATA (refused with a
clear 5xx rather than forwarded to be dropped), its ``to`` may only name the envelope's own
recipients, and tracking options from the relay's rules are merged into it.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence

from relay.config import Tracking
from relay.errors import SMTPReply
from relay.rewrite.fields import Message, raw_field

HEADER = "X-SMTPAPI"
_NAME = HEADER.lower().encode()
MAX_SIZE = 1_000_000  # SendCloud's limit for the header
MAX_TO = 100
KEYS = frozenset({"to", "sub", "section", "filters", "settings"})
_FILTERS = {"open": "open_tracking", "click": "click_tracking", "unsubscribe": "subscription_tracking"}


def _invalid(why: str) -> SMTPReply:
    return SMTPReply(550, "5.6.0", f"Invalid X-SMTPAPI header: {why}")


def decode(value: bytes) -> dict:
    """The JSON object in a header value (folding whitespace allowed); SMTPReply if it is not one."""
    compact = b"".join(value.split())
    if len(compact) > MAX_SIZE:
        raise _invalid(f"larger than SendCloud's {MAX_SIZE} bytes")
    try:
        data = json.loads(base64.b64decode(compact, validate=True).decode("utf-8"))
    except (binascii.Error, ValueError):
        raise _invalid("not base64 of a UTF-8 JSON object") from None
    return check(data, _invalid)


def check(data: object, invalid: Callable[[str], Exception]) -> dict:
    """``data`` is an X-SMTPAPI object as SendCloud reads it; else ``invalid(why)`` is raised.

    Shared by the SMTP side (a client's header) and HTTP submission (the ``xsmtpapi``
    parameter), each with its own kind of refusal.
    """
    if not isinstance(data, dict):
        raise invalid("not a JSON object")
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise invalid(f"unknown key {unknown[0]!r} (SendCloud knows {', '.join(sorted(KEYS))})")
    to = data.get("to")
    if to is not None:
        if not isinstance(to, list) or not all(isinstance(item, str) for item in to) or not to:
            raise invalid('"to" must be a non-empty list of addresses')
        if len(to) > MAX_TO:
            raise invalid(f'"to" lists {len(to)} addresses; SendCloud allows {MAX_TO}')
    sub = data.get("sub")
    if sub is not None:
        if not isinstance(sub, dict) or not all(isinstance(values, list) for values in sub.values()):
            raise invalid('"sub" must map each variable to a list of values')
        if to is not None and any(len(values) != len(to) for values in sub.values()):
            raise invalid('every "sub" list needs one value per "to" address')
    filters = data.get("filters")
    if filters is not None and not isinstance(filters, dict):
        raise invalid('"filters" must be an object')
    return data


def check_recipients(data: dict, recipients: Sequence[str]) -> None:
    """``to`` overrides the envelope: it must name exactly the recipients the relay accepted.

    An address outside the envelope never went through RCPT policy; an envelope recipient
    missing from ``to`` would silently get nothing while the queue says delivered.
    """
    if "to" not in data:
        return
    listed = {address.strip().lower() for address in data["to"]}
    envelope = {address.lower() for address in recipients}
    extra = sorted(listed - envelope)
    if extra:
        raise SMTPReply(550, "5.7.1", f'X-SMTPAPI "to" names <{extra[0]}>, which is not a RCPT TO recipient')
    missing = sorted(envelope - listed)
    if missing:
        raise SMTPReply(550, "5.7.1", f'X-SMTPAPI "to" leaves out RCPT TO recipient <{missing[0]}>')


def merge_tracking(data: dict, tracking: Tracking) -> dict:
    """The relay's tracking switches override the client's; unset ones leave the client's."""
    if all(getattr(tracking, option) is None for option in _FILTERS):
        return data
    filters = dict(data.get("filters") or {})
    for option, name in _FILTERS.items():
        enabled = getattr(tracking, option)
        if enabled is not None:
            filters[name] = {"settings": {"enable": "1" if enabled else "0"}}
    return {**data, "filters": filters}


def encode(data: dict) -> bytes:
    return base64.b64encode(json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def apply(message: Message, tracking: Tracking, recipients: Sequence[str]) -> None:
    """Check the client's X-SMTPAPI, merge tracking, and write the header last on one line.

    A valid client header that needs no merging keeps its value byte for byte (unfolded).
    """
    fields = message.all(HEADER)
    if len(fields) > 1:
        raise _invalid(f"{len(fields)} X-SMTPAPI headers; SendCloud reads one")
    client = decode(fields[0].raw_value) if fields else {}
    check_recipients(client, recipients)
    merged = merge_tracking(client, tracking)
    message.remove(HEADER)
    if merged is client and fields:
        message.fields.append(raw_field(HEADER, b"".join(fields[0].raw_value.split())))
    elif merged:
        message.fields.append(raw_field(HEADER, encode(merged)))


def for_transaction(data: bytes, recipients: Sequence[str]) -> bytes:
    """The message for one upstream transaction carrying only ``recipients`` of its envelope.

    With a ``to`` list (which replaces the envelope at SendCloud), each transaction must list
    only its own recipients, and ``sub`` values follow them; otherwise the message is unchanged.
    A header section that does not even contain the name is not parsed (every transaction asks).
    """
    if _NAME not in data.lower():
        return data
    message = Message(data)
    field = message.first(HEADER)
    if field is None:
        return data
    value = decode(field.raw_value)
    if "to" not in value:
        return data
    wanted = {address.lower() for address in recipients}
    keep = [index for index, address in enumerate(value["to"]) if address.strip().lower() in wanted]
    if len(keep) == len(value["to"]):
        return data
    value["to"] = [value["to"][index] for index in keep]
    if "sub" in value:
        value["sub"] = {name: [values[index] for index in keep] for name, values in value["sub"].items()}
    message.replace(field, raw_field(HEADER, encode(value)))
    return message.bytes()
