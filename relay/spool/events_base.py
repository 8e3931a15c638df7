"""The part of the :class:`relay.spool.base.Spool` protocol that keeps what happens after the 250.

Webhook events (stored before they are answered, applied after), SendCloud's status and
history per recipient, the suppression list, hourly statistics and the fan-out outbox.
Writes are durable when they return, as every spool write.
"""

from __future__ import annotations

from typing import Protocol

from relay.spool.events_model import Applied, EventTarget, Fate, OutboxRow, ReceivedEvent, StatRow, SuppressionRow


class EventStore(Protocol):
    async def store_event(self, event: ReceivedEvent) -> int | None:
        """The event, durably, with its id; None when one of its dedupe keys is known (nothing stored)."""

    async def unapplied_events(self, limit: int) -> list[ReceivedEvent]:
        """Stored events not applied yet (a restart between storing and applying), oldest first."""

    async def event_target(self, email_id: str | None, queue_id: str | None, address: str | None) -> EventTarget | None:
        """The recipient with this emailId, else the recipient ``address`` of message ``queue_id``."""

    async def apply_event(self, applied: Applied) -> None:
        """What one event changes, and the event marked applied, in one durable write."""

    async def fates(self, message_id: str, idx: int | None = None) -> dict[int, Fate]:
        """SendCloud's status and history per recipient index (only recipients that have any;
        only recipient ``idx`` when given)."""

    async def prune_events(self, older_than: float, limit: int) -> int:
        """Forget at most ``limit`` applied events received before ``older_than``."""

    async def add_suppressions(self, rows: list[SuppressionRow]) -> int:
        """Add entries (one per address and account: a new one replaces the old)."""

    async def remove_suppression(self, address: str, account: str | None = None) -> int:
        """Remove every entry of the address (``account`` None), or that account's."""

    async def suppressions(self) -> list[SuppressionRow]: ...

    async def suppression_version(self) -> int:
        """A number that changes whenever the list does (0 for a list never written)."""

    async def add_stats(self, rows: list[StatRow]) -> None:
        """Add to hourly counters (created at 0)."""

    async def stats(self, since_hour: str, until_hour: str | None = None) -> list[StatRow]:
        """Counters of the UTC hours ``since_hour`` through ``until_hour`` (inclusive)."""

    async def enqueue_fanout(self, rows: list[OutboxRow]) -> None:
        """Outbox rows for outcomes the relay decided itself (events' rows come with apply_event)."""

    async def due_fanout(self, now: float, limit: int) -> list[OutboxRow]: ...

    async def fanout_done(self, row_id: int) -> None:
        """The row was delivered or given up: it goes."""

    async def fanout_retry(self, row_id: int, attempts: int, next_attempt: float) -> None: ...
