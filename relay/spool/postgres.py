"""The shared spool: PostgreSQL, for several relay nodes on one queue (``spool.backend: postgres``).

Writes are group-committed as :class:`relay.spool.sqlite.SqliteSpool`'s are: one batcher task
takes every write that arrived while the previous COMMIT was in flight into one transaction
(:mod:`relay.spool.postgres_group`: stores, outcomes, counters and events alike, each kind's
writes together), so N concurrent sessions share one WAL flush and one bad message fails only
its own caller; if the COMMIT fails, the whole group does. ``synchronous_commit`` is the
server's (on by default): a ``250`` is sent only after COMMIT returned.

Which node delivers a message is a lease: ``lease_owner`` and ``lease_until`` on the message
row, on the database's clock. ``store`` leases the message to the storing node (it delivers its
own intake first), :meth:`due` and :meth:`stranded` claim with ``FOR UPDATE SKIP LOCKED`` what
nobody holds, :meth:`renew` extends, :meth:`release` gives back. :meth:`record` is fenced: an
outcome applies only while ``lease_owner`` is still this node, so a node that lost a message
(it stalled past its lease and another one took over) cannot overwrite the other's result.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from relay.config.formats import mask_dsn_passwords, redacted_dsn
from relay.lines import header_length
from relay.spool.base import PENDING_MESSAGES, BodyGone, Cursor, ListQuery
from relay.spool.events_model import NO_ROWS, OutcomeRows
from relay.spool.model import (
    FileRegion,
    NewMessage,
    Piece,
    QueuedMessage,
    Recipient,
    RecipientUpdate,
    State,
    piece_chunks,
)
from relay.spool.postgres_events import PostgresEvents, enqueue_fanout
from relay.spool.postgres_group import WRITE_ERRORS, Kind, WriteRefused, each, keep_session, run_group, stat_totals
from relay.spool.postgres_migrate import check_schema

log = logging.getLogger("relay.spool")

PIECE = 256 * 1024  # a body is stored in pieces of exactly this size (the last one shorter)
_INLINE = 1024 * 1024  # a body in memory up to this size goes in the INSERT's one round trip
CHANNEL = "relay_queue"  # NOTIFY'd by a flush, a retry and a release: there is work nobody holds
_POOL_SIZE = 10  # the batcher's connection, the claims and the workers' body reads
_NOW = "extract(epoch from clock_timestamp())::float8"  # leases are on the database's clock
_PENDING_SQL = "('queued', 'deferred')"
_COLUMNS = 'id, received_at, "user", listener, client, account, channel, sender, size, label, mail_from, eight_bit'
_M_COLUMNS = ", ".join(f"m.{column}" for column in _COLUMNS.split(", "))
_RECIPIENT_COLUMNS = "message_id, idx, address, state, attempts, next_attempt, last_reply, email_id"

# One statement stores any number of messages: their rows, recipients and inline bodies as columns.
_INSERT = f"""
WITH m AS (
    INSERT INTO messages ({_COLUMNS}, next_due, lease_owner, lease_until)
    SELECT t.*, t.received_at, $13, {_NOW} + $14::float8
    FROM unnest($1::text[], $2::float8[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
                $9::bigint[], $10::int[], $11::text[], $12::bool[]) AS t({_COLUMNS})
), r AS (
    INSERT INTO recipients (message_id, idx, address, state, next_attempt)
    SELECT t.message_id, t.idx, t.address, 'queued', t.next_attempt
    FROM unnest($15::text[], $16::int[], $17::text[], $18::float8[]) AS t(message_id, idx, address, next_attempt)
)
INSERT INTO bodies (message_id, seq, data) SELECT * FROM unnest($19::text[], $20::int[], $21::bytea[])
"""

# One statement claims: the earliest due messages nobody else holds, skipping rows another
# node is claiming this very moment, leased to us before anyone else can see them free; a row
# per due recipient of each (a message with none due stays claimed and is not returned).
_CLAIM = f"""
WITH claimed AS (
    UPDATE messages m SET lease_owner = $1, lease_until = {_NOW} + $2::float8
    WHERE m.id IN (
        SELECT id FROM messages
        WHERE pending AND next_due <= $3 AND (account = ANY($4::text[])) = $5
          AND (lease_until IS NULL OR lease_until < {_NOW} OR lease_owner = $1)
          AND ($7::float8 IS NULL OR (next_due, id) > ($7::float8, $8::text))
        ORDER BY next_due, id LIMIT $6
        FOR UPDATE SKIP LOCKED)
    RETURNING {_M_COLUMNS}, m.next_due
)
SELECT c.*, {", ".join(f"r.{column}" for column in _RECIPIENT_COLUMNS.split(", "))}
FROM claimed c JOIN recipients r ON r.message_id = c.id AND r.state IN {_PENDING_SQL} AND r.next_attempt <= $3
ORDER BY c.next_due, c.id, r.idx
"""

_APPLY = """
UPDATE recipients r SET state = u.state, attempts = u.attempts, next_attempt = u.next_attempt,
    last_reply = u.last_reply, email_id = COALESCE(u.email_id, r.email_id)
FROM unnest($1::text[], $2::int[], $3::text[], $4::int[], $5::float8[], $6::text[], $7::text[])
    AS u(message_id, idx, state, attempts, next_attempt, last_reply, email_id)
WHERE r.message_id = u.message_id AND r.idx = u.idx
"""

# After recipients changed: the message's earliest due time again, final when nothing waits
# (the lease is given back and the body goes).
_REFRESH = f"""
WITH s AS (
    SELECT id, (SELECT min(next_attempt) FROM recipients r
                WHERE r.message_id = messages.id AND r.state IN {_PENDING_SQL}) AS due
    FROM messages WHERE id = ANY($1::text[])
), u AS (
    UPDATE messages m SET next_due = s.due, pending = s.due IS NOT NULL,
        lease_until = CASE WHEN s.due IS NULL THEN NULL ELSE m.lease_until END
    FROM s WHERE m.id = s.id
    RETURNING m.id, m.pending
)
DELETE FROM bodies WHERE message_id IN (SELECT id FROM u WHERE NOT pending)
"""


class QueueIdTaken(WriteRefused):
    """Another node (or process) made the same queue ID: this message is not stored; a retry gets a new ID."""


def uniform_pieces(pieces: Sequence[Piece], size: int = PIECE) -> Iterator[bytes]:
    """The body as consecutive pieces of exactly ``size`` bytes (the last one shorter, none if empty),
    so byte ``n`` is always in piece ``n // size``; a file region is read a chunk at a time."""
    buffer = bytearray()
    for piece in pieces:
        for chunk in piece_chunks(piece, size):
            if not buffer and len(chunk) == size:
                yield bytes(chunk)
                continue
            buffer += chunk
            if len(buffer) >= size:
                yield bytes(buffer[:size])
                del buffer[:size]
    if buffer:
        yield bytes(buffer)


def inline_body(message: NewMessage) -> bool:
    """Whether the body goes in the INSERT itself: small and already in memory."""
    return message.size <= _INLINE and not any(isinstance(piece, FileRegion) for piece in message.pieces)


def insert_columns(messages: Sequence[NewMessage]) -> list[list]:
    """The messages' own rows for :data:`_INSERT`, a list per column ($1 to $12)."""
    return [list(column) for column in zip(*(
        (m.id, m.received_at, m.user, m.listener, m.client, m.account, m.channel, m.sender, m.size, m.label,
         m.mail_from, m.eight_bit) for m in messages), strict=True)]


def recipient_columns(messages: Sequence[NewMessage]) -> list[list]:
    """Every recipient as (message, index, address, first attempt: the message's arrival), per column."""
    rows = [(m.id, idx, address, m.received_at) for m in messages for idx, address in enumerate(m.recipients)]
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[], [], [], []]


