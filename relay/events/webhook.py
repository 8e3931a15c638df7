"""One SendCloud webhook request: its fields, its event, and whether to believe it.

SendCloud's documentation pages disagree (form-encoded or JSON, ``delivered`` or
``deliver``, how a list travels in a form), so parsing accepts every documented shape and
turns it into one :class:`WebhookEvent`. The checks a receiver makes before changing
anything — signature, age, duplicate — are separate functions so each can be tested alone.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from relay.events.status import EVENT_NAMES, canonical

# Fields that carry a list. A form body may repeat them (``emailIds=a&emailIds=b``, also PHP's
# ``emailIds[]=``); every other field must appear once, so that the signature check and the
# event cannot read two different values of one field.
LIST_FIELDS = ("emailIds", "recipientArray")

# Fields with a place of their own in WebhookEvent; everything else goes to ``details``.
_MAPPED = frozenset(
    {"event", "emailId", "emailIds", "messageId", "recipient", "apiUser", "labelId", "timestamp", "token", "signature", "userHeaders"}
)
_SECRET = frozenset({"token", "signature"})

_MAX_FIELDS = 1000  # a real event has a few dozen; more is not SendCloud


class _Number(str):
    """A JSON number kept as the text it was sent as (the signature covers that text)."""


def parse_webhook(body: bytes, content_type: str) -> dict[str, str] | None:
    """The request's fields as strings, or None when the body is not a webhook we can read.

    ``application/x-www-form-urlencoded`` and JSON (``application/json``, ``text/json``,
    ``*+json``) are read; without a content type the body is sniffed (``{`` means JSON). JSON
    numbers keep their text exactly, nested values become compact JSON, ``null`` becomes "".
    A list field sent several times becomes one JSON array string. Anything else — another
    content type, bad encoding, a JSON value that is not an object, a scalar field given
    twice — is None (the receiver answers 400).
    """
    media, charset = _media_type(content_type)
    try:
        if _is_json(media) or (media == "" and body.lstrip()[:1] == b"{"):
            return _parse_json(body, charset)
        if media in ("", "application/x-www-form-urlencoded"):
            return _parse_form(body, charset)
    except (UnicodeDecodeError, LookupError, ValueError, RecursionError):
        return None
    return None


def _media_type(content_type: str) -> tuple[str, str]:
    media, _, params = content_type.partition(";")
    charset = "utf-8"
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip():
            charset = value.strip().strip('"')
    return media.strip().lower(), charset


def _is_json(media: str) -> bool:
    return media in ("application/json", "text/json") or media.endswith("+json")


def _parse_form(body: bytes, charset: str) -> dict[str, str] | None:
    text = body.decode(charset)
    pairs = parse_qsl(text, keep_blank_values=True, encoding=charset, errors="strict", max_num_fields=_MAX_FIELDS)
    fields: dict[str, str] = {}
    lists: dict[str, list[str]] = {}
    for key, value in pairs:
        if key.endswith("[]"):
            key = key[:-2]
        if key in LIST_FIELDS:
            lists.setdefault(key, []).append(value)
        elif key in fields:
            return None
        else:
            fields[key] = value
    for key, values in lists.items():
        # One value is kept as sent (it may itself be a JSON array or a separated list).
        fields[key] = values[0] if len(values) == 1 else json.dumps(values, ensure_ascii=False)
    return fields


def _parse_json(body: bytes, charset: str) -> dict[str, str] | None:
    data = json.loads(body.decode(charset), parse_int=_Number, parse_float=_Number)
    if not isinstance(data, dict) or len(data) > _MAX_FIELDS:
        return None
    return {str(key): _as_text(value) for key, value in data.items()}


def _as_text(value) -> str:
    if isinstance(value, str):  # also _Number: its text as sent
        return str(value)
    if value is None:
        return ""
    if value is True or value is False:
        return "true" if value else "false"
    return json.dumps(_plain(value), ensure_ascii=False, separators=(",", ":"))


def _plain(value):
    """Nested values with their numbers back as numbers, for re-serialising."""
    if isinstance(value, _Number):
        return json.loads(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


@dataclass(frozen=True)
class WebhookEvent:
    event: str  # canonical name (``deliver``, ``report_spam``, ...) or the normalised unknown name
    event_raw: str  # as sent
    known: bool  # False for a name SendCloud has not documented: kept, logged, not applied
    email_id: str | None
    email_ids: tuple[str, ...]  # ``emailIds`` of a ``request`` event, in order
    message_id: str | None
    recipient: str | None  # as sent
    recipient_key: str | None  # lowercased, for matching
    api_user: str | None
    label_id: str | None
    timestamp_raw: str  # exactly as received: the signature covers this text
    time: float | None  # seconds since the epoch; None when missing or not a number
    token: str
    signature: str
    user_headers: Mapping[str, str] = field(default_factory=dict)
    details: Mapping[str, str] = field(default_factory=dict)

    @property
    def all_email_ids(self) -> tuple[str, ...]:
        """Every emailId the event is about: ``emailIds`` for ``request``, else ``emailId``."""
        if self.email_ids:
            return self.email_ids
        return (self.email_id,) if self.email_id else ()


def to_event(fields: Mapping[str, str]) -> WebhookEvent:
    """The event the parsed fields describe (see :func:`parse_webhook`)."""
    raw_name = fields.get("event", "")
    name = canonical(raw_name)
    email_id = fields.get("emailId") or None
    recipient = fields.get("recipient") or None
    if recipient is None and email_id and "$" in email_id:
        # emailId = messageId + index + "$" + address: the address is in it (route events,
        # for one, name the emailId they answer but carry no recipient field).
        recipient = email_id.partition("$")[2] or None
    timestamp_raw = fields.get("timestamp", "")
    return WebhookEvent(
        event=name,
        event_raw=raw_name,
        known=name in EVENT_NAMES,
        email_id=email_id,
        email_ids=split_list(fields.get("emailIds", "")),
        message_id=fields.get("messageId") or None,
        recipient=recipient,
        recipient_key=recipient.strip().lower() if recipient else None,
        api_user=fields.get("apiUser") or fields.get("category") or None,  # category = apiUser
        label_id=fields.get("labelId") or fields.get("labelName") or None,
        timestamp_raw=timestamp_raw,
        time=event_time(timestamp_raw),
        token=fields.get("token", ""),
        signature=fields.get("signature", ""),
        user_headers=parse_user_headers(fields.get("userHeaders", "")),
        details={key: value for key, value in fields.items() if key not in _MAPPED and key not in _SECRET},
    )


_SEPARATORS = re.compile(r"[,;]")


def split_list(value: str) -> tuple[str, ...]:
    """A list field in any of its encodings: a JSON array, Java's ``[a, b]``, ``a,b`` or ``a;b``."""
    value = value.strip()
    if not value:
        return ()
    if value.startswith("["):
        try:
            items = json.loads(value)
        except ValueError:
            items = None
        if isinstance(items, list):
            return tuple(str(item).strip() for item in items if str(item).strip())
        if value.endswith("]"):  # java.util.List.toString(): brackets, no quotes
            value = value[1:-1]
    return tuple(item.strip() for item in _SEPARATORS.split(value) if item.strip())


def event_time(timestamp_raw: str) -> float | None:
    """Seconds since the epoch: a value below 10**11 is seconds, else milliseconds.

    10**11 seconds is the year 5138 and 10**11 milliseconds is 1973, so no real time is
    ambiguous. Not a finite non-negative number → None (the event is then stale).
    """
    try:
        value = float(timestamp_raw)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return value if value < 10**11 else value / 1000.0


def parse_user_headers(value: str) -> dict[str, str]:
    """``userHeaders`` (a JSON object of the message's ``SC-Custom-*`` headers); bad JSON → {}."""
    if not value:
        return {}
    try:
        data = json.loads(value)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(key): item if isinstance(item, str) else json.dumps(item) for key, item in data.items()}


