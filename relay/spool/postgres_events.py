"""What happens after the 250 (issue #12) on PostgreSQL, shared by every node of one database.

The same behaviour as :mod:`relay.spool.sqlite_events` (the reference), written so that
several nodes may run it at once: a webhook SendCloud delivers to two nodes is stored once
(the dedupe keys' primary key decides, ``ON CONFLICT DO NOTHING``), counters add up
(``ON CONFLICT DO UPDATE``), every change of the suppression list bumps one counter row, and
an unapplied event or a due fan-out row is *claimed* for a while by the store that returned it,
so no two nodes apply one event or POST one row at once; a node that dies loses its claims after
:data:`CLAIM`. Claims use the database's clock. Locks are always taken in one order (the version
row first, counters last in sorted key order: :mod:`relay.spool.postgres_group`), so two nodes
do not deadlock. Stored and applied events, counters and outbox rows join the spool's group
commit (``self._write``) with the queue's writes; operators' changes to the list are one short
transaction each.

:class:`PostgresEvents` is mixed into the PostgreSQL spool and uses nothing of it but its
``asyncpg`` pool (``self._pool``) and its group commit (``self._write``);
:class:`PostgresRateStore` and :class:`PostgresSuppressionReader` are what the other processes
open on a DSN of their own.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import asyncpg

from relay.spool.base import WindowKey
from relay.spool.events_model import (
    Applied,
    EventTarget,
    Fate,
    OutboxRow,
    ReceivedEvent,
    RecipientEvent,
    StatRow,
    SuppressionRow,
)
from relay.spool.postgres_group import STATS, Kind, each, keep_session

# Seconds an unapplied event or a fan-out row stays with the store that took it: longer than
# a fan-out batch can take (100 rows, 8 at a time, 10 s each: 125 s), short next to the
# outbox's own retries (up to 10 minutes).
CLAIM = 300.0

_CLAIM_UNTIL = "now() + make_interval(secs => $%d)"

_TARGET = (
    'SELECT r.message_id, r.idx, r.address, m."user", m.account, m.channel, m.label '
    "FROM recipients r JOIN messages m ON m.id = r.message_id "
)


def _rowcount(status: str) -> int:
    """The row count of a command tag (``DELETE 3``)."""
    return int(status.rsplit(" ", 1)[-1])


# -- writes on one connection, inside the caller's transaction ----------------------------------


async def _bump_version(conn: asyncpg.Connection) -> None:
    """First in every transaction that changes the list: the row lock orders them across nodes."""
    await conn.execute(
        "INSERT INTO suppression_version (id, version) VALUES (1, 1) "
        "ON CONFLICT (id) DO UPDATE SET version = suppression_version.version + 1"
    )


async def _add_suppressions(conn: asyncpg.Connection, rows: list[SuppressionRow]) -> int:
    """Add entries; one already there for the address and account is replaced (the last one wins)."""
    if not rows:
        return 0
    await _bump_version(conn)
    await conn.executemany(
        "INSERT INTO suppressions (address, account, reason, channels, added_at, expires_at, source) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (address, account) DO UPDATE SET "
        "reason = excluded.reason, channels = excluded.channels, added_at = excluded.added_at, "
        "expires_at = excluded.expires_at, source = excluded.source",
        [
            (address, account or "", reason, sorted(channels), added_at, expires_at, source)
            for address, reason, channels, account, added_at, expires_at, source in rows
        ],
    )
    return len(rows)


async def enqueue_fanout(conn: asyncpg.Connection, rows: Iterable[OutboxRow]) -> None:
    values = [(row.user, row.url, row.body, row.created_at, row.attempts, row.next_attempt) for row in rows]
    if values:
        await conn.executemany(
            'INSERT INTO fanout ("user", url, body, created_at, attempts, next_attempt) VALUES ($1, $2, $3, $4, $5, $6)',
            values,
        )


async def _fanout_rows(conn: asyncpg.Connection, calls: list[tuple], tally: list[StatRow]) -> list[None]:
    await enqueue_fanout(conn, [row for (rows,) in calls for row in rows])
    return [None] * len(calls)


_FANOUT = Kind(_fanout_rows)  # every caller's rows in one executemany

# The event, its keys (those not known yet) and how many went in, in one statement.
_STORE_EVENT = f"""
WITH e AS (
    INSERT INTO events (received_at, event, fields, claimed_by, claimed_until)
    VALUES ($1, $2, $3, $4, {_CLAIM_UNTIL % 5}) RETURNING id
), k AS (
    INSERT INTO event_keys (key, event_id) SELECT unnest($6::text[]), id FROM e ON CONFLICT DO NOTHING RETURNING 1
)
SELECT (SELECT id FROM e) AS id, (SELECT count(*) FROM k) AS stored
"""


async def _store_event(conn: asyncpg.Connection, event: ReceivedEvent, claimant: str) -> int | None:
    """Stored, or None when a key is known: then the event goes again (its keys with it, by the
    cascade) in the same transaction, as if it had never been inserted.

    Two nodes storing the same event at once: the second one's key insert waits for the
    first's commit, then conflicts. A key another store of the same group inserted conflicts
    at once (the same transaction sees it).
    """
    keys = sorted(set(event.keys))
    row = await conn.fetchrow(_STORE_EVENT, event.received_at, event.event, event.fields, claimant, CLAIM, keys)
    if row["stored"] < len(keys):
        await conn.execute("DELETE FROM events WHERE id = $1", row["id"])
        return None
    return row["id"]


# -- reads, on the pool or a connection ----------------------------------------------------------


async def suppression_version(db: asyncpg.Pool | asyncpg.Connection) -> int:
    return await db.fetchval("SELECT COALESCE((SELECT version FROM suppression_version WHERE id = 1), 0)")


async def suppressions(db: asyncpg.Pool | asyncpg.Connection) -> list[SuppressionRow]:
    rows = await db.fetch(
        "SELECT address, account, reason, channels, added_at, expires_at, source FROM suppressions "
        "ORDER BY address, account"
    )
    return [
        (address, reason, frozenset(channels), account or None, added_at, expires_at, source)
        for address, account, reason, channels, added_at, expires_at, source in rows
    ]


async def _apply_events(conn: asyncpg.Connection, calls: list[tuple[Applied]], tally: list[StatRow]) -> list[None]:
    """Applied events together; for one recipient the last status wins and history keeps the
    order of the calls. Locks go in one order (the suppression version first: the kind runs
    first in its group; recipients sorted; the counters, in ``tally``, last), so two nodes'
    groups never deadlock. A recipient whose message was deleted meanwhile gets no status or
    history (nothing to hang them on)."""
    batch = [applied for (applied,) in calls]
    statuses: dict[tuple[str, int], tuple[str, float | None]] = {}
    history = []
    for applied in batch:
        target = applied.target
        if target is not None and applied.status is not None:
            statuses[(target.message_id, target.idx)] = (applied.status, applied.status_time)
        if target is not None and applied.history is not None:
            h = applied.history
            history.append((target.message_id, target.idx, h.event, h.time, h.ip, h.url, h.sub_stat, h.sub_stat_desc))
    await _add_suppressions(conn, [a.suppression for a in batch if a.suppression is not None])
    if statuses:
        await conn.executemany(
            "INSERT INTO recipient_status (message_id, idx, status, status_time) "
            "SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM messages WHERE id = $1) "
            "ON CONFLICT (message_id, idx) DO UPDATE SET "
            "status = excluded.status, status_time = excluded.status_time",
            [(*key, *statuses[key]) for key in sorted(statuses)],
        )
    if history:
        await conn.executemany(
            "INSERT INTO recipient_events (message_id, idx, event, time, ip, url, sub_stat, sub_stat_desc) "
            "SELECT $1, $2, $3, $4, $5, $6, $7, $8 WHERE EXISTS (SELECT 1 FROM messages WHERE id = $1)",
            history,
        )
    tally.extend(row for applied in batch for row in applied.stats)
    await enqueue_fanout(conn, [row for applied in batch for row in applied.outbox])
    await conn.execute(
        "UPDATE events SET applied = true, claimed_by = NULL, claimed_until = NULL WHERE id = ANY($1::bigint[])",
        sorted({applied.event_id for applied in batch}),
    )
    return [None] * len(batch)


_APPLY_EVENTS = Kind(_apply_events, first=True)
_STORE_EVENTS = each(_store_event)


class PostgresEvents:
    """The event methods of the PostgreSQL spool (mixed in): each write committed
    (``synchronous_commit``) when it returns, in the spool's group commit or a short
    transaction of its own on ``self._pool``."""

    _pool: asyncpg.Pool
    _write: Callable[..., Awaitable[Any]]  # the spool's group commit: a Kind and its arguments

    @functools.cached_property
    def _claimant(self) -> str:
        """Who holds a claim: this store (one per process), so its own claims never stop it."""
        return uuid.uuid4().hex

    # -- received events -------------------------------------------------------------------

    async def store_event(self, event: ReceivedEvent) -> int | None:
        """The event and its keys, claimed for this store's applier; None when a key is known."""
        return await self._write(_STORE_EVENTS, event, self._claimant)

    async def unapplied_events(self, limit: int) -> list[ReceivedEvent]:
        """Unapplied events this store received or that no live store holds, claimed, oldest first."""
        rows = await self._pool.fetch(
            f"UPDATE events SET claimed_by = $1, claimed_until = {_CLAIM_UNTIL % 3} WHERE id IN ("
            "SELECT id FROM events WHERE NOT applied "
            "AND (claimed_by = $1 OR claimed_until IS NULL OR claimed_until < now()) "
            "ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING id, received_at, event, fields",
            self._claimant, limit, CLAIM,
        )
        return [
            ReceivedEvent(received_at, event, fields, (), id)
            for id, received_at, event, fields in sorted(rows, key=lambda row: row["id"])
        ]

    async def event_target(self, email_id: str | None, queue_id: str | None, address: str | None) -> EventTarget | None:
        row = None
        if email_id:
            row = await self._pool.fetchrow(_TARGET + "WHERE r.email_id = $1 LIMIT 1", email_id)
        if row is None and queue_id and address:
            row = await self._pool.fetchrow(
                _TARGET + "WHERE r.message_id = $1 AND lower(r.address) = lower($2) ORDER BY r.idx LIMIT 1",
                queue_id, address,
            )
        return EventTarget(*row) if row else None

    async def apply_event(self, applied: Applied) -> None:
        """What one event changes and the event marked applied, committed together.

        The applier writes a decided batch as concurrent calls: they join one group commit
        (one commit, one WAL flush, instead of one each, every one waiting on the same hot
        counter rows), in the order they were made, as through SQLite's one writer.
        """
        await self._write(_APPLY_EVENTS, applied)

    async def fates(self, message_id: str, idx: int | None = None) -> dict[int, Fate]:
        where, args = ("message_id = $1", (message_id,)) if idx is None else ("message_id = $1 AND idx = $2", (message_id, idx))
        async with self._pool.acquire() as conn:
            status = {
                row_idx: (value, time)
                for row_idx, value, time in await conn.fetch(
                    f"SELECT idx, status, status_time FROM recipient_status WHERE {where}", *args
                )
            }
            history: dict[int, list[RecipientEvent]] = {}
            for row_idx, *fields in await conn.fetch(
                "SELECT idx, event, time, ip, url, sub_stat, sub_stat_desc FROM recipient_events "
                f"WHERE {where} ORDER BY time, id",
                *args,
            ):
                history.setdefault(row_idx, []).append(RecipientEvent(*fields))
        return {
            row_idx: Fate(*status.get(row_idx, (None, None)), tuple(history.get(row_idx, ())))
            for row_idx in sorted(set(status) | set(history))
        }

    async def prune_events(self, older_than: float, limit: int) -> int:
        """At most ``limit`` applied events (and their keys); rows another node is pruning are skipped."""
        return _rowcount(await self._pool.execute(
            "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE received_at < $1 AND applied "
            "ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)",
            older_than, limit,
        ))

    # -- suppression list --------------------------------------------------------------------

    async def add_suppressions(self, rows: list[SuppressionRow]) -> int:
        async with self._pool.acquire() as conn, conn.transaction():
            return await _add_suppressions(conn, list(rows))

    async def remove_suppression(self, address: str, account: str | None = None) -> int:
        """The version row is locked first, as for an addition; a removal of nothing is rolled back."""
        async with self._pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            try:
                await _bump_version(conn)
                if account is None:
                    status = await conn.execute("DELETE FROM suppressions WHERE address = $1", address)
                else:
                    status = await conn.execute(
                        "DELETE FROM suppressions WHERE address = $1 AND account = $2", address, account
                    )
                removed = _rowcount(status)
            except BaseException:
                await transaction.rollback()
                raise
            await (transaction.commit() if removed else transaction.rollback())
        return removed

    async def suppressions(self) -> list[SuppressionRow]:
        return await suppressions(self._pool)

    async def suppression_version(self) -> int:
        return await suppression_version(self._pool)

    # -- statistics ----------------------------------------------------------------------------

    async def add_stats(self, rows: list[StatRow]) -> None:
        """In the group commit: its counters go in the group's one upsert of them."""
        await self._write(STATS, list(rows))

    async def stats(self, since_hour: str, until_hour: str | None = None) -> list[StatRow]:
        rows = await self._pool.fetch(
            "SELECT hour, grp, value, counter, count FROM stats WHERE hour >= $1 AND hour <= $2 "
            "ORDER BY hour, grp, value, counter",
            since_hour, until_hour or "9999",
        )
        return [tuple(row) for row in rows]

    # -- fan-out outbox ------------------------------------------------------------------------

    async def enqueue_fanout(self, rows: list[OutboxRow]) -> None:
        await self._write(_FANOUT, list(rows))

    async def due_fanout(self, now: float, limit: int) -> list[OutboxRow]:
        """Due rows no other live store holds, claimed for this one (it POSTs them next)."""
        rows = await self._pool.fetch(
            f"UPDATE fanout SET claimed_by = $1, claimed_until = {_CLAIM_UNTIL % 4} WHERE id IN ("
            "SELECT id FROM fanout WHERE next_attempt <= $2 "
            "AND (claimed_by = $1 OR claimed_until IS NULL OR claimed_until < now()) "
            "ORDER BY next_attempt, id LIMIT $3 FOR UPDATE SKIP LOCKED) "
            'RETURNING id, "user", url, body, created_at, attempts, next_attempt',
            self._claimant, now, limit, CLAIM,
        )
        return [
            OutboxRow(user, url, bytes(body), created_at, next_attempt, attempts, id)
            for id, user, url, body, created_at, attempts, next_attempt
            in sorted(rows, key=lambda row: (row["next_attempt"], row["id"]))
        ]

    async def fanout_done(self, row_id: int) -> None:
        await self._pool.execute("DELETE FROM fanout WHERE id = $1", row_id)

    async def fanout_retry(self, row_id: int, attempts: int, next_attempt: float) -> None:
        """Back in the outbox for whichever node finds it due next: the claim goes."""
        await self._pool.execute(
            "UPDATE fanout SET attempts = $2, next_attempt = $3, claimed_by = NULL, claimed_until = NULL WHERE id = $1",
            row_id, attempts, next_attempt,
        )


