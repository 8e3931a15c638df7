"""The embedded spool: SQLite in WAL mode with ``synchronous=FULL`` and group commit.

Every write goes through one writer thread. While it waits for one commit's fsync, new
operations pile up in its queue; the next transaction takes all of them, so N concurrent
sessions share one fsync instead of paying N (the idea of PostgreSQL's group commit, sized by
load with no timer). A failed operation is rolled back to its own savepoint and only its
caller sees the error: one bad message never costs the others their ``250``.

Reads run on a second connection in a single reader thread: WAL lets them proceed while the
writer commits, and neither ever blocks the event loop. :class:`SpoolStore` holds all SQL as
plain synchronous methods, so the CLI's ``queue`` commands use the very same code on their
own connection while the server runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.lines import header_length
from relay.spool.base import PENDING_MESSAGES, BodyGone, Cursor, ListQuery, SpoolMissing, WindowKey
from relay.spool.events_model import NO_ROWS, OutcomeRows
from relay.spool.model import (
    NewMessage,
    QueuedMessage,
    Recipient,
    RecipientUpdate,
    State,
    is_eight_bit,
    piece_chunks,
)
from relay.spool.sqlite_events import SqliteEvents, add_stats, create_schema, enqueue_fanout

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id          TEXT PRIMARY KEY,
    received_at REAL NOT NULL,
    user        TEXT NOT NULL,
    listener    TEXT NOT NULL,
    client      TEXT NOT NULL,
    account     TEXT NOT NULL,
    channel     TEXT NOT NULL,
    sender      TEXT NOT NULL,
    size        INTEGER NOT NULL,
    label       INTEGER,
    mail_from   TEXT,
    eight_bit   INTEGER NOT NULL DEFAULT 0,
    pending     INTEGER NOT NULL DEFAULT 1  -- 0 once every recipient is final (its body row is gone)
);
CREATE TABLE IF NOT EXISTS bodies (  -- apart from messages, so pruning and scans never page through them
    message_id  TEXT PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
    body        BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS recipients (
    message_id   TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    idx          INTEGER NOT NULL,
    address      TEXT NOT NULL,
    state        TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_reply   TEXT,
    email_id     TEXT,
    PRIMARY KEY (message_id, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS recipients_pending
    ON recipients (next_attempt) WHERE state IN ('queued', 'deferred');
CREATE INDEX IF NOT EXISTS recipients_pending_messages  -- `queue list`: pending messages in ID order
    ON recipients (message_id) WHERE state IN ('queued', 'deferred');
"""

# Made once the columns they name exist (a spool.db of an older release gets them on open).
_LATE_SCHEMA = """
CREATE INDEX IF NOT EXISTS messages_final  -- purge_final walks only final messages, oldest first
    ON messages (received_at) WHERE pending = 0;
CREATE INDEX IF NOT EXISTS messages_pending_accounts  -- stranded: which accounts have mail waiting
    ON messages (account) WHERE pending = 1;
"""

# Running counts for pending_summary (every /metrics scrape), kept by triggers in the same
# transaction as the rows they count: 'messages' (a body row each), 'queued', 'deferred'.
_COUNTS_SCHEMA = """
CREATE TABLE spool_counts (name TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
CREATE TRIGGER spool_counts_body_in AFTER INSERT ON bodies
    BEGIN UPDATE spool_counts SET n = n + 1 WHERE name = 'messages'; END;
CREATE TRIGGER spool_counts_body_out AFTER DELETE ON bodies
    BEGIN UPDATE spool_counts SET n = n - 1 WHERE name = 'messages'; END;
CREATE TRIGGER spool_counts_recipient_in AFTER INSERT ON recipients
    BEGIN UPDATE spool_counts SET n = n + 1 WHERE name = new.state; END;
CREATE TRIGGER spool_counts_recipient_moved AFTER UPDATE OF state ON recipients WHEN old.state IS NOT new.state
    BEGIN
        UPDATE spool_counts SET n = n - 1 WHERE name = old.state;
        UPDATE spool_counts SET n = n + 1 WHERE name = new.state;
    END;
CREATE TRIGGER spool_counts_recipient_out AFTER DELETE ON recipients
    BEGIN UPDATE spool_counts SET n = n - 1 WHERE name = old.state; END;
INSERT INTO spool_counts (name, n) SELECT 'messages', COUNT(*) FROM bodies;
INSERT INTO spool_counts (name, n) SELECT 'queued', COUNT(*) FROM recipients WHERE state = 'queued';
INSERT INTO spool_counts (name, n) SELECT 'deferred', COUNT(*) FROM recipients WHERE state = 'deferred';
"""

# Columns added after the first release: added to an existing spool.db when it is opened,
# with the value for the rows already there (SQL over the row; None: the column's default).
# They predate the bodies table, so the body is still messages.body when they are added.
_ADDED_COLUMNS = {
    "label": ("INTEGER", None),
    "mail_from": ("TEXT", None),
    "eight_bit": ("INTEGER NOT NULL DEFAULT 0", "has_eight_bit(body)"),
}

_PURGE_BATCH = 500  # final messages forgotten per transaction: other writes commit in between
_BLOB_CHUNK = 256 * 1024  # bodies are written and read in pieces of this size
_PENDING = (State.QUEUED.value, State.DEFERRED.value)
_MESSAGE_COLUMNS = "id, received_at, user, listener, client, account, channel, sender, size, label, mail_from, eight_bit"


