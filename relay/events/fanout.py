"""Team fan-out: the JSON each team's ``events_url`` receives, its signature, its retries.

Delivery is at least once from a durable outbox, so the payload carries an ``id`` the
receiver dedupes on, and the signature covers a timestamp so a captured request cannot be
replayed later. The header follows Stripe's well-known shape (``t=...,v1=...``), which many
receivers already know how to check.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping

FIRST_RETRY = 5.0  # seconds after the first failed try
MAX_RETRY = 600.0  # the spec's "at most 10 minutes between tries"
JITTER = 0.2  # ± fraction, so a receiver back from an outage is not hit by every row at once
# The spec asks for at least 24 h. 48 h covers a receiver that is down for a whole day and is
# only fixed the next working day, at the price of an outbox row per event for two days.
KEEP_FOR = 48 * 3600.0

PAYLOAD_KEYS = ("id", "event", "queue_id", "recipient", "user", "account", "channel", "label", "timestamp", "email_id", "details")


def _timestamp(value: int | float | str | None) -> int | float | str | None:
    """The event's time as SendCloud gave it; digits travel as a JSON number."""
    if isinstance(value, str):
        stripped = value.strip()
        return int(stripped) if stripped.isdigit() else value
    return value


def payload(
    id: str,
    event: str,
    queue_id: str | None,
    recipient: str | None,
    user: str,
    account: str | None,
    channel: str | None,
    label: int | str | None,
    timestamp: int | float | str | None,
    email_id: str | None,
    details: Mapping | None = None,
) -> bytes:
    """The body POSTed to a team: compact UTF-8 JSON, keys in the spec's order.

    ``timestamp`` is the event's as SendCloud sent it (milliseconds in its examples; an
    all-digit string becomes a number); for the relay's own ``failed`` events, pass the
    relay's time in milliseconds, SendCloud's unit.
    """
    values = (id, event, queue_id, recipient, user, account, channel, label, _timestamp(timestamp), email_id, dict(details or {}))
    return json.dumps(dict(zip(PAYLOAD_KEYS, values)), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _sign(secret: bytes, t: int, body: bytes) -> str:
    return hmac.new(secret, f"{t}.".encode("ascii") + body, hashlib.sha256).hexdigest()


def signature_header(secret: bytes, body: bytes, now: int) -> str:
    """``X-Relay-Signature``: ``t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>``."""
    t = int(now)
    return f"t={t},v1={_sign(secret, t, body)}"


def verify(header: str, secret: bytes, body: bytes, now: float, tolerance: float = 300.0) -> bool:
    """A receiver's check of ``X-Relay-Signature`` (for the teams' code and the tests).

    True when ``t`` is within ``tolerance`` seconds of ``now`` (either way) and any ``v1``
    matches (several may be sent while a secret is rotated); the comparison is constant-time.
    """
    t: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit() and t is None:
            t = int(value)
        elif key == "v1":
            candidates.append(value.strip().lower())
    if t is None or not candidates or abs(now - t) > tolerance:
        return False
    expected = _sign(secret, t, body).encode("ascii")
    # Check every candidate (no early exit) so timing does not tell which one matched.
    return sum(hmac.compare_digest(expected, candidate.encode("utf-8")) for candidate in candidates) > 0


def next_retry(attempt: int, random_fraction: float) -> float:
    """Seconds to wait after ``attempt`` failed tries (1 = the first); ``random_fraction`` in [0, 1).

    5 s, 10 s, 20 s, ... doubling, each ± 20 %, never more than 600 s (the cap holds after the
    jitter, so the spec's 10 minutes is never exceeded).
    """
    exponent = min(max(attempt, 1) - 1, 16)  # 5 × 2**16 is far past the cap; no float overflow
    base = FIRST_RETRY * 2**exponent
    return min(MAX_RETRY, base * (1 + JITTER * (2 * random_fraction - 1)))


def gives_up(first_attempt_at: float, now: float, keep_for: float = KEEP_FOR) -> bool:
    """Whether to stop retrying an outbox row (then it is dropped and logged)."""
    return now - first_attempt_at >= keep_for