# -- what the other processes open on a DSN --------------------------------------------------------


class _OwnPool:
    """A small pool of its own on ``dsn``, made on first use (inside the running loop); the
    errors of the database come out as :class:`OSError`, as the SQLite stores' do."""

    def __init__(self, dsn: str, purpose: str, **server_settings: str):
        self._dsn = dsn
        self._settings = {"application_name": f"sendcloud-relay {purpose}", **server_settings}
        self._pool: asyncpg.Pool | None = None
        self._opening: asyncio.Lock | None = None

    async def run(self, fn, *args: Any) -> Any:
        try:
            return await fn(await self._get(), *args)
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            raise OSError(f"spool database: {error}") from error

    async def _get(self) -> asyncpg.Pool:
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self._dsn, min_size=1, max_size=1, timeout=10.0, command_timeout=30.0,
                    server_settings=self._settings, reset=keep_session,
                )
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


def rate_rows(increments: Mapping[WindowKey, int], now: float) -> list[list]:
    """The increments as the columns of one ``unnest``: in key order (two nodes upserting the
    same windows lock them in one order), none old enough to be forgotten in the same statement."""
    rows = sorted(
        (slot, amount) for slot, amount in increments.items() if amount and (slot[2] + 2) * slot[1] >= now
    )
    return [[slot[0] for slot, _ in rows], [slot[1] for slot, _ in rows],
            [slot[2] for slot, _ in rows], [amount for _, amount in rows]]