def connect(path: Path) -> sqlite3.Connection:
    """A connection with the durability settings every user of the spool must share."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # fsync the WAL at every commit
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=10000")
    conn.executescript(_SCHEMA)
    create_schema(conn)  # events, statistics, suppressions, fan-out (relay/spool/sqlite_events.py)
    present = _columns(conn)
    for column, (kind, existing) in _ADDED_COLUMNS.items():
        if column not in present:
            _add_column(conn, column, kind, existing)
    if "body" in present:
        _migrate(conn, _move_bodies)
    conn.executescript(_LATE_SCHEMA)
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'spool_counts'").fetchone() is None:
        _migrate(conn, _start_counts)
    return conn


def _columns(conn: sqlite3.Connection) -> set[str]:
    return {row[1] for row in conn.execute("PRAGMA table_info(messages)")}


def _migrate(conn: sqlite3.Connection, step: Callable[[sqlite3.Connection], None]) -> None:
    """Run a one-time step of an upgrade in one write transaction; the step checks again inside
    it whether it is still needed, so two processes opening the old file at once do it once."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        step(conn)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _move_bodies(conn: sqlite3.Connection) -> None:
    """An old spool.db kept bodies in messages.body (NULL once final): move them to ``bodies``."""
    present = _columns(conn)
    if "body" not in present:
        return
    if "pending" not in present:
        conn.execute("ALTER TABLE messages ADD COLUMN pending INTEGER NOT NULL DEFAULT 1")
    conn.execute("UPDATE messages SET pending = (body IS NOT NULL)")
    conn.execute("INSERT INTO bodies (message_id, body) SELECT id, body FROM messages WHERE body IS NOT NULL")
    conn.execute("ALTER TABLE messages DROP COLUMN body")


def _start_counts(conn: sqlite3.Connection) -> None:
    """The running counts, counted once from the rows (a new spool, or one of an older release)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'spool_counts'").fetchone() is None:
        for statement in _statements(_COUNTS_SCHEMA):
            conn.execute(statement)


def _statements(script: str) -> list[str]:
    """A script's statements one by one (executescript would commit the open transaction)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    return statements


def _add_column(conn: sqlite3.Connection, column: str, kind: str, existing: str | None) -> None:
    """Add a column and fill it for the rows already there, in one transaction."""
    conn.create_function("has_eight_bit", 1, lambda body: body is not None and is_eight_bit((body,)))
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(f"ALTER TABLE messages ADD COLUMN {column} {kind}")
        if existing is not None:
            conn.execute(f"UPDATE messages SET {column} = {existing} WHERE body IS NOT NULL")
        conn.execute("COMMIT")
    except sqlite3.OperationalError as error:  # another process added it meanwhile
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if "duplicate column" not in str(error):
            raise


