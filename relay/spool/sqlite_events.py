"""The SQL of what happens after the 250 (issue #12), as plain functions on a connection.

:class:`relay.spool.sqlite.SqliteSpool` runs the writes through its writer thread (so they
join the group commit with mail) and the reads in its reader thread; the CLI calls the same
functions on a connection of its own. The schema is additive, as the spool's own: tables and
indexes are created if missing, so an older spool.db gains them when opened.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable
from typing import Any

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

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
    event       TEXT NOT NULL,
    fields      TEXT NOT NULL,          -- JSON of the fields as received, without the signature
    applied     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS events_unapplied ON events (id) WHERE applied = 0;
CREATE INDEX IF NOT EXISTS events_received ON events (received_at);
CREATE TABLE IF NOT EXISTS event_keys (
    key      TEXT PRIMARY KEY,
    event_id INTEGER NOT NULL REFERENCES events(id) ON DELETE CASCADE
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS event_keys_event ON event_keys (event_id);
CREATE INDEX IF NOT EXISTS recipients_email_id ON recipients (email_id) WHERE email_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS recipient_status (
    message_id  TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    idx         INTEGER NOT NULL,
    status      TEXT,
    status_time REAL,
    PRIMARY KEY (message_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS recipient_events (
    message_id    TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    idx           INTEGER NOT NULL,
    event         TEXT NOT NULL,
    time          REAL NOT NULL,
    ip            TEXT,
    url           TEXT,
    sub_stat      TEXT,
    sub_stat_desc TEXT
);
CREATE INDEX IF NOT EXISTS recipient_events_of ON recipient_events (message_id, idx);
CREATE TABLE IF NOT EXISTS suppressions (
    address    TEXT NOT NULL,
    account    TEXT NOT NULL DEFAULT '',  -- '' relay-wide (a NULL would defeat the primary key)
    reason     TEXT NOT NULL,
    channels   TEXT NOT NULL,             -- sorted, comma-separated: batch,trigger
    added_at   REAL NOT NULL,
    expires_at REAL,
    source     TEXT,
    PRIMARY KEY (address, account)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS suppression_version (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS stats (
    hour    TEXT NOT NULL,
    grp     TEXT NOT NULL,
    value   TEXT NOT NULL,
    counter TEXT NOT NULL,
    count   INTEGER NOT NULL,
    PRIMARY KEY (hour, grp, value, counter)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fanout (
    id           INTEGER PRIMARY KEY,
    user         TEXT NOT NULL,
    url          TEXT NOT NULL,
    body         BLOB NOT NULL,
    created_at   REAL NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS fanout_due ON fanout (next_attempt);
"""


def create_schema(conn: sqlite3.Connection) -> None:
    conn.executescript(SCHEMA)


# -- received events -----------------------------------------------------------------------


def store_event(conn: sqlite3.Connection, event: ReceivedEvent) -> int | None:
    """Store an event and its dedupe keys; None (nothing stored) when any key is known."""
    if event.keys:
        marks = ",".join("?" * len(event.keys))
        if conn.execute(f"SELECT 1 FROM event_keys WHERE key IN ({marks}) LIMIT 1", event.keys).fetchone():
            return None
    cursor = conn.execute(
        "INSERT INTO events (received_at, event, fields) VALUES (?,?,?)", (event.received_at, event.event, event.fields)
    )
    conn.executemany(
        "INSERT INTO event_keys (key, event_id) VALUES (?,?)", [(key, cursor.lastrowid) for key in event.keys]
    )
    return cursor.lastrowid


def unapplied_events(conn: sqlite3.Connection, limit: int) -> list[ReceivedEvent]:
    """Events stored but not yet applied (a crash between the two), oldest first."""
    rows = conn.execute(
        "SELECT id, received_at, event, fields FROM events WHERE applied = 0 ORDER BY id LIMIT ?", (limit,)
    ).fetchall()
    return [ReceivedEvent(received_at, event, fields, (), id) for id, received_at, event, fields in rows]


def event_target(
    conn: sqlite3.Connection, email_id: str | None, queue_id: str | None, address: str | None
) -> EventTarget | None:
    """The recipient an event is about: by SendCloud's emailId, else by queue ID and address."""
    select = (
        "SELECT r.message_id, r.idx, r.address, m.user, m.account, m.channel, m.label "
        "FROM recipients r JOIN messages m ON m.id = r.message_id "
    )
    row = None
    if email_id:
        row = conn.execute(select + "WHERE r.email_id = ? LIMIT 1", (email_id,)).fetchone()
    if row is None and queue_id and address:
        row = conn.execute(
            select + "WHERE r.message_id = ? AND lower(r.address) = lower(?) ORDER BY r.idx LIMIT 1",
            (queue_id, address),
        ).fetchone()
    return EventTarget(*row) if row else None