# One statement, one round trip: add the increments, forget windows no rate can still see
# (skipping rows another node is forgetting right now), and read every window back — the
# rows just written from RETURNING, the others from the statement's snapshot.
_SAVE_RATES = """
WITH added AS (
    INSERT INTO rate_windows (key, period, "window", count)
    SELECT * FROM unnest($1::text[], $2::float8[], $3::bigint[], $4::bigint[])
    ON CONFLICT (key, period, "window") DO UPDATE SET count = rate_windows.count + excluded.count
    RETURNING key, period, "window", count
), forgotten AS (
    DELETE FROM rate_windows WHERE (key, period, "window") IN (
        SELECT key, period, "window" FROM rate_windows WHERE ("window" + 2) * period < $5 FOR UPDATE SKIP LOCKED)
)
SELECT key, period, "window", count FROM added
UNION ALL
SELECT key, period, "window", count FROM rate_windows r
WHERE ("window" + 2) * period >= $5
  AND NOT EXISTS (SELECT 1 FROM added a WHERE (a.key, a.period, a."window") = (r.key, r.period, r."window"))
"""


async def _save_rates(pool: asyncpg.Pool, increments: Mapping[WindowKey, int], now: float) -> dict[WindowKey, int]:
    rows = await pool.fetch(_SAVE_RATES, *rate_rows(increments, now), now)
    return {(key, period, window): count for key, period, window, count in rows}


class PostgresRateStore:
    """:class:`relay.spool.base.RateStore` on the shared database: every process of every node
    saves here each second, so one budget holds for all of them.

    Its own connection commits without waiting for the WAL flush (``synchronous_commit=off``):
    a crash of the database may forget the last fraction of a second of counts, as SQLite's
    rate store does with ``synchronous=NORMAL``; a budget is worth less than a flush per save.
    """

    def __init__(self, dsn: str):
        self._db = _OwnPool(dsn, "rates", synchronous_commit="off")

    async def save(self, increments: Mapping[WindowKey, int] | Counter[WindowKey], now: float) -> dict[WindowKey, int]:
        return await self._db.run(_save_rates, increments, now)

    async def close(self) -> None:
        await self._db.close()


class PostgresSuppressionReader:
    """The shared suppression list read on a connection of its own: what an acceptor process
    (which has no spool) keeps its :class:`SuppressionCache` from."""

    def __init__(self, dsn: str):
        self._db = _OwnPool(dsn, "suppressions")

    async def suppression_version(self) -> int:
        return await self._db.run(suppression_version)

    async def suppressions(self) -> list[SuppressionRow]:
        return await self._db.run(suppressions)

    async def close(self) -> None:
        await self._db.close()