def inline_body_columns(messages: Sequence[NewMessage]) -> list[list]:
    """The pieces of the bodies that go in the INSERT itself, as (message, piece number, bytes) per column."""
    rows = [(m.id, seq, piece) for m in messages if inline_body(m) for seq, piece in enumerate(uniform_pieces(m.pieces))]
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[], [], []]


def list_sql(query: ListQuery) -> tuple[str, list]:
    """The SELECT for ``query`` and its parameters: a page costs the page, not the spool.

    Pending messages are walked on the partial index ``messages_pending`` in ID order, every
    other query on the primary key; filters are checked per message on the way, so a selective
    filter walks further but never sorts.
    """
    where, parameters = [], []

    def condition(sql: str, value: Any) -> None:
        if value is not None:
            parameters.append(value)
            where.append(sql.replace("?", f"${len(parameters)}"))

    condition("m.id > ?", query.after)
    condition('m."user" = ?', query.user)
    condition("m.received_at >= ?", query.since)
    condition("m.received_at < ?", query.before)
    condition("lower(m.sender) = ?", query.sender.lower() if query.sender is not None else None)
    condition("EXISTS (SELECT 1 FROM recipients t WHERE t.message_id = m.id AND lower(t.address) = ?)",
              query.to.lower() if query.to is not None else None)
    condition("EXISTS (SELECT 1 FROM recipient_status rs WHERE rs.message_id = m.id AND rs.status = ?)", query.status)
    condition("m.id IN (SELECT e.message_id FROM recipients e WHERE e.email_id = ?)", query.email_id)
    condition("EXISTS (SELECT 1 FROM recipients s WHERE s.message_id = m.id AND s.state = ?)",
              query.state.value if query.state is not None else None)
    if query.pending_only:
        where.insert(0, "m.pending")
    sql = f"SELECT {_M_COLUMNS} FROM messages m{' WHERE ' + ' AND '.join(where) if where else ''} ORDER BY m.id"
    if query.limit is not None:
        parameters.append(query.limit)
        sql += f" LIMIT ${len(parameters)}"
    return sql, parameters


