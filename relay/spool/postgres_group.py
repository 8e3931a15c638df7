"""One group commit on PostgreSQL: the writes that arrived while the previous COMMIT was in flight,
in one transaction, with as few round trips as their kinds allow.

Every write has a :class:`Kind`. A group first runs each kind's writes together, in one call
(``Kind.run`` gets every caller's arguments: a kind that can, writes them all in one statement),
and the counters they add (``tally``) once at the end, summed and in key order. The writes of
one group all arrived while the previous COMMIT was in flight, so any order among them is one
the callers could have seen. If anything fails, the transaction is rolled back and the group runs
again with each write alone in its own SAVEPOINT (its counters with it): only that write's caller
sees its error. If the COMMIT fails, every caller does.

Lock order across nodes, so two nodes' groups never wait on each other in a circle: the kinds
marked ``first`` (they lock the suppression list's version row) before any other, the hot
counter rows last, in key order, in one statement.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import asyncpg

from relay.spool.events_model import StatRow


class WriteRefused(Exception):
    """A write refused on its own merits (not the database failing): its caller's error only."""


# What fails one write, not the process: the savepoint pass gives it to its caller.
WRITE_ERRORS = (asyncpg.PostgresError, OSError, WriteRefused, ValueError)


@dataclass(frozen=True, eq=False)
class Kind:
    """How one kind of write runs: ``run(conn, calls, tally)`` does the calls (each caller's
    arguments) and returns one result per call; counters to add go in ``tally``."""

    run: Callable[[asyncpg.Connection, list[tuple], list[StatRow]], Awaitable[list[Any]]]
    first: bool = False  # locks the suppression version: runs before every other kind


def each(operation: Callable[..., Awaitable[Any]]) -> Kind:
    """A kind whose writes run one after another (a statement or more each) in the group."""

    async def run(conn: asyncpg.Connection, calls: list[tuple], tally: list[StatRow]) -> list[Any]:
        return [await operation(conn, *args) for args in calls]

    return Kind(run)


def by_kind(writes: Iterable[Any]) -> list[tuple[Kind, list[Any]]]:
    """The writes (anything with ``.kind``) bucketed by kind: ``first`` kinds first, then in order of arrival."""
    buckets: dict[Kind, list[Any]] = {}
    for write in writes:
        buckets.setdefault(write.kind, []).append(write)
    return sorted(buckets.items(), key=lambda bucket: not bucket[0].first)


def stat_totals(rows: Iterable[StatRow]) -> list[tuple[str, str, str, str, int]]:
    """Increments summed per counter, in key order: one upsert may touch a row only once, and
    two nodes locking the same counters in one order never deadlock."""
    totals: Counter[tuple[str, str, str, str]] = Counter()
    for hour, group, value, counter, count in rows:
        totals[(hour, group, value, counter)] += count
    return [(*key, totals[key]) for key in sorted(totals)]


async def add_stats(conn: asyncpg.Connection, rows: Iterable[StatRow]) -> None:
    totals = stat_totals(rows)
    if totals:
        await conn.execute(
            "INSERT INTO stats (hour, grp, value, counter, count) "
            "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[]) "
            "ON CONFLICT (hour, grp, value, counter) DO UPDATE SET count = stats.count + excluded.count",
            *(list(column) for column in zip(*totals, strict=True)),
        )


async def _tally_only(conn: asyncpg.Connection, calls: list[tuple], tally: list[StatRow]) -> list[None]:
    for (rows,) in calls:
        tally.extend(rows)
    return [None] * len(calls)


STATS = Kind(_tally_only)  # counters alone (delivery's ``requested``): the group's one upsert writes them


async def run_group(conn: asyncpg.Connection, writes: list[Any]) -> list[tuple[Any, BaseException | None]]:
    """Commit the writes (each with ``.kind`` and ``.args``): each one's result or its own error."""
    outcomes = await _transaction(conn, writes, savepoints=False)
    if outcomes is None:
        outcomes = await _transaction(conn, writes, savepoints=True)
    return [outcomes[write] for write in writes]


async def _transaction(conn: asyncpg.Connection, writes: list[Any],
                       savepoints: bool) -> dict[Any, tuple[Any, BaseException | None]] | None:
    """One committed transaction; None (rolled back) when a write failed without savepoints."""
    outcomes: dict[Any, tuple[Any, BaseException | None]] = {}
    transaction = conn.transaction()
    await transaction.start()
    try:
        if not savepoints:
            tally: list[StatRow] = []
            try:
                for kind, bucket in by_kind(writes):
                    results = await kind.run(conn, [write.args for write in bucket], tally)
                    outcomes.update((write, (result, None)) for write, result in zip(bucket, results, strict=True))
                await add_stats(conn, tally)
            except WRITE_ERRORS:
                await transaction.rollback()
                return None
        else:
            for kind, bucket in by_kind(writes):
                for write in bucket:
                    own: list[StatRow] = []
                    try:
                        async with conn.transaction():  # a SAVEPOINT: only this caller sees its error
                            [result] = await kind.run(conn, [write.args], own)
                            await add_stats(conn, own)
                        outcomes[write] = (result, None)
                    except WRITE_ERRORS as error:
                        outcomes[write] = (None, error)
    except BaseException:
        await transaction.rollback()
        raise
    await transaction.commit()
    return outcomes


async def keep_session(conn: asyncpg.Connection) -> None:
    """The pools' reset on release: nothing beyond asyncpg's own (a transaction left open is
    rolled back, listener callbacks dropped). Its default adds a round trip per release
    (``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``) to undo session state the
    relay never sets on a pooled connection: no session advisory locks (migrations take
    transaction-scoped ones, on a connection of their own), no cursors outside a transaction,
    no LISTEN (``wait_for_work`` listens on a connection of its own), no ``SET`` (settings are
    given at connect), no temporary tables. Prepared statements are asyncpg's cache, kept anyway."""