def fates(conn: sqlite3.Connection, message_id: str, idx: int | None = None) -> dict[int, Fate]:
    """SendCloud's status and event history of each recipient of a message that has any
    (only recipient ``idx``, given one: the applier reads one recipient per event)."""
    where, args = (
        ("message_id = ?", (message_id,)) if idx is None else ("message_id = ? AND idx = ?", (message_id, idx))
    )
    status = {
        row_idx: (value, time)
        for row_idx, value, time in conn.execute(
            f"SELECT idx, status, status_time FROM recipient_status WHERE {where}", args
        )
    }
    history: dict[int, list[RecipientEvent]] = {}
    for row_idx, *fields in conn.execute(
        "SELECT idx, event, time, ip, url, sub_stat, sub_stat_desc FROM recipient_events "
        f"WHERE {where} ORDER BY time, rowid",
        args,
    ):
        history.setdefault(row_idx, []).append(RecipientEvent(*fields))
    return {
        row_idx: Fate(*status.get(row_idx, (None, None)), tuple(history.get(row_idx, ())))
        for row_idx in sorted(set(status) | set(history))
    }


def apply_event(conn: sqlite3.Connection, applied: Applied) -> None:
    """Everything one event changes, and the event marked applied."""
    target = applied.target
    if target is not None:
        if applied.status is not None:
            conn.execute(
                "INSERT INTO recipient_status (message_id, idx, status, status_time) VALUES (?,?,?,?) "
                "ON CONFLICT (message_id, idx) DO UPDATE SET "
                "status = excluded.status, status_time = excluded.status_time",
                (target.message_id, target.idx, applied.status, applied.status_time),
            )
        if applied.history is not None:
            h = applied.history
            conn.execute(
                "INSERT INTO recipient_events (message_id, idx, event, time, ip, url, sub_stat, sub_stat_desc) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (target.message_id, target.idx, h.event, h.time, h.ip, h.url, h.sub_stat, h.sub_stat_desc),
            )
    if applied.suppression is not None:
        add_suppressions(conn, [applied.suppression])
    add_stats(conn, applied.stats)
    enqueue_fanout(conn, applied.outbox)
    conn.execute("UPDATE events SET applied = 1 WHERE id = ?", (applied.event_id,))


def prune_events(conn: sqlite3.Connection, older_than: float, limit: int) -> int:
    """Forget up to ``limit`` applied events received before ``older_than`` (their keys with them)."""
    return conn.execute(
        "DELETE FROM events WHERE id IN "
        "(SELECT id FROM events WHERE received_at < ? AND applied = 1 ORDER BY id LIMIT ?)",
        (older_than, limit),
    ).rowcount


# -- suppression list ----------------------------------------------------------------------


def _bump_version(conn: sqlite3.Connection) -> None:
    conn.execute(
        "INSERT INTO suppression_version (id, version) VALUES (1, 1) "
        "ON CONFLICT (id) DO UPDATE SET version = version + 1"
    )


def add_suppressions(conn: sqlite3.Connection, rows: Iterable[SuppressionRow]) -> int:
    """Add entries; one already there for the address and account is replaced (the newest reason wins)."""
    values = [
        (address, account or "", reason, ",".join(sorted(channels)), added_at, expires_at, source)
        for address, reason, channels, account, added_at, expires_at, source in rows
    ]
    conn.executemany(
        "INSERT OR REPLACE INTO suppressions (address, account, reason, channels, added_at, expires_at, source) "
        "VALUES (?,?,?,?,?,?,?)",
        values,
    )
    if values:
        _bump_version(conn)
    return len(values)


def remove_suppression(conn: sqlite3.Connection, address: str, account: str | None = None) -> int:
    """Remove the address's entries: every one (``account`` None), or the entry of that account."""
    if account is None:
        count = conn.execute("DELETE FROM suppressions WHERE address = ?", (address,)).rowcount
    else:
        count = conn.execute("DELETE FROM suppressions WHERE address = ? AND account = ?", (address, account)).rowcount
    if count:
        _bump_version(conn)
    return count


def suppressions(conn: sqlite3.Connection) -> list[SuppressionRow]:
    return [
        (
            address,
            reason,
            frozenset(channels.split(",")) if channels else frozenset(),
            account or None,
            added_at,
            expires_at,
            source,
        )
        for address, account, reason, channels, added_at, expires_at, source in conn.execute(
            "SELECT address, account, reason, channels, added_at, expires_at, source "
            "FROM suppressions ORDER BY address, account"
        )
    ]


def suppression_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT version FROM suppression_version WHERE id = 1").fetchone()
    return row[0] if row else 0


# -- statistics ------------------------------------------------------------------------------


def add_stats(conn: sqlite3.Connection, rows: Iterable[StatRow]) -> None:
    conn.executemany(
        "INSERT INTO stats (hour, grp, value, counter, count) VALUES (?,?,?,?,?) "
        "ON CONFLICT (hour, grp, value, counter) DO UPDATE SET count = count + excluded.count",
        list(rows),
    )


def stats(conn: sqlite3.Connection, since_hour: str, until_hour: str | None = None) -> list[StatRow]:
    """Counters of the hours from ``since_hour`` through ``until_hour`` (inclusive; None: to now)."""
    return conn.execute(
        "SELECT hour, grp, value, counter, count FROM stats "
        "WHERE hour >= ? AND hour <= ? ORDER BY hour, grp, value, counter",
        (since_hour, until_hour or "9999"),
    ).fetchall()