def _recipient(row: asyncpg.Record) -> Recipient:
    return Recipient(row["message_id"], row["idx"], row["address"], State(row["state"]), row["attempts"],
                     row["next_attempt"], row["last_reply"], row["email_id"])


def _message(row: asyncpg.Record, recipients: list[Recipient]) -> QueuedMessage:
    return QueuedMessage(*(row[column.strip('"')] for column in _COLUMNS.split(", ")), recipients=recipients)


@dataclass(eq=False)
class _Write:
    """One caller's write waiting for the batcher: ``started`` once its group began (no withdrawing then)."""

    kind: Kind
    args: tuple
    done: asyncio.Future
    started: bool = field(default=False)


_STOP = object()


class PostgresSpool(PostgresEvents):
    """:class:`~relay.spool.base.Spool` (the queue part) on an asyncpg pool, shared by several nodes."""

    def __init__(self, dsn: str, *, node: str, lease: float = 60.0, commit_timeout: float = 30.0,
                 spill_directory: Path = Path("var")):
        self._dsn = dsn
        self.node = node
        self.lease = lease
        self.commits = 0  # COMMITs of groups: what the benchmark divides by messages
        self.operations = 0  # writes those commits carried
        self._commit_timeout = commit_timeout
        self._spill = spill_directory
        self._pool: asyncpg.Pool | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._batcher: asyncio.Task | None = None
        self._group_started: float | None = None
        self._listener: asyncpg.Connection | None = None
        self._woken = asyncio.Event()
        self._deaf = False  # the last try to listen failed

    # -- life ----------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and check the schema (:class:`~relay.spool.base.SchemaMismatch` unless it is this relay's)."""
        await asyncio.to_thread(self._spill.mkdir, parents=True, exist_ok=True)  # acceptors spill large bodies here
        try:
            self._pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=_POOL_SIZE, reset=keep_session)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError, TimeoutError) as error:
            raise OSError(f"cannot connect to the spool database {redacted_dsn(self._dsn)}: {self._secret_free(error)}") from None
        try:
            async with self._pool.acquire() as conn:
                await check_schema(conn)
        except BaseException:
            await self._pool.close()
            self._pool = None
            raise
        self._batcher = asyncio.create_task(self._batch_loop(), name="spool-batcher")

    async def close(self) -> None:
        if self._batcher is not None:
            self._queue.put_nowait(_STOP)
            await self._batcher
            self._batcher = None
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def _secret_free(self, error: BaseException) -> str:
        return mask_dsn_passwords(str(error), self._dsn)

    # -- writes: each awaits the COMMIT of the group it joined ----------------------------------

    async def store(self, message: NewMessage) -> None:
        if not inline_body(message):
            await asyncio.to_thread(lambda: message.eight_bit)  # a scan of the whole body: off the loop
        await self._write(self._stores, message)

    async def record(self, updates: list[RecipientUpdate], new_messages: Iterable[NewMessage] = (),
                     rows: OutcomeRows = NO_ROWS) -> set[str]:
        new_messages = list(new_messages)
        for new in new_messages:
            if not inline_body(new):
                await asyncio.to_thread(lambda new=new: new.eight_bit)
        return await self._write(self._records, list(updates), new_messages, rows)

    async def purge_final(self, older_than: float) -> int:
        return await self._write(_PURGE_FINAL, older_than)

    async def retry(self, message_id: str | None = None) -> int:
        return await self._write(_RETRY, message_id)

    async def delete(self, message_id: str) -> bool:
        return await self._write(_DELETE, message_id)

    async def probe(self, now: float) -> None:
        await self._write(_PROBE, now)

    # -- leases ----------------------------------------------------------------------------------

    async def due(self, now: float, limit: int, accounts: Collection[str],
                  after: Cursor | None = None) -> list[QueuedMessage]:
        """Claims (leases to this node) up to ``limit`` messages of ``accounts`` with a recipient due,
        earliest due first, each with all its due recipients. A message sorts by its earliest due
        recipient (``messages.next_due``, one index), so a walk meets it once: with retries per
        message its recipients are due together anyway."""
        return await self._claim(now, limit, accounts, True, after)

    async def stranded(self, now: float, limit: int, accounts: Collection[str],
                       after: Cursor | None = None) -> list[QueuedMessage]:
        return await self._claim(now, limit, accounts, False, after)

    async def renew(self, message_ids: Collection[str]) -> set[str]:
        asked = set(message_ids)
        if not asked:
            return set()
        rows = await self._db().fetch(
            f"UPDATE messages SET lease_until = {_NOW} + $3::float8 "
            "WHERE id = ANY($1::text[]) AND lease_owner = $2 AND pending RETURNING id",
            list(asked), self.node, self.lease,
        )
        return asked - {row["id"] for row in rows}

    async def release(self, message_ids: Collection[str]) -> None:
        """Leases given back are free at once; the NOTIFY wakes the other nodes' pollers."""
        if not message_ids:
            return
        async with self._db().acquire() as conn, conn.transaction():
            await conn.execute("UPDATE messages SET lease_until = NULL WHERE id = ANY($1::text[]) AND lease_owner = $2",
                               list(message_ids), self.node)
            await conn.execute("SELECT pg_notify($1, 'release')", CHANNEL)

    async def wait_for_work(self, timeout: float) -> bool:
        """Sleep up to ``timeout``, less when a NOTIFY on :data:`CHANNEL` arrives (also one that came
        since the last call): on a connection of its own, made again whenever it drops."""
        deadline = time.monotonic() + timeout
        if self._listener is None or self._listener.is_closed():
            await self._listen(timeout)
        try:
            await asyncio.wait_for(self._woken.wait(), max(deadline - time.monotonic(), 0))
        except TimeoutError:
            pass
        woken = self._woken.is_set()
        self._woken.clear()
        return woken

    async def _listen(self, timeout: float) -> None:
        try:
            conn = await asyncpg.connect(self._dsn, timeout=max(timeout, 1.0))
            await conn.add_listener(CHANNEL, lambda *_: self._woken.set())
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
            if not self._deaf:  # once per outage, not at every poll
                log.warning("spool: cannot listen for %s (%s); polling only until it can", CHANNEL,
                            self._secret_free(error))
            self._deaf = True
            return
        if self._deaf:
            log.info("spool: listening for %s again", CHANNEL)
        self._deaf = False
        # A dropped connection may have missed notifications: wake the poller, and listen again next time.
        conn.add_termination_listener(lambda _: self._woken.set())
        self._listener = conn

    async def _claim(self, now: float, limit: int, accounts: Collection[str], configured: bool,
                     after: Cursor | None) -> list[QueuedMessage]:
        if limit <= 0:
            return []
        after_time, after_id = after if after is not None else (None, None)
        rows = await self._db().fetch(_CLAIM, self.node, self.lease, now, list(accounts), configured, limit,
                                      after_time, after_id)
        first: dict[str, asyncpg.Record] = {}
        by_message: dict[str, list[Recipient]] = {}
        for row in rows:  # in due order, a message's recipients together
            first.setdefault(row["id"], row)
            by_message.setdefault(row["id"], []).append(_recipient(row))
        return [_message(row, by_message[message_id]) for message_id, row in first.items()]

    # -- bodies ----------------------------------------------------------------------------------

    async def start(self, message_id: str) -> tuple[bytes, int] | None:
        """The first pieces of a body, through the end of its header section, and its size; None if gone or final.
        The first piece comes with the size (one round trip for any header section under 256 KiB)."""
        async with self._db().acquire() as conn:
            row = await conn.fetchrow("SELECT m.size, b.data FROM messages m LEFT JOIN bodies b "
                                      "ON b.message_id = m.id AND b.seq = 0 WHERE m.id = $1 AND m.pending", message_id)
            if row is None:
                return None
            size, data = row["size"], row["data"] or b""
            if size and not data:
                return None
            while len(data) < size and header_length(data) is None:
                piece = await conn.fetchval("SELECT data FROM bodies WHERE message_id = $1 AND seq = $2",
                                            message_id, len(data) // PIECE)
                if piece is None:
                    return None
                data += piece
            return data, size

    async def chunks(self, message_id: str, offset: int, size: int) -> AsyncIterator[bytes]:
        """The body of ``size`` bytes from ``offset`` on, the rest of one piece per query; BodyGone if it goes meanwhile."""
        while offset < size:
            chunk = await self._db().fetchval(
                "SELECT substring(b.data FROM $3) FROM bodies b JOIN messages m ON m.id = b.message_id "
                "WHERE b.message_id = $1 AND b.seq = $2 AND m.pending AND m.size = $4",
                message_id, offset // PIECE, offset % PIECE + 1, size,
            )
            if not chunk:
                raise BodyGone(message_id)
            yield chunk
            offset += len(chunk)

    # -- operators -------------------------------------------------------------------------------

    async def list(self, query: ListQuery = PENDING_MESSAGES) -> list[QueuedMessage]:
        sql, parameters = list_sql(query)
        async with self._db().acquire() as conn:
            rows = await conn.fetch(sql, *parameters)
            recipients = await self._recipients_of(conn, [row["id"] for row in rows])
        return [_message(row, recipients.get(row["id"], [])) for row in rows]

    async def get(self, message_id: str) -> QueuedMessage | None:
        async with self._db().acquire() as conn:
            row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM messages WHERE id = $1", message_id)
            if row is None:
                return None
            recipients = await self._recipients_of(conn, [message_id])
        return _message(row, recipients.get(message_id, []))

    @staticmethod
    async def _recipients_of(conn: asyncpg.Connection, ids: list[str]) -> dict[str, list[Recipient]]:
        found: dict[str, list[Recipient]] = {}
        if ids:
            for row in await conn.fetch(f"SELECT {_RECIPIENT_COLUMNS} FROM recipients WHERE message_id = ANY($1::text[]) "
                                        "ORDER BY message_id, idx", ids):
                found.setdefault(row["message_id"], []).append(_recipient(row))
        return found

    async def counts(self) -> dict[str, int]:
        rows = await self._db().fetch("SELECT state, count(*) AS n FROM recipients GROUP BY state")
        return {row["state"]: row["n"] for row in rows}

    async def pending_summary(self) -> tuple[int, dict[str, int], float | None]:
        """From the partial indexes only (it runs on every scrape)."""
        async with self._db().acquire() as conn:
            count, oldest = await conn.fetchrow(
                "SELECT count(*), (SELECT received_at FROM messages WHERE pending ORDER BY id LIMIT 1) "
                "FROM messages WHERE pending")
            rows = await conn.fetch(f"SELECT state, count(*) AS n FROM recipients WHERE state IN {_PENDING_SQL} "
                                    "GROUP BY state")
        return count, {row["state"]: row["n"] for row in rows}, oldest

    def unavailable(self) -> str | None:
        """A dead batcher, or a group stuck in its COMMIT longer than commit_timeout."""
        if self._batcher is None or self._batcher.done():
            return "the spool batcher is not running"
        started = self._group_started
        if started is not None and time.monotonic() - started > self._commit_timeout:
            return f"the spool database has been stuck in a commit for {time.monotonic() - started:.0f}s"
        return None

    @property
    def spill_directory(self) -> Path:
        return self._spill

    def _db(self) -> asyncpg.Pool:
        assert self._pool is not None, "spool not open"
        return self._pool

    # -- the operations, run inside a group's transaction (relay.spool.postgres_group) ------------

    @functools.cached_property
    def _stores(self) -> Kind:
        async def run(conn: asyncpg.Connection, calls: list[tuple[NewMessage]], tally: list) -> list[None]:
            await self._insert(conn, [message for (message,) in calls])
            return [None] * len(calls)
        return Kind(run)

    @functools.cached_property
    def _records(self) -> Kind:
        return Kind(self._record)

    async def _insert(self, conn: asyncpg.Connection, messages: list[NewMessage]) -> None:
        """The messages in one statement (with their bodies when :func:`inline_body`), then a COPY
        for each body that is not."""
        if not messages:
            return
        try:
            await conn.execute(_INSERT, *insert_columns(messages), self.node, self.lease,
                               *recipient_columns(messages), *inline_body_columns(messages))
        except asyncpg.UniqueViolationError:
            raise QueueIdTaken(f"queue ID {', '.join(m.id for m in messages)} is already spooled (made twice): "
                               "not stored") from None
        for message in messages:
            if not inline_body(message):
                await conn.copy_records_to_table("bodies", columns=["message_id", "seq", "data"],
                                                 records=_streamed_pieces(message))

    async def _record(self, conn: asyncpg.Connection,
                      calls: list[tuple[list[RecipientUpdate], list[NewMessage], OutcomeRows]],
                      tally: list) -> list[set[str]]:
        """Every caller's outcomes in three statements, fenced: the rows are locked first, so no
        claim can move a lease between the check and the update. Each caller gets the fenced
        messages among its own; its DSNs and its events rows are stored only when none of them is."""
        latest = {(update.message_id, update.idx): update  # the last outcome of each wins, in call order
                  for updates, _, _ in calls for update in updates}
        ids = sorted({message_id for message_id, _ in latest})
        leases = await conn.fetch("SELECT id, lease_owner IS NOT DISTINCT FROM $2 AS ours FROM messages "
                                  "WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE", ids, self.node)
        fenced = {lease["id"] for lease in leases if not lease["ours"]}
        applied = [update for update in latest.values() if update.message_id not in fenced]
        if applied:
            await conn.execute(_APPLY, *map(list, zip(*(
                (u.message_id, u.idx, u.state.value, u.attempts, u.next_attempt, u.last_reply, u.email_id)
                for u in applied), strict=True)))
            await conn.execute(_REFRESH, sorted({update.message_id for update in applied}))
        results, dsns, outbox = [], [], []
        for updates, new_messages, rows in calls:
            own = fenced & {update.message_id for update in updates}
            if not own:  # a DSN belongs to the outcome it reports, and so do its rows: not without it
                dsns += new_messages
                if _countable(rows, updates):
                    tally.extend(rows.stats)
                    outbox += rows.outbox
            results.append(own)
        await self._insert(conn, dsns)
        await _outbox_rows(conn, outbox)
        return results

    # -- group commit ------------------------------------------------------------------------------

    async def _write(self, kind: Kind, *args: Any) -> Any:
        """Queue a write for the batcher and wait for its group's COMMIT, at most commit_timeout.

        On timeout a write whose group has not started is withdrawn (it will never commit, so
        the caller's 451 is true); one inside the stuck group may still commit. A cancelled
        caller does not withdraw its write: a delivery outcome is recorded all the same.
        """
        if self._batcher is None or self._batcher.done():
            raise OSError("the spool is not open")
        write = _Write(kind, args, asyncio.get_running_loop().create_future())
        write.done.add_done_callback(_consume)
        self._queue.put_nowait(write)
        try:
            return await asyncio.wait_for(asyncio.shield(write.done), self._commit_timeout)
        except TimeoutError:
            if not write.started:
                write.done.cancel()
            raise TimeoutError(
                f"the spool did not commit within spool.commit_timeout ({self._commit_timeout:g}s)"
                + ("" if not write.started else "; the write may still commit")
            ) from None

    async def _batch_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            stop = any(item is _STOP for item in batch)
            group = [item for item in batch if item is not _STOP and not item.done.done()]  # not withdrawn
            if group:
                self._group_started = time.monotonic()
                try:
                    await self._run_group(group)
                finally:
                    self._group_started = None
            del batch, group  # a stored body's pieces are views of its receive buffer: let go now
            if stop:
                return

    async def _run_group(self, group: list[_Write]) -> None:
        """One transaction for the group (:func:`relay.spool.postgres_group.run_group`); if the
        database fails it, every caller gets an OSError that names no password."""
        for write in group:
            write.started = True
        try:
            async with self._db().acquire() as conn:
                outcomes = await run_group(conn, group)
            self.commits += 1
            self.operations += len(group)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as error:
            outcomes = [(None, OSError(f"spool database: {self._secret_free(error)}"))] * len(group)
        except Exception as error:  # a bug in one write: its group fails now, and the batcher lives on
            log.exception("spool group of %d writes failed", len(group))
            outcomes = [(None, OSError(f"spool write failed: {type(error).__name__}"))] * len(group)
        for write, (result, error) in zip(group, outcomes, strict=True):
            if write.done.done():
                continue
            if error is not None:
                write.done.set_exception(error)
            else:
                write.done.set_result(result)


async def _retry(conn: asyncpg.Connection, message_id: str | None) -> int:
    if message_id is None:
        touched = await conn.fetch("UPDATE recipients SET next_attempt = 0 WHERE state = 'deferred' "
                                   "RETURNING message_id")
    else:
        touched = await conn.fetch(f"UPDATE recipients SET next_attempt = 0 WHERE message_id = $1 "
                                   f"AND state IN {_PENDING_SQL} RETURNING message_id", message_id)
    if touched:
        await conn.execute("UPDATE messages SET next_due = 0 WHERE id = ANY($1::text[])",
                           sorted({row["message_id"] for row in touched}))
        await conn.execute("SELECT pg_notify($1, 'retry')", CHANNEL)  # delivered at COMMIT
    return len(touched)


async def _delete(conn: asyncpg.Connection, message_id: str) -> bool:
    return await conn.fetchval("WITH d AS (DELETE FROM messages WHERE id = $1 RETURNING 1) SELECT count(*) FROM d",
                               message_id) > 0


async def _purge_final(conn: asyncpg.Connection, older_than: float) -> int:
    return await conn.fetchval("WITH d AS (DELETE FROM messages WHERE received_at < $1 AND NOT pending RETURNING 1) "
                               "SELECT count(*) FROM d", older_than)


async def _probe(conn: asyncpg.Connection, now: float) -> None:
    await conn.execute("INSERT INTO health (id, checked_at) VALUES (1, $1) "
                       "ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at", now)


_RETRY, _DELETE, _PURGE_FINAL, _PROBE = map(each, (_retry, _delete, _purge_final, _probe))


def _countable(rows: OutcomeRows, updates: list[RecipientUpdate]) -> bool:
    """Whether an outcome's events rows can be counted: malformed ones are logged and left out
    (with its outbox rows: they go together), so they never keep the outcome off the disk
    (:meth:`relay.spool.base.Spool.record`). Its counters join the group's one upsert."""
    try:
        stat_totals(rows.stats)
    except (TypeError, ValueError):
        log.exception("%s: could not count the delivery outcome; recorded without its rows",
                      ", ".join(sorted({update.message_id for update in updates})))
        return False
    return True


async def _outbox_rows(conn: asyncpg.Connection, outbox: list) -> None:
    """The outcomes' fan-out rows, in a savepoint: if they fail, the outcomes are recorded without them."""
    if not outbox:
        return
    try:
        async with conn.transaction():
            await enqueue_fanout(conn, outbox)
    except WRITE_ERRORS:
        log.exception("could not fan out %d delivery outcomes; recorded without them", len(outbox))


def _consume(done: asyncio.Future) -> None:
    """Retrieve the outcome of a write whose caller stopped waiting (timed out or cancelled)."""
    if not done.cancelled():
        done.exception()


async def _streamed_pieces(message: NewMessage) -> AsyncIterator[tuple[str, int, bytes]]:
    """The body's rows for COPY, a piece at a time, each read off the event loop (a file region is preads)."""
    pieces = uniform_pieces(message.pieces)
    seq = 0
    while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
        yield message.id, seq, piece
        seq += 1