class SpoolStore:
    """All SQL of the spool, as synchronous methods on one connection."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    # -- writes ---------------------------------------------------------------------------

    def insert(self, message: NewMessage) -> None:
        """The body goes in as a zeroblob written piece after piece, in chunks: bound as a
        parameter, it would have to be one object, and SQLite would copy it whole twice (the
        bound value, then the record it builds)."""
        size = message.size
        self.conn.execute(
            f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                message.id, message.received_at, message.user, message.listener, message.client,
                message.account, message.channel, message.sender, size,
                message.label, message.mail_from, message.eight_bit,
            ),
        )
        cursor = self.conn.execute("INSERT INTO bodies (message_id, body) VALUES (?, zeroblob(?))", (message.id, size))
        if size:
            with self.conn.blobopen("bodies", "body", cursor.lastrowid) as blob:
                for piece in message.pieces:
                    for chunk in piece_chunks(piece, _BLOB_CHUNK):
                        blob.write(chunk)
        self.conn.executemany(
            "INSERT INTO recipients (message_id, idx, address, state, next_attempt) VALUES (?,?,?,?,?)",
            [
                (message.id, idx, address, State.QUEUED.value, message.received_at)
                for idx, address in enumerate(message.recipients)
            ],
        )

    def record(self, updates: Iterable[RecipientUpdate], new_messages: Iterable[NewMessage] = (),
               rows: OutcomeRows = NO_ROWS) -> None:
        """Store delivery outcomes and the DSNs they caused, in one transaction, and the events
        stage's rows for them in a savepoint of their own (see :meth:`Spool.record`)."""
        updates = list(updates)
        self._record_outcomes(updates, new_messages)
        if rows.stats or rows.outbox:
            self.conn.execute("SAVEPOINT outcome_rows")
            try:
                add_stats(self.conn, rows.stats)
                enqueue_fanout(self.conn, rows.outbox)
            except Exception:  # whatever it is, the outcome stands
                self.conn.execute("ROLLBACK TO outcome_rows")
                log.exception("%s: could not count or fan out the delivery outcome; recorded without it",
                              ", ".join(sorted({update.message_id for update in updates})))
            self.conn.execute("RELEASE outcome_rows")

    def _record_outcomes(self, updates: Iterable[RecipientUpdate], new_messages: Iterable[NewMessage]) -> None:
        touched = set()
        for update in updates:
            self.conn.execute(
                "UPDATE recipients SET state=?, attempts=?, next_attempt=?, last_reply=?, "
                "email_id=COALESCE(?, email_id) WHERE message_id=? AND idx=?",
                (
                    update.state.value, update.attempts, update.next_attempt, update.last_reply,
                    update.email_id, update.message_id, update.idx,
                ),
            )
            touched.add(update.message_id)
        for message in new_messages:
            self.insert(message)
        for message_id in touched:
            if self.conn.execute(
                "DELETE FROM bodies WHERE message_id=? AND NOT EXISTS "
                "(SELECT 1 FROM recipients WHERE message_id=? AND state IN (?,?))",
                (message_id, message_id, *_PENDING),
            ).rowcount:
                self.conn.execute("UPDATE messages SET pending=0 WHERE id=?", (message_id,))

    def retry(self, message_id: str | None = None) -> int:
        """Make pending recipients due now (one message, or every deferred one): `flush`."""
        if message_id is None:
            cursor = self.conn.execute(
                "UPDATE recipients SET next_attempt=0 WHERE state=?", (State.DEFERRED.value,)
            )
        else:
            cursor = self.conn.execute(
                "UPDATE recipients SET next_attempt=0 WHERE message_id=? AND state IN (?,?)",
                (message_id, *_PENDING),
            )
        return cursor.rowcount

    def delete(self, message_id: str) -> bool:
        return self.conn.execute("DELETE FROM messages WHERE id=?", (message_id,)).rowcount > 0

    def probe(self, now: float) -> None:
        """A real write for /readyz: it is committed and fsynced like a message would be."""
        self.conn.execute("CREATE TABLE IF NOT EXISTS health (id INTEGER PRIMARY KEY CHECK (id = 1), checked_at REAL)")
        self.conn.execute("INSERT OR REPLACE INTO health (id, checked_at) VALUES (1, ?)", (now,))

    def purge_final(self, older_than: float, limit: int = _PURGE_BATCH) -> int:
        """Forget up to ``limit`` messages whose recipients are all final and that arrived
        before ``older_than``, oldest first (by the partial index messages_final)."""
        return self.conn.execute(
            "DELETE FROM messages WHERE id IN (SELECT id FROM messages INDEXED BY messages_final "
            "WHERE pending = 0 AND received_at < ? ORDER BY received_at LIMIT ?)",
            (older_than, limit),
        ).rowcount

    # -- reads ----------------------------------------------------------------------------

    def due(self, now: float, limit: int, accounts: Collection[str], after: Cursor | None = None) -> list[QueuedMessage]:
        """Messages of ``accounts`` with a recipient due, each with all its due recipients."""
        return self._due(now, limit, accounts, after)

    def stranded(self, now: float, limit: int, accounts: Collection[str], after: Cursor | None = None) -> list[QueuedMessage]:
        """As :meth:`due`, for the messages of every account *not* in ``accounts``.

        The accounts with mail waiting come first, from their index (a step per account, not
        per message): walking the due recipients for the few of other accounts would read the
        whole backlog on every poll."""
        waiting = [row[0] for row in self.conn.execute(
            "WITH RECURSIVE waiting(account) AS ("
            "SELECT MIN(account) FROM messages WHERE pending = 1 UNION ALL "
            "SELECT (SELECT MIN(account) FROM messages WHERE pending = 1 AND account > waiting.account) "
            "FROM waiting WHERE waiting.account IS NOT NULL) "
            "SELECT account FROM waiting WHERE account IS NOT NULL"
        )]
        configured = set(accounts)
        unconfigured = [account for account in waiting if account not in configured]
        return self._due(now, limit, unconfigured, after) if unconfigured else []

    def _due(self, now: float, limit: int, accounts: Collection[str], after: Cursor | None) -> list[QueuedMessage]:
        """Walks the partial index in (next_attempt, message_id) order (literal states, so SQLite
        sees that it applies; CROSS JOIN keeps recipients the outer loop) until ``limit``
        distinct messages, then reads their due recipients by primary key: the work is the page."""
        if limit <= 0:
            return []
        names = list(accounts)
        resume, resume_args = ("AND (r.next_attempt, r.message_id) > (?, ?) ", after) if after else ("", ())
        self.conn.execute("BEGIN")  # one snapshot: the recipients read are those the walk chose by
        try:
            walk = self.conn.execute(
                "SELECT r.message_id FROM recipients AS r CROSS JOIN messages AS m ON m.id = r.message_id "
                f"WHERE r.state IN ('queued', 'deferred') AND r.next_attempt <= ? {resume}"
                f"AND m.account IN ({','.join('?' * len(names))}) ORDER BY r.next_attempt, r.message_id",
                (now, *resume_args, *names),
            )
            ids: dict[str, None] = {}  # in the order first met: earliest due first
            try:
                for (message_id,) in walk:
                    ids[message_id] = None
                    if len(ids) == limit:
                        break
            finally:
                walk.close()
            recipients: dict[str, list[Recipient]] = {message_id: [] for message_id in ids}
            chosen = list(ids)
            for start in range(0, len(chosen), 500):  # stay under SQLite's bound-variable limit
                chunk = chosen[start : start + 500]
                for row in self.conn.execute(
                    "SELECT message_id, idx, address, state, attempts, next_attempt, last_reply, email_id FROM recipients "
                    f"WHERE message_id IN ({','.join('?' * len(chunk))}) AND state IN ('queued', 'deferred') "
                    "AND next_attempt <= ? ORDER BY message_id, idx",
                    (*chunk, now),
                ):
                    recipients[row[0]].append(_recipient(row))
            found = self._messages(recipients)
        finally:
            self.conn.execute("COMMIT")
        order = {message_id: position for position, message_id in enumerate(chosen)}
        return sorted(found, key=lambda message: order[message.id])

    def body_rowid(self, message_id: str) -> int | None:
        """Where a body is now, seen outside any delivery's snapshot (None: deleted, or final)."""
        row = self.conn.execute("SELECT rowid FROM bodies WHERE message_id=?", (message_id,)).fetchone()
        return None if row is None else row[0]

    def read(self, message_id: str, offset: int, through_header: bool = False) -> tuple[bytes, int] | None:
        """A chunk of a body from ``offset``, and the body's size; None if the message is gone or final.

        With ``through_header``, as many chunks as it takes to reach the end of the header
        section. Each call is one short read transaction that finds the row by its id again,
        so a message deleted between two calls is seen as gone, never read as another row
        (rowids are reused), and no snapshot is held open while the chunk is sent upstream.
        """
        self.conn.execute("BEGIN")  # one snapshot: the row found is the row read
        try:
            row = self.conn.execute("SELECT rowid, length(body) FROM bodies WHERE message_id=?", (message_id,)).fetchone()
            if row is None or row[1] is None:
                return None
            if offset >= row[1]:
                return b"", row[1]
            with self.conn.blobopen("bodies", "body", row[0], readonly=True) as blob:
                blob.seek(offset)
                data = blob.read(_BLOB_CHUNK)
                while through_header and header_length(data) is None and offset + len(data) < row[1]:
                    data += blob.read(_BLOB_CHUNK)
            return data, row[1]
        finally:
            self.conn.execute("COMMIT")

    def get(self, message_id: str) -> QueuedMessage | None:
        rows = self.conn.execute(
            "SELECT message_id, idx, address, state, attempts, next_attempt, last_reply, email_id "
            "FROM recipients WHERE message_id=? ORDER BY idx",
            (message_id,),
        ).fetchall()
        found = self._messages({message_id: [_recipient(row) for row in rows]})
        return found[0] if found else None

    def list(self, query: ListQuery = PENDING_MESSAGES) -> list[QueuedMessage]:
        rows = self.conn.execute(*list_sql(query)).fetchall()
        recipients = self._recipients_of([row[0] for row in rows])
        return [QueuedMessage(*row, recipients=recipients.get(row[0], [])) for row in rows]

    def _recipients_of(self, ids: list[str]) -> dict[str, list[Recipient]]:
        """Every recipient of these messages, found by the recipients' primary key."""
        found: dict[str, list[Recipient]] = {}
        for start in range(0, len(ids), 500):  # stay under SQLite's bound-variable limit
            chunk = ids[start : start + 500]
            for row in self.conn.execute(
                "SELECT message_id, idx, address, state, attempts, next_attempt, last_reply, email_id "
                f"FROM recipients WHERE message_id IN ({','.join('?' * len(chunk))}) ORDER BY message_id, idx",
                chunk,
            ):
                found.setdefault(row[0], []).append(_recipient(row))
        return found

    def counts(self) -> dict[str, int]:
        return dict(self.conn.execute("SELECT state, COUNT(*) FROM recipients GROUP BY state").fetchall())

    def pending_summary(self) -> tuple[int, dict[str, int], float | None]:
        """For metrics on every scrape, so in constant time whatever the backlog: messages not
        final and recipients waiting by state from the running counts (spool_counts), and the
        arrival of the oldest waiting message (queue IDs sort by time: the first entry of the
        pending index; literal states, so SQLite sees that the partial index applies)."""
        self.conn.execute("BEGIN")  # one snapshot: counts and oldest agree
        try:
            counts = dict(self.conn.execute("SELECT name, n FROM spool_counts").fetchall())
            row = self.conn.execute(
                "SELECT m.received_at FROM messages m WHERE m.id = (SELECT MIN(message_id) FROM recipients "
                "WHERE state IN ('queued', 'deferred'))"
            ).fetchone()
        finally:
            self.conn.execute("COMMIT")
        by_state = {state: counts[state] for state in _PENDING if counts.get(state)}
        return counts.get("messages", 0), by_state, row[0] if row else None

    def _messages(self, recipients: dict[str, list[Recipient]]) -> list[QueuedMessage]:
        if not recipients:
            return []
        ids = list(recipients)
        found = []
        for start in range(0, len(ids), 500):  # stay under SQLite's bound-variable limit
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id IN ({marks})", chunk
            ):
                found.append(QueuedMessage(*row, recipients=recipients[row[0]]))
        found.sort(key=lambda message: message.id)
        return found