# -- fan-out outbox --------------------------------------------------------------------------


def enqueue_fanout(conn: sqlite3.Connection, rows: Iterable[OutboxRow]) -> None:
    conn.executemany(
        "INSERT INTO fanout (user, url, body, created_at, attempts, next_attempt) VALUES (?,?,?,?,?,?)",
        [(row.user, row.url, row.body, row.created_at, row.attempts, row.next_attempt) for row in rows],
    )


def due_fanout(conn: sqlite3.Connection, now: float, limit: int) -> list[OutboxRow]:
    return [
        OutboxRow(user, url, bytes(body), created_at, next_attempt, attempts, id)
        for id, user, url, body, created_at, attempts, next_attempt in conn.execute(
            "SELECT id, user, url, body, created_at, attempts, next_attempt FROM fanout "
            "WHERE next_attempt <= ? ORDER BY next_attempt, id LIMIT ?",
            (now, limit),
        )
    ]


def fanout_done(conn: sqlite3.Connection, row_id: int) -> None:
    """Delivered, or given up: the row goes."""
    conn.execute("DELETE FROM fanout WHERE id = ?", (row_id,))


def fanout_retry(conn: sqlite3.Connection, row_id: int, attempts: int, next_attempt: float) -> None:
    conn.execute("UPDATE fanout SET attempts = ?, next_attempt = ? WHERE id = ?", (attempts, next_attempt, row_id))


# -- the spool's async face ------------------------------------------------------------------


def _on_conn(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A function of a connection as a writer-thread operation (which is handed the store)."""
    return lambda store, *args: fn(store.conn, *args)


class SqliteEvents:
    """The event methods of :class:`relay.spool.sqlite.SqliteSpool` (mixed in): writes join the
    writer thread's group commit, reads run in the reader thread (``_write``, ``_read`` and
    ``_store`` are SqliteSpool's)."""

    _write: Callable[..., Any]
    _read: Callable[..., Any]
    _store: Callable[[], Any]

    async def store_event(self, event: ReceivedEvent) -> int | None:
        return await self._write(_on_conn(store_event), event)

    async def apply_event(self, applied: Applied) -> None:
        await self._write(_on_conn(apply_event), applied)

    async def prune_events(self, older_than: float, limit: int) -> int:
        return await self._write(_on_conn(prune_events), older_than, limit)

    async def add_suppressions(self, rows: list[SuppressionRow]) -> int:
        return await self._write(_on_conn(add_suppressions), list(rows))

    async def remove_suppression(self, address: str, account: str | None = None) -> int:
        return await self._write(_on_conn(remove_suppression), address, account)

    async def add_stats(self, rows: list[StatRow]) -> None:
        await self._write(_on_conn(add_stats), list(rows))

    async def enqueue_fanout(self, rows: list[OutboxRow]) -> None:
        await self._write(_on_conn(enqueue_fanout), list(rows))

    async def fanout_done(self, row_id: int) -> None:
        await self._write(_on_conn(fanout_done), row_id)

    async def fanout_retry(self, row_id: int, attempts: int, next_attempt: float) -> None:
        await self._write(_on_conn(fanout_retry), row_id, attempts, next_attempt)

    async def unapplied_events(self, limit: int) -> list[ReceivedEvent]:
        return await self._read(unapplied_events, self._store().conn, limit)

    async def event_target(self, email_id: str | None, queue_id: str | None, address: str | None) -> EventTarget | None:
        return await self._read(event_target, self._store().conn, email_id, queue_id, address)

    async def fates(self, message_id: str, idx: int | None = None) -> dict[int, Fate]:
        return await self._read(fates, self._store().conn, message_id, idx)

    async def suppressions(self) -> list[SuppressionRow]:
        return await self._read(suppressions, self._store().conn)

    async def suppression_version(self) -> int:
        return await self._read(suppression_version, self._store().conn)

    async def stats(self, since_hour: str, until_hour: str | None = None) -> list[StatRow]:
        return await self._read(stats, self._store().conn, since_hour, until_hour)

    async def due_fanout(self, now: float, limit: int) -> list[OutboxRow]:
        return await self._read(due_fanout, self._store().conn, now, limit)


class SqliteSuppressionReader:
    """The suppression list read from the spool's file on a connection of its own, off the loop:
    what an acceptor process (which has no spool) keeps its :class:`SuppressionCache` from."""

    def __init__(self, path):
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def _query(self, fn: Callable[[sqlite3.Connection], Any], empty: Any) -> Any:
        if self._conn is None:
            self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=10.0)
            self._conn.execute("PRAGMA busy_timeout=10000")
        try:
            return fn(self._conn)
        except sqlite3.OperationalError as error:
            if "no such table" in str(error):  # a spool the main process has not opened yet
                return empty
            raise

    async def suppression_version(self) -> int:
        return await asyncio.to_thread(self._query, suppression_version, 0)

    async def suppressions(self) -> list[SuppressionRow]:
        return await asyncio.to_thread(self._query, suppressions, [])

    async def close(self) -> None:
        if self._conn is not None:
            await asyncio.to_thread(self._conn.close)
            self._conn = None