def expected_signature(app_key: str, timestamp_raw: str, token: str) -> str:
    """hex(HMAC-SHA256(key=app_key, msg=timestamp + token)), SendCloud's documented signature."""
    return hmac.new(app_key.encode("utf-8"), (timestamp_raw + token).encode("utf-8"), hashlib.sha256).hexdigest()


def signature_ok(app_key: str, timestamp_raw: str, token: str, signature: str) -> bool:
    """Whether SendCloud signed this timestamp and token; any missing piece is a no.

    The two fields are used exactly as received; the comparison is constant-time. Hex digits
    are compared case-insensitively (SendCloud's samples send lowercase).
    """
    if not (app_key and timestamp_raw and token and signature):
        return False
    expected = expected_signature(app_key, timestamp_raw, token).encode("ascii")
    return hmac.compare_digest(expected, signature.lower().encode("utf-8"))


def is_stale(event_time: float | None, now: float, max_age: float) -> bool:
    """Whether to refuse an event for its timestamp: older than ``max_age``, or no time at all.

    A timestamp more than ``max_age`` in the future is refused too: clocks drift by seconds,
    not hours, and a future-dated signed event would otherwise stay acceptable (replayable)
    for longer than ``max_age``. Bounding both sides keeps every accepted event within
    ``max_age`` of now, so the dedupe store only needs to remember keys for 2 × ``max_age``.
    Exactly ``max_age`` away is still accepted.
    """
    if event_time is None:
        return True
    return now - event_time > max_age or event_time - now > max_age


def dedupe_keys(event: WebhookEvent) -> tuple[str, ...]:
    """Keys under which a redelivery of this event is recognised: its token, and its
    (canonical event, emailId, timestamp). Whether SendCloud's retries keep the token is not
    documented, hence both. Without an emailId, its messageId (else its emailIds), the
    relay's queue ID and the recipient stand in: events of two recipients of one message in
    one millisecond, mapped by ``userHeaders``, are two events. An empty token gives no token key.
    """
    keys = []
    if event.token:
        keys.append(f"token:{event.token}")
    subject = event.email_id
    if not subject:
        queue_id, _ = relay_ids(event)
        parts = (event.message_id or ",".join(event.email_ids), queue_id, event.recipient_key)
        subject = ":".join(part for part in parts if part)
    keys.append(f"event:{event.event}:{subject}:{event.timestamp_raw.strip()}")
    return tuple(keys)


def relay_ids(event: WebhookEvent) -> tuple[str | None, str | None]:
    """(queue ID, local user) the relay stamped as ``SC-Custom-Relay-Id`` / ``-User``.

    Header names are matched case-insensitively (header names are, and SendCloud's echo of
    them is not documented); an empty value counts as missing.
    """
    lowered = {key.strip().lower(): value for key, value in event.user_headers.items()}
    queue_id = (lowered.get("sc-custom-relay-id") or "").strip() or None
    user = (lowered.get("sc-custom-relay-user") or "").strip() or None
    return queue_id, user


def is_probe(fields: Mapping[str, str]) -> bool:
    """SendCloud's URL probe: a POST with no ``event`` field at all (answered 200, unsigned).

    An ``event`` field that is present but empty is not a probe: it is checked like any event.
    """
    return "event" not in fields