def list_sql(query: ListQuery) -> tuple[str, list]:
    """One page of `queue list` as SQL and its parameters: the work is the page, not the spool.

    Pending messages are found by walking ``recipients_pending_messages`` in message-ID order
    (literal states, so SQLite sees that the partial index applies), each joined to its message
    by primary key, and the walk stops at ``limit``; with final messages included the walk is
    over the messages' primary key instead. Filters are checked per message on the way (``to``
    by the recipients' primary key), so a selective filter walks further, never sorts.
    """
    where, parameters = [], []
    for condition, value in (
        ("m.id > ?", query.after),
        ("m.user = ?", query.user),
        ("m.received_at >= ?", query.since),
        ("m.received_at < ?", query.before),
        ("lower(m.sender) = ?", query.sender.lower() if query.sender is not None else None),
        ("EXISTS (SELECT 1 FROM recipients t WHERE t.message_id = m.id AND lower(t.address) = ?)",
         query.to.lower() if query.to is not None else None),
        ("EXISTS (SELECT 1 FROM recipient_status rs WHERE rs.message_id = m.id AND rs.status = ?)", query.status),
        # by the partial index recipients_email_id: the one message that has it
        ("m.id IN (SELECT e.message_id FROM recipients e WHERE e.email_id = ?)", query.email_id),
    ):
        if value is not None:
            where.append(condition)
            parameters.append(value)
    columns = ", ".join(f"m.{column}" for column in _MESSAGE_COLUMNS.split(", "))
    if query.pending_only:
        if query.state is not None:
            where.append("p.state = ?")
            parameters.append(query.state.value)
        sql = (
            f"SELECT {columns} FROM recipients p INDEXED BY recipients_pending_messages "
            "JOIN messages m ON m.id = p.message_id "
            f"WHERE p.state IN ('queued', 'deferred'){''.join(f' AND {w}' for w in where)} "
            "GROUP BY p.message_id ORDER BY p.message_id"
        )
    else:
        if query.state is not None:
            where.append("EXISTS (SELECT 1 FROM recipients s WHERE s.message_id = m.id AND s.state = ?)")
            parameters.append(query.state.value)
        sql = f"SELECT {columns} FROM messages m{' WHERE ' + ' AND '.join(where) if where else ''} ORDER BY m.id"
    if query.limit is not None:
        sql += " LIMIT ?"
        parameters.append(query.limit)
    return sql, parameters


