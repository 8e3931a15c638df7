"""The spool in memory: the :class:`~relay.spool.base.Spool` protocol over dicts, for unit tests.

Same semantics as :class:`relay.spool.sqlite.SqliteSpool` (``SpoolStore`` is the reference),
nothing durable: a message is a dict entry holding its metadata, its body as one ``bytes``
(``None`` once every recipient is final, as the SQL ``body`` column) and its recipients by
index. Every write is one "commit" (``commits`` and ``operations`` count them), is applied
whole or not at all, and raises :attr:`MemorySpool.fail_writes` when a test sets it (a full
disk). Each call gives the event loop one turn, as the threaded backend's calls do, so a
caller never sees a spool that answers without letting other tasks run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import tempfile
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.lines import header_length
from relay.spool.base import PENDING_MESSAGES, BodyGone, Cursor, ListQuery
from relay.spool.events_model import NO_ROWS, OutcomeRows
from relay.spool.memory_events import MemoryEvents
from relay.spool.model import NewMessage, QueuedMessage, Recipient, RecipientUpdate, State, piece_chunks

log = logging.getLogger(__name__)

_CHUNK = 256 * 1024  # bodies are read in pieces of this size, as SqliteSpool's blobs
_PENDING = (State.QUEUED, State.DEFERRED)


@dataclass
class _Entry:
    message: QueuedMessage  # the metadata; its own recipients list stays empty
    body: bytes | None  # None once every recipient is final
    recipients: list[Recipient]  # by idx


class MemorySpool(MemoryEvents):
    """:class:`~relay.spool.base.Spool` in memory (no threads, nothing survives the object)."""

    def __init__(self) -> None:
        super().__init__()  # the event tables (relay/spool/memory_events.py)
        self.commits = 0
        self.operations = 0
        self.fail_writes: Exception | None = None  # set by a test: every write raises it, nothing changes
        self.probed_at: float | None = None
        self._entries: dict[str, _Entry] = {}
        self._spill: Path | None = None
        self.lost: set[str] = set()  # set by a test: messages whose lease renew() reports lost
        self.renewed: list[set[str]] = []  # what each renew() asked for
        self.released: set[str] = set()

    async def open(self) -> None:
        await asyncio.sleep(0)

    async def close(self) -> None:
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)
            self._spill = None
        await asyncio.sleep(0)

    # -- writes: each one commit, whole or not at all -----------------------------------------------

    async def store(self, message: NewMessage) -> None:
        await self._write(self._insert, [self._entry(message)])

    async def record(self, updates: list[RecipientUpdate], new_messages: Iterable[NewMessage] = (),
                     rows: OutcomeRows = NO_ROWS) -> set[str]:
        # The new messages' bodies are read before anything changes: a piece that cannot be
        # read fails the whole write, as the SQL transaction rolls back.
        await self._write(self._record, list(updates), [self._entry(message) for message in new_messages], rows)
        return set()

    # -- leases: one process, which holds every message (``lost`` lets a test take some away) -------

    async def renew(self, message_ids: Collection[str]) -> set[str]:
        self.renewed.append(set(message_ids))
        return await _answer(set(message_ids) & self.lost)

    async def release(self, message_ids: Collection[str]) -> None:
        self.released.update(message_ids)
        await asyncio.sleep(0)

    async def wait_for_work(self, timeout: float) -> bool:
        await asyncio.sleep(timeout)
        return False

    async def purge_final(self, older_than: float) -> int:
        return await self._write(self._purge_final, older_than)

    async def retry(self, message_id: str | None = None) -> int:
        return await self._write(self._retry, message_id)

    async def delete(self, message_id: str) -> bool:
        return await self._write(self._delete, message_id)

    async def probe(self, now: float) -> None:
        await self._write(self._probe, now)

    # -- reads ----------------------------------------------------------------------------------------

    async def due(self, now: float, limit: int, accounts: Collection[str], after: Cursor | None = None) -> list[QueuedMessage]:
        """Messages of ``accounts`` by their first due recipient's (next_attempt, queue ID), as SQLite's index."""
        return await _answer(self._due(now, limit, lambda account: account in accounts, after))

    async def stranded(self, now: float, limit: int, accounts: Collection[str],
                       after: Cursor | None = None) -> list[QueuedMessage]:
        """As :meth:`due`, for every account not in ``accounts``."""
        return await _answer(self._due(now, limit, lambda account: account not in accounts, after))

    async def start(self, message_id: str) -> tuple[bytes, int] | None:
        """The first chunks of a body, through the end of its header section, and its size; None if gone or final."""
        entry = self._entries.get(message_id)
        if entry is None or entry.body is None:
            return await _answer(None)
        body = entry.body
        data = body[:_CHUNK]
        while header_length(data) is None and len(data) < len(body):
            data = body[: len(data) + _CHUNK]
        return await _answer((data, len(body)))

    async def chunks(self, message_id: str, offset: int, size: int) -> AsyncIterator[bytes]:
        """The body of ``size`` bytes from ``offset`` on, a chunk per read; BodyGone if it is deleted meanwhile."""
        while offset < size:
            await asyncio.sleep(0)
            entry = self._entries.get(message_id)
            if entry is None or entry.body is None or len(entry.body) != size:
                raise BodyGone(message_id)
            chunk = entry.body[offset : offset + _CHUNK]
            yield chunk
            offset += len(chunk)

    async def list(self, query: ListQuery = PENDING_MESSAGES) -> list[QueuedMessage]:
        selected = [message for message in self._messages({
            message_id: list(entry.recipients) for message_id, entry in self._entries.items()
        }) if query.matches(message, self._statuses(message.id))]
        return await _answer(selected[: query.limit] if query.limit is not None else selected)

    def _statuses(self, message_id: str) -> set[str]:
        return {fate.status for (owner, _), fate in self._fates.items() if owner == message_id and fate.status}

    async def get(self, message_id: str) -> QueuedMessage | None:
        entry = self._entries.get(message_id)
        return await _answer(None if entry is None else self._messages({message_id: list(entry.recipients)})[0])

    async def counts(self) -> dict[str, int]:
        return await _answer(dict(Counter(recipient.state.value for recipient in self._recipients())))

    async def pending_summary(self) -> tuple[int, dict[str, int], float | None]:
        pending = [recipient for recipient in self._recipients() if recipient.state in _PENDING]
        ids = {recipient.message_id for recipient in pending}
        by_state = dict(Counter(recipient.state.value for recipient in pending))
        oldest = self._entries[min(ids)].message.received_at if ids else None  # queue IDs sort by time
        return await _answer((len(ids), by_state, oldest))

    def unavailable(self) -> str | None:
        return None

    @property
    def spill_directory(self) -> Path:
        if self._spill is None:
            self._spill = Path(tempfile.mkdtemp(prefix="memory-spool-"))
            weakref.finalize(self, shutil.rmtree, self._spill, True)  # if close() is never called
        return self._spill

    # -- the operations, applied synchronously ---------------------------------------------------------

    async def _write(self, operation: Callable[..., Any], *args: Any) -> Any:
        if self.fail_writes is not None:
            await asyncio.sleep(0)
            raise self.fail_writes
        self.commits += 1  # as SqliteSpool's group: committed even when its one operation fails
        self.operations += 1
        return await _answer(operation(*args))

    @staticmethod
    def _entry(message: NewMessage) -> _Entry:
        body = b"".join(chunk for piece in message.pieces for chunk in piece_chunks(piece, _CHUNK))
        metadata = QueuedMessage(
            message.id, message.received_at, message.user, message.listener, message.client, message.account,
            message.channel, message.sender, message.size, message.label, message.mail_from, message.eight_bit,
        )
        recipients = [
            Recipient(message.id, idx, address, State.QUEUED, 0, message.received_at)
            for idx, address in enumerate(message.recipients)
        ]
        return _Entry(metadata, body, recipients)

    def _check_new(self, entries: list[_Entry]) -> None:
        """Raise, before anything changes, if a new message's id is taken (the PRIMARY KEY)."""
        ids = [entry.message.id for entry in entries]
        clashes = sorted({message_id for message_id in ids if message_id in self._entries or ids.count(message_id) > 1})
        if clashes:
            raise ValueError(f"message {', '.join(clashes)} is already spooled")

    def _insert(self, entries: list[_Entry]) -> None:
        self._check_new(entries)
        for entry in entries:
            self._entries[entry.message.id] = entry

    def _record(self, updates: list[RecipientUpdate], new_entries: list[_Entry], rows: OutcomeRows) -> None:
        self._check_new(new_entries)  # a clashing DSN fails the write before any update lands
        touched = set()
        for update in updates:
            entry = self._entries.get(update.message_id)
            if entry is None or not 0 <= update.idx < len(entry.recipients):
                continue  # as an UPDATE that matches no row
            old = entry.recipients[update.idx]
            entry.recipients[update.idx] = dataclasses.replace(
                old, state=update.state, attempts=update.attempts, next_attempt=update.next_attempt,
                last_reply=update.last_reply, email_id=update.email_id if update.email_id is not None else old.email_id,
            )
            touched.add(update.message_id)
        self._insert(new_entries)
        for message_id in touched:
            entry = self._entries[message_id]
            if not any(recipient.state in _PENDING for recipient in entry.recipients):
                entry.body = None
        stats, fanout = dict(self._stats), dict(self._fanout)  # the rows' savepoint
        try:
            self._add_stats(rows.stats)
            self._enqueue_fanout(rows.outbox)
        except Exception:  # as the SQL backends: the outcome stands without its rows
            self._stats, self._fanout = stats, fanout
            log.exception("could not count or fan out the delivery outcome; recorded without it")

    def _due(self, now: float, limit: int, chosen: Callable[[str], bool], after: Cursor | None) -> list[QueuedMessage]:
        due = {
            message_id: [r for r in entry.recipients if r.state in _PENDING and r.next_attempt <= now]
            for message_id, entry in self._entries.items() if chosen(entry.message.account)
        }
        keys = {
            message_id: min(keys) for message_id, recipients in due.items()
            if (keys := [(r.next_attempt, message_id) for r in recipients if after is None or (r.next_attempt, message_id) > after])
        }
        return [
            dataclasses.replace(self._entries[message_id].message, recipients=due[message_id])
            for message_id in sorted(keys, key=keys.__getitem__)[: max(limit, 0)]
        ]

    def _purge_final(self, older_than: float) -> int:
        gone = [
            message_id for message_id, entry in self._entries.items()
            if entry.message.received_at < older_than and entry.body is None
        ]
        for message_id in gone:
            del self._entries[message_id]
        return len(gone)

    def _retry(self, message_id: str | None) -> int:
        if message_id is None:
            entries, states = list(self._entries.values()), (State.DEFERRED,)
        else:
            entries, states = [self._entries[message_id]] if message_id in self._entries else [], _PENDING
        count = 0
        for entry in entries:
            for index, recipient in enumerate(entry.recipients):
                if recipient.state in states:
                    entry.recipients[index] = dataclasses.replace(recipient, next_attempt=0)
                    count += 1
        return count

    def _delete(self, message_id: str) -> bool:
        return self._entries.pop(message_id, None) is not None

    def _probe(self, now: float) -> None:
        self.probed_at = now

    # -- records for callers: fresh lists, so nobody can change the spool by changing what it got -------

    def _recipients(self) -> Iterable[Recipient]:
        return (recipient for entry in self._entries.values() for recipient in entry.recipients)

    def _messages(self, recipients: dict[str, list[Recipient]]) -> list[QueuedMessage]:
        found = [
            dataclasses.replace(self._entries[message_id].message, recipients=chosen)
            for message_id, chosen in recipients.items()
            if message_id in self._entries
        ]
        found.sort(key=lambda message: message.id)
        return found


async def _answer(value: Any) -> Any:
    """Give the event loop one turn before answering, as a call to the threaded backend does."""
    await asyncio.sleep(0)
    return value
