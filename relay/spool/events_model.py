"""The records of what happens after the 250, which every backend speaks (issue #12).

SendCloud's webhook events as received, the recipient each one is about, SendCloud's status
and event history per recipient, the suppression list's rows, hourly statistics counters and
the teams' fan-out outbox. The decisions about them live in ``relay.events`` and
``relay.policy.suppression``; the spool only keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass

# A suppression entry: (address, reason, channels, account, added_at, expires_at, source), the
# fields of relay.policy.suppression.Entry in order (policy sits above the spool).
SuppressionRow = tuple[str, str, frozenset[str], str | None, float, float | None, str | None]

# One statistics counter increment: (UTC hour "2026-12-01T10", group, value, counter, count).
StatRow = tuple[str, str, str, str, int]


@dataclass(frozen=True)
class ReceivedEvent:
    """A webhook event as stored before it is answered: enough to apply it after a crash."""

    received_at: float
    event: str  # canonical name
    fields: str  # JSON object of the fields as received, the signature left out
    keys: tuple[str, ...]  # dedupe keys (relay.events.webhook.dedupe_keys); each unique
    id: int | None = None  # given by the spool


@dataclass(frozen=True)
class EventTarget:
    """The recipient an event is about, with what its statistics are grouped by."""

    message_id: str
    idx: int
    address: str
    user: str
    account: str
    channel: str
    label: int | None


@dataclass(frozen=True)
class RecipientEvent:
    """One line of a recipient's history, under the event's canonical name."""

    event: str
    time: float
    ip: str | None = None
    url: str | None = None
    sub_stat: str | None = None
    sub_stat_desc: str | None = None


@dataclass(frozen=True)
class Fate:
    """SendCloud's view of one recipient: its status (None until an event sets one) and history."""

    status: str | None = None
    status_time: float | None = None
    events: tuple[RecipientEvent, ...] = ()


@dataclass(frozen=True)
class OutboxRow:
    """One POST to a team's ``events_url``, retried until it is answered 2xx or given up."""

    user: str
    url: str
    body: bytes
    created_at: float
    next_attempt: float
    attempts: int = 0
    id: int | None = None


@dataclass(frozen=True)
class OutcomeRows:
    """What the events stage adds to a delivery outcome: the ``requested`` counters and the
    teams' ``failed`` outbox rows, written with the outcome in its one spool write."""

    stats: tuple[StatRow, ...] = ()
    outbox: tuple[OutboxRow, ...] = ()


NO_ROWS = OutcomeRows()


@dataclass(frozen=True)
class Applied:
    """Everything one event changes, written in one durable write that also marks it applied."""

    event_id: int
    target: EventTarget | None = None  # None: a message the relay does not know (only marked applied)
    status: str | None = None  # the target's SendCloud status once this event is known
    status_time: float | None = None
    history: RecipientEvent | None = None  # appended to the target's events
    suppression: SuppressionRow | None = None
    stats: tuple[StatRow, ...] = ()
    outbox: tuple[OutboxRow, ...] = ()