def _recipient(row: tuple) -> Recipient:
    message_id, idx, address, state, attempts, next_attempt, last_reply, email_id = row
    return Recipient(message_id, idx, address, State(state), attempts, next_attempt, last_reply, email_id)


_STOP = object()
_CHECKPOINT_EVERY = 1.0  # seconds between checkpoints
_WAL_BOUND = 16 * 2**20  # bytes of WAL past which the log is restarted (or truncated when idle)


def after_passive(log_bytes: int, file_bytes: int, writer_idle: bool) -> str | None:
    """The checkpoint to run after a PASSIVE one left ``log_bytes`` in a WAL file of ``file_bytes``.

    PASSIVE copies committed pages back without ever blocking a commit, but under steady load
    the writer always has a newer transaction, so the WAL is never found wholly copied and
    never starts over. Past the bound, RESTART does; the writer runs it between two groups
    (from another connection it would wait for a gap that back-to-back commits never leave),
    copying the little PASSIVE just left, so the next commit waits only for that. TRUNCATE
    also gives the file's disk space back, so it runs only while the writer is idle."""
    if file_bytes >= _WAL_BOUND and writer_idle:
        return "TRUNCATE"
    if log_bytes >= _WAL_BOUND:
        return "RESTART"
    return None


_SNAPSHOT_FOR = 0.5  # seconds a delivery may keep one read snapshot (and blob handle) for its chunks
_RESTART_WAIT_MS = 100  # a RESTART or TRUNCATE waits this long for readers, then leaves it to the next try
_IDLE_BODY_CONNECTIONS = 8  # body readers' connections kept open between deliveries
_BODY_CACHE_KIB = 256  # a body reader's page cache: a body is read once, in order, so caching it gains nothing


def keep_snapshot(age: float, restarting: bool) -> bool:
    """Whether a body reader keeps its read transaction for the next chunk, ``age`` seconds after it began.

    A new blob handle walks the body's overflow pages from the start to its offset, so a
    handle per chunk makes reading a body quadratic (40 chunks of a 10 MB body: 110 ms,
    against 7 ms with one handle). But an open snapshot holds back WAL checkpoints: PASSIVE
    cannot copy frames committed after it, and RESTART waits until it ends. So a snapshot is
    kept for a bounded time, and not at all while the WAL is to start over (the writer's RESTART,
    the checkpointer's TRUNCATE: :func:`after_passive`)."""
    return age < _SNAPSHOT_FOR and not restarting


def body_connection(path: Path) -> sqlite3.Connection:
    """A read-only connection for :class:`BodyReader` (the file's schema and settings are the spool's)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.execute("PRAGMA query_only=ON")
    conn.execute(f"PRAGMA cache_size=-{_BODY_CACHE_KIB}")
    return conn


class BodyReader:
    """One delivery's walk through one body: a read transaction and a blob handle, read in
    order, kept across chunks while :func:`keep_snapshot` allows, then opened again at the
    offset reached. Synchronous: the spool's reader thread runs it."""

    def __init__(self, conn: sqlite3.Connection, message_id: str, size: int, clock: Callable[[], float] = time.monotonic):
        self.message_id = message_id
        self._conn: sqlite3.Connection | None = conn
        self._size = size
        self._clock = clock
        self._rowid: int | None = None  # the row first read: a body of the same ID elsewhere is not this one
        self._blob: sqlite3.Blob | None = None
        self._began = 0.0

    def read(self, offset: int, rowid_now: int | None, restarting: bool) -> bytes:
        """The chunk at ``offset``; BodyGone if the body is no longer where it was (``rowid_now``
        is where it is now, looked up outside this reader's snapshot)."""
        if rowid_now is None or (self._rowid is not None and rowid_now != self._rowid):
            self._end()
            raise BodyGone(self.message_id)
        if self._blob is None:
            self._begin(offset)
        elif self._blob.tell() != offset:
            self._blob.seek(offset)
        data = self._blob.read(_BLOB_CHUNK)
        if not keep_snapshot(self._clock() - self._began, restarting):
            self._end()
        return data

    def close(self) -> sqlite3.Connection | None:
        """End the read; the connection, fit for the next reader (None if it was lost to an error)."""
        try:
            self._end()
        except sqlite3.Error:
            if self._conn is not None:
                self._conn.close()
            self._conn = None
        conn, self._conn = self._conn, None
        return conn

    def _begin(self, offset: int) -> None:
        assert self._conn is not None, "body reader closed"
        self._conn.execute("BEGIN")
        self._began = self._clock()
        try:
            row = self._conn.execute("SELECT rowid, length(body) FROM bodies WHERE message_id=?", (self.message_id,)).fetchone()
            if row is None or row[1] != self._size or (self._rowid is not None and row[0] != self._rowid):
                raise BodyGone(self.message_id)
            self._rowid = row[0]
            self._blob = self._conn.blobopen("bodies", "body", row[0], readonly=True)
            self._blob.seek(offset)
        except BaseException:
            self._end()
            raise

    def _end(self) -> None:
        blob, self._blob = self._blob, None
        if blob is not None:
            blob.close()
        if self._conn is not None and self._conn.in_transaction:
            self._conn.execute("COMMIT")


