"""The event methods of :class:`relay.spool.memory.MemorySpool` (mixed in), over dicts.

Same semantics as :mod:`relay.spool.sqlite_events` (the reference); every write is one
MemorySpool write (``_write``: one commit, ``fail_writes`` honoured), every read gives the
loop one turn. History and status go with their message when it is deleted or purged, as
the SQL's ``ON DELETE CASCADE``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

from relay.spool.events_model import (
    Applied,
    EventTarget,
    Fate,
    OutboxRow,
    ReceivedEvent,
    StatRow,
    SuppressionRow,
)


async def _answer(value: Any) -> Any:
    await asyncio.sleep(0)
    return value


class MemoryEvents:
    _write: Callable[..., Any]
    _entries: dict

    def __init__(self) -> None:
        self._events: dict[int, tuple[ReceivedEvent, bool]] = {}  # id → (event, applied)
        self._event_keys: dict[str, int] = {}
        self._fates: dict[tuple[str, int], Fate] = {}
        self._suppressions: dict[tuple[str, str | None], SuppressionRow] = {}
        self._suppression_version = 0
        self._stats: dict[tuple[str, str, str, str], int] = {}
        self._fanout: dict[int, OutboxRow] = {}
        self._next_id = 1

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    # -- writes ------------------------------------------------------------------------------

    async def store_event(self, event: ReceivedEvent) -> int | None:
        return await self._write(self._store_event, event)

    def _store_event(self, event: ReceivedEvent) -> int | None:
        if any(key in self._event_keys for key in event.keys):
            return None
        event_id = self._new_id()
        self._events[event_id] = (dataclasses.replace(event, keys=(), id=event_id), False)
        self._event_keys.update(dict.fromkeys(event.keys, event_id))
        return event_id

    async def apply_event(self, applied: Applied) -> None:
        await self._write(self._apply_event, applied)

    def _apply_event(self, applied: Applied) -> None:
        target = applied.target
        if target is not None and target.message_id in self._entries:
            key = (target.message_id, target.idx)
            fate = self._fates.get(key, Fate())
            if applied.status is not None:
                fate = dataclasses.replace(fate, status=applied.status, status_time=applied.status_time)
            if applied.history is not None:
                fate = dataclasses.replace(fate, events=(*fate.events, applied.history))
            self._fates[key] = fate
        if applied.suppression is not None:
            self._add_suppressions([applied.suppression])
        self._add_stats(applied.stats)
        self._enqueue_fanout(applied.outbox)
        if applied.event_id in self._events:
            self._events[applied.event_id] = (self._events[applied.event_id][0], True)

    async def prune_events(self, older_than: float, limit: int) -> int:
        return await self._write(self._prune_events, older_than, limit)

    def _prune_events(self, older_than: float, limit: int) -> int:
        gone = [
            i for i, (event, applied) in sorted(self._events.items()) if applied and event.received_at < older_than
        ][:limit]
        for event_id in gone:
            del self._events[event_id]
        self._event_keys = {key: i for key, i in self._event_keys.items() if i in self._events}
        return len(gone)

    async def add_suppressions(self, rows: list[SuppressionRow]) -> int:
        return await self._write(self._add_suppressions, list(rows))

    def _add_suppressions(self, rows: list[SuppressionRow]) -> int:
        for row in rows:
            self._suppressions[(row[0], row[3])] = row
        if rows:
            self._suppression_version += 1
        return len(rows)

    async def remove_suppression(self, address: str, account: str | None = None) -> int:
        return await self._write(self._remove_suppression, address, account)

    def _remove_suppression(self, address: str, account: str | None) -> int:
        gone = [key for key in self._suppressions if key[0] == address and (account is None or key[1] == account)]
        for key in gone:
            del self._suppressions[key]
        if gone:
            self._suppression_version += 1
        return len(gone)

    async def add_stats(self, rows: list[StatRow]) -> None:
        await self._write(self._add_stats, list(rows))

    def _add_stats(self, rows) -> None:
        for hour, group, value, counter, count in rows:
            key = (hour, group, value, counter)
            self._stats[key] = self._stats.get(key, 0) + count

    async def enqueue_fanout(self, rows: list[OutboxRow]) -> None:
        await self._write(self._enqueue_fanout, list(rows))

    def _enqueue_fanout(self, rows) -> None:
        for row in rows:
            row_id = self._new_id()
            self._fanout[row_id] = dataclasses.replace(row, id=row_id)

    async def fanout_done(self, row_id: int) -> None:
        await self._write(self._fanout_done, row_id)

    def _fanout_done(self, row_id: int) -> None:
        self._fanout.pop(row_id, None)

    async def fanout_retry(self, row_id: int, attempts: int, next_attempt: float) -> None:
        def retry() -> None:
            if row_id in self._fanout:
                self._fanout[row_id] = dataclasses.replace(
                    self._fanout[row_id], attempts=attempts, next_attempt=next_attempt
                )

        await self._write(retry)

    # -- reads -------------------------------------------------------------------------------

    async def unapplied_events(self, limit: int) -> list[ReceivedEvent]:
        return await _answer([event for _, (event, applied) in sorted(self._events.items()) if not applied][:limit])

    async def event_target(self, email_id: str | None, queue_id: str | None, address: str | None) -> EventTarget | None:
        found = None
        for entry in self._entries.values():
            for recipient in entry.recipients:
                by_email_id = email_id is not None and recipient.email_id == email_id
                by_address = (
                    queue_id is not None
                    and address is not None
                    and recipient.message_id == queue_id
                    and recipient.address.lower() == address.lower()
                )
                if by_email_id or (by_address and found is None):
                    message = entry.message
                    found = EventTarget(
                        recipient.message_id,
                        recipient.idx,
                        recipient.address,
                        message.user,
                        message.account,
                        message.channel,
                        message.label,
                    )
                    if by_email_id:
                        return await _answer(found)
        return await _answer(found)

    async def fates(self, message_id: str, idx: int | None = None) -> dict[int, Fate]:
        if message_id not in self._entries:
            return await _answer({})
        return await _answer(
            {i: fate for (mid, i), fate in sorted(self._fates.items()) if mid == message_id and idx in (None, i)}
        )

    async def suppressions(self) -> list[SuppressionRow]:
        return await _answer(sorted(self._suppressions.values(), key=lambda row: (row[0], row[3] or "")))

    async def suppression_version(self) -> int:
        return await _answer(self._suppression_version)

    async def stats(self, since_hour: str, until_hour: str | None = None) -> list[StatRow]:
        until = until_hour or "9999"
        return await _answer(
            [(*key, count) for key, count in sorted(self._stats.items()) if since_hour <= key[0] <= until]
        )

    async def due_fanout(self, now: float, limit: int) -> list[OutboxRow]:
        due = sorted(
            (row for row in self._fanout.values() if row.next_attempt <= now),
            key=lambda row: (row.next_attempt, row.id),
        )
        return await _answer(due[:limit])