class SqliteSpool(SqliteEvents):
    """Async face of the spool for the server: group-committed writes, threaded reads."""

    def __init__(self, path: Path, commit_timeout: float = 30.0, *, create: bool = True):
        self.path = path
        self._create = create  # False: `queue` on a spool that is not there says so instead
        self.commits = 0  # one fsync of the WAL each: the number `bench/` divides by messages
        self.operations = 0
        self._commit_timeout = commit_timeout  # spool.commit_timeout: a write waits no longer
        self._group_started: float | None = None  # time.monotonic() while the writer runs a group
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="spool-reader")
        self._read_store: SpoolStore | None = None
        self._idle_body_connections: list[sqlite3.Connection] = []  # for BodyReader, kept between deliveries
        self._checkpointer: threading.Thread | None = None
        self._closing = threading.Event()
        self._restart_wanted = threading.Event()  # set by the checkpointer, done by the writer between groups
        self._starting = threading.Lock()  # a write is started by the writer or withdrawn by its caller, never both
        self._truncating = threading.Event()  # while the checkpointer's TRUNCATE waits for readers

    async def open(self) -> None:
        if not self._create and not await asyncio.to_thread(self.path.exists):
            raise SpoolMissing(f"no spool at {self.path}")
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._writer = threading.Thread(target=self._write_loop, args=(ready,), name="spool-writer", daemon=True)
        self._writer.start()
        await asyncio.wrap_future(ready)
        self._read_store = SpoolStore(await self._read(connect, self.path))
        self._closing.clear()
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="spool-checkpointer", daemon=True)
        self._checkpointer.start()

    async def close(self) -> None:
        if self._checkpointer is not None:
            self._closing.set()
            await asyncio.to_thread(self._checkpointer.join)
            self._checkpointer = None
        if self._writer is not None:
            self._queue.put(_STOP)
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        if self._read_store is not None:
            await self._read(self._close_body_connections)
            await self._read(self._read_store.conn.close)
            self._read_store = None
        self._reader.shutdown(wait=True)

    # -- writes: each awaits the commit (and fsync) of the group it joined ------------------

    async def store(self, message: NewMessage) -> None:
        await self._write(SpoolStore.insert, message)

    async def record(self, updates: list[RecipientUpdate], new_messages: list[NewMessage] = (),
                     rows: OutcomeRows = NO_ROWS) -> set[str]:
        await self._write(SpoolStore.record, updates, list(new_messages), rows)
        return set()  # one node: nobody else can take a message over

    # -- leases: one relay per file, so it holds every message for ever ---------------------------

    async def renew(self, message_ids: Collection[str]) -> set[str]:
        return set()

    async def release(self, message_ids: Collection[str]) -> None:
        return None

    async def wait_for_work(self, timeout: float) -> bool:
        """No other process announces work here (`queue retry`/`flush` is found by the next poll)."""
        await asyncio.sleep(timeout)
        return False

    async def purge_final(self, older_than: float) -> int:
        """In batches, each its own write: mail stored meanwhile commits between them."""
        total = 0
        while (purged := await self._write(SpoolStore.purge_final, older_than)) > 0:
            total += purged
            if purged < _PURGE_BATCH:
                break
        return total

    async def retry(self, message_id: str | None = None) -> int:
        return await self._write(SpoolStore.retry, message_id)

    async def delete(self, message_id: str) -> bool:
        return await self._write(SpoolStore.delete, message_id)

    # -- reads ------------------------------------------------------------------------------

    async def due(self, now: float, limit: int, accounts: Collection[str], after: Cursor | None = None) -> list[QueuedMessage]:
        return await self._read(self._store().due, now, limit, accounts, after)

    async def stranded(self, now: float, limit: int, accounts: Collection[str],
                       after: Cursor | None = None) -> list[QueuedMessage]:
        return await self._read(self._store().stranded, now, limit, accounts, after)

    async def start(self, message_id: str) -> tuple[bytes, int] | None:
        """The first bytes of a body, through the end of its header section, and its size;
        None if the message is gone or final."""
        return await self._read(self._store().read, message_id, 0, True)

    async def chunks(self, message_id: str, offset: int, size: int) -> AsyncIterator[bytes]:
        """The body of ``size`` bytes from ``offset`` on, a chunk per read; BodyGone if it is deleted meanwhile.

        One :class:`BodyReader` (a connection of its own, one blob handle) serves the whole
        walk, in the reader thread, and the next chunk is read while the caller sends this one.
        """
        if offset >= size:
            return
        reader = await self._read(self._open_body, message_id, size)
        ahead: asyncio.Future | None = None
        try:
            ahead = self._read(self._read_body, reader, offset)
            while ahead is not None:
                chunk = await ahead
                offset += len(chunk)
                ahead = self._read(self._read_body, reader, offset) if offset < size else None
                yield chunk
        finally:
            if ahead is not None:  # stopped early: the read ahead's outcome is nobody's
                ahead.add_done_callback(_consume)
            try:
                self._reader.submit(self._close_body, reader)  # after that read: the executor keeps order
            except RuntimeError:  # the spool was closed first: no reader thread left to use the connection
                self._discard_body(reader)

    async def counts(self) -> dict[str, int]:
        return await self._read(self._store().counts)

    async def pending_summary(self) -> tuple[int, dict[str, int], float | None]:
        return await self._read(self._store().pending_summary)

    async def list(self, query: ListQuery = PENDING_MESSAGES) -> list[QueuedMessage]:
        return await self._read(self._store().list, query)

    async def get(self, message_id: str) -> QueuedMessage | None:
        return await self._read(self._store().get, message_id)

    async def probe(self, now: float) -> None:
        await self._write(SpoolStore.probe, now)

    def unavailable(self) -> str | None:
        """The watchdog: a dead writer thread, or one stuck in a group longer than commit_timeout."""
        if self._writer is None or not self._writer.is_alive():
            return "the spool writer thread is not running"
        started = self._group_started
        if started is not None and time.monotonic() - started > self._commit_timeout:
            return f"the spool writer has been stuck in a commit for {time.monotonic() - started:.0f}s"
        return None

    @property
    def spill_directory(self) -> Path:
        return self.path.parent

    def _store(self) -> SpoolStore:
        assert self._read_store is not None, "spool not open"
        return self._read_store

    # -- body readers: run in the reader thread only, so the idle connections need no lock ---

    def _open_body(self, message_id: str, size: int) -> BodyReader:
        conn = self._idle_body_connections.pop() if self._idle_body_connections else body_connection(self.path)
        return BodyReader(conn, message_id, size)

    def _read_body(self, reader: BodyReader, offset: int) -> bytes:
        """A chunk from the reader's snapshot, once the body is seen still there now (a
        `queue delete` meanwhile is BodyGone, as with a read of its own)."""
        restarting = self._restart_wanted.is_set() or self._truncating.is_set()
        return reader.read(offset, self._store().body_rowid(reader.message_id), restarting)

    def _close_body(self, reader: BodyReader) -> None:
        conn = reader.close()
        if conn is not None and len(self._idle_body_connections) < _IDLE_BODY_CONNECTIONS:
            self._idle_body_connections.append(conn)
        elif conn is not None:
            conn.close()

    @staticmethod
    def _discard_body(reader: BodyReader) -> None:
        conn = reader.close()
        if conn is not None:
            conn.close()

    def _close_body_connections(self) -> None:
        while self._idle_body_connections:
            self._idle_body_connections.pop().close()

    def _read(self, fn: Callable, *args: Any) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(self._reader, fn, *args)

    async def _write(self, fn: Callable, *args: Any) -> Any:
        """Queue a write for the writer thread and wait for its group's commit, at most commit_timeout.

        On timeout a write the writer has not started is withdrawn (it will never commit, so the
        caller's 451 is true); one inside the stuck group may still commit later. A caller that is
        cancelled does not withdraw its write: an outcome of delivery is recorded all the same.
        """
        loop = asyncio.get_running_loop()
        write = _Write(fn, args, loop, loop.create_future())
        self._queue.put(write)
        timer = loop.call_later(self._commit_timeout, _expire, write.waiter)
        try:
            return await write.waiter
        except _Expired:
            with self._starting:
                withdrawn = write.state is _QUEUED
                if withdrawn:
                    write.state = _WITHDRAWN
            raise TimeoutError(
                f"the spool did not commit within spool.commit_timeout ({self._commit_timeout:g}s)"
                + ("" if withdrawn else "; the write may still commit")
            ) from None
        finally:
            timer.cancel()

    def _checkpoint_loop(self) -> None:
        """Checkpoints on a connection of their own, so no COMMIT runs one (the writer's
        automatic checkpoint is off) and the WAL stays bounded (:func:`after_passive`)."""
        wal = self.path.with_name(self.path.name + "-wal")
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # TRUNCATE waits this long for the writer, then for readers while it holds the write lock:
        # a delivery stalled in its snapshot delays commits no longer than the writer's RESTART does.
        conn.execute(f"PRAGMA busy_timeout={_RESTART_WAIT_MS}")
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        try:
            while not self._closing.wait(_CHECKPOINT_EVERY):
                try:
                    _, log_frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    file_bytes = wal.stat().st_size if wal.exists() else 0
                    idle = self._group_started is None and self._queue.empty()
                    mode = after_passive(log_frames * (page_size + 24), file_bytes, idle)
                    if mode == "RESTART":
                        self._restart_wanted.set()
                        self._queue.put(_Write(_nothing, (), None, None))  # an idle writer wakes for it
                    elif mode is not None:
                        self._truncating.set()  # body readers keep no snapshot meanwhile (keep_snapshot)
                        try:
                            conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
                        finally:
                            self._truncating.clear()
                except sqlite3.Error as error:
                    log.warning("spool checkpoint failed: %s", error)
        finally:
            conn.close()

    def _write_loop(self, ready: concurrent.futures.Future) -> None:
        try:
            store = SpoolStore(connect(self.path))
            store.conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread does them
        except Exception as error:  # noqa: BLE001 - reported to open()
            ready.set_exception(error)
            return
        ready.set_result(None)
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is _STOP for item in batch)
            self._commit_group(store, [item for item in batch if item is not _STOP])
            # Let go of the group's messages now, not when the next write arrives: a stored
            # body's pieces are views of its receive buffer, which would stay alive until then.
            del batch
            if stop:
                store.conn.close()
                return
            if self._restart_wanted.is_set():
                self._restart_log(store.conn)

    def _restart_log(self, conn: sqlite3.Connection) -> None:
        """Between groups, when the checkpointer asks (:func:`after_passive`): the writer holds
        the only write lock, so its RESTART cannot be starved by back-to-back commits."""
        conn.execute(f"PRAGMA busy_timeout={_RESTART_WAIT_MS}")
        try:
            conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        except sqlite3.Error as error:
            log.warning("spool checkpoint (RESTART) failed: %s", error)
        finally:
            conn.execute("PRAGMA busy_timeout=10000")
            self._restart_wanted.clear()  # only now: until here body readers keep no snapshot (keep_snapshot)

    def _commit_group(self, store: SpoolStore, batch: list[_Write]) -> None:
        with self._starting:  # a write its caller withdrew (timed out) is never started
            batch = [write for write in batch if write.state is _QUEUED]
            for write in batch:
                write.state = _RUNNING
        if not batch:
            return
        self._group_started = time.monotonic()
        try:
            outcomes = self._run_group(store, batch)
        finally:
            self._group_started = None
        _answer(batch, outcomes)

    def _run_group(self, store: SpoolStore, batch: list[_Write]) -> list[tuple[Any, BaseException | None]]:
        outcomes: list[tuple[Any, BaseException | None]] = []
        try:
            store.conn.execute("BEGIN IMMEDIATE")
            for write in batch:
                store.conn.execute("SAVEPOINT op")
                try:
                    outcomes.append((write.fn(store, *write.args), None))
                    store.conn.execute("RELEASE op")
                except Exception as error:  # noqa: BLE001 - only this caller sees it
                    store.conn.execute("ROLLBACK TO op")
                    store.conn.execute("RELEASE op")
                    outcomes.append((None, error))
            store.conn.execute("COMMIT")
            self.commits += 1
            self.operations += len(batch)
        except sqlite3.Error as error:  # disk full, I/O error: nobody in this group is durable
            if store.conn.in_transaction:
                try:
                    store.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            outcomes = [(None, error)] * len(batch)
        return outcomes


_QUEUED, _RUNNING, _WITHDRAWN = "queued", "running", "withdrawn"


class _Expired(Exception):
    """A write's commit_timeout passed (set on its waiter by the timer)."""


@dataclass(slots=True)
class _Write:
    """One write for the writer thread, and the future on its caller's loop that gets its outcome.

    Not a concurrent.futures.Future wrapped, shielded and waited for with a timeout: that is
    three futures, a condition variable and their callbacks per write, on both threads; here a
    group's outcomes go back to each loop in one call_soon_threadsafe.
    """

    fn: Callable
    args: tuple
    loop: asyncio.AbstractEventLoop | None  # None: a wake-up nobody waits for
    waiter: asyncio.Future | None
    state: str = _QUEUED  # changed under SqliteSpool._starting only


def _answer(batch: list[_Write], outcomes: list[tuple[Any, BaseException | None]]) -> None:
    """Hand a group's outcomes to the loops waiting for them (from the writer thread)."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for write, outcome in zip(batch, outcomes, strict=True):
        if write.loop is not None:
            by_loop.setdefault(write.loop, []).append((write.waiter, *outcome))
    for loop, answers in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, answers)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _settle(answers: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
    for waiter, result, error in answers:
        if waiter.done():  # its caller was cancelled, or it timed out: the outcome has no taker
            continue
        if error is not None:
            waiter.set_exception(error)
        else:
            waiter.set_result(result)


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(_Expired())


def _nothing(store: SpoolStore) -> None:
    """A write that writes nothing: wakes an idle writer thread."""


def _consume(ahead: asyncio.Future) -> None:
    """Retrieve the outcome of a read nobody awaits any more (a walk stopped with a chunk read ahead)."""
    if not ahead.cancelled():
        ahead.exception()


def open_store(path: Path) -> SpoolStore:
    """A synchronous store on its own connection (safe beside a running server)."""
    return SpoolStore(connect(path))


_RATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS rate_windows (
    key    TEXT NOT NULL,
    period REAL NOT NULL,
    window INTEGER NOT NULL,
    count  INTEGER NOT NULL,
    PRIMARY KEY (key, period, window)
) WITHOUT ROWID;
"""


class _RateWindows:
    """The ``rate_windows`` table in the spool's database, on a connection of its own (blocking calls)."""

    def __init__(self, path: Path):
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=10000")
            # Survives a crash of the process (the spool's own commits fsync the shared WAL);
            # a budget is worth less than an fsync per save.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_RATE_SCHEMA)
            self._conn = conn
        return self._conn

    def save(self, increments: Counter[WindowKey], now: float) -> dict[WindowKey, int]:
        """Add ``increments`` to the stored counts, forget windows no rate can still see, read all back."""
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT INTO rate_windows (key, period, window, count) VALUES (?,?,?,?) "
                "ON CONFLICT (key, period, window) DO UPDATE SET count = count + excluded.count",
                [(key, period, window, amount) for (key, period, window), amount in increments.items()],
            )
            conn.execute("DELETE FROM rate_windows WHERE (window + 2) * period < ?", (now,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        rows = conn.execute("SELECT key, period, window, count FROM rate_windows").fetchall()
        return {(key, period, window): count for key, period, window, count in rows}

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None



class SqliteRateStore:
    """:class:`relay.spool.base.RateStore` on the spool's database file, off the event loop.

    Every process of a relay opens its own (acceptors included): they share one budget
    through the table.
    """

    def __init__(self, path: Path):
        self._windows = _RateWindows(path)

    async def save(self, increments: Mapping[WindowKey, int] | Counter[WindowKey], now: float) -> dict[WindowKey, int]:
        try:
            return await asyncio.to_thread(self._windows.save, increments, now)
        except sqlite3.Error as error:
            raise OSError(f"spool database {self._windows.path}: {error}") from error

    async def close(self) -> None:
        await asyncio.to_thread(self._windows.close)
