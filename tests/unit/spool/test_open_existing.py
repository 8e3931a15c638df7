"""The operator's commands open a spool that exists, and never make an empty one where there is none."""

from __future__ import annotations

import concurrent.futures
import sqlite3

import pytest

from relay.config import Spool as SpoolSettings
from relay.spool import ListQuery, SpoolMissing, open_spool
from relay.spool.sqlite import open_store


async def test_a_missing_spool_is_not_created(tmp_path):
    spool = open_spool(SpoolSettings(path=tmp_path / "var" / "spool.db"), create=False)
    with pytest.raises(SpoolMissing, match="no spool at .*spool.db"):
        await spool.open()
    assert not (tmp_path / "var").exists()


async def test_an_existing_spool_opens_as_usual(tmp_path):
    settings = SpoolSettings(path=tmp_path / "spool.db")
    made = open_spool(settings)
    await made.open()
    await made.close()
    existing = open_spool(settings, create=False)
    await existing.open()
    assert await existing.counts() == {}
    await existing.close()


# The schema of the releases that kept bodies in messages.body (NULL once every recipient was final).
OLD_SCHEMA = """
CREATE TABLE messages (
    id TEXT PRIMARY KEY, received_at REAL NOT NULL, user TEXT NOT NULL, listener TEXT NOT NULL,
    client TEXT NOT NULL, account TEXT NOT NULL, channel TEXT NOT NULL, sender TEXT NOT NULL,
    size INTEGER NOT NULL, body BLOB, label INTEGER, mail_from TEXT, eight_bit INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE recipients (
    message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE, idx INTEGER NOT NULL,
    address TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL, last_reply TEXT, email_id TEXT, PRIMARY KEY (message_id, idx)
) WITHOUT ROWID;
CREATE INDEX recipients_pending ON recipients (next_attempt) WHERE state IN ('queued', 'deferred');
"""
BIG = b"Subject: big\r\n\r\n" + bytes(index % 251 for index in range(600_000))  # more than two chunks


def old_spool(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")  # as every release made it
    conn.executescript(OLD_SCHEMA)
    for message_id, body, state in (("PENDING", b"Subject: p\r\n\r\nhello\r\n", "deferred"),
                                    ("LARGE", BIG, "queued"), ("FINAL", None, "delivered")):
        conn.execute("INSERT INTO messages VALUES (?, 100, 'u', 'smtp', 'c', 'acct', 'trigger', 's@x', ?, ?, NULL, NULL, 0)",
                     (message_id, len(body or b""), body))
        conn.execute("INSERT INTO recipients (message_id, idx, address, state, next_attempt) VALUES (?, 0, 'r@x', ?, 0)",
                     (message_id, state))
    conn.commit()
    conn.close()


async def whole_body(spool, message_id: str) -> bytes | None:
    start = await spool.start(message_id)
    if start is None:
        return None
    first, size = start
    return first + b"".join([chunk async for chunk in spool.chunks(message_id, len(first), size)])


async def test_an_old_spool_with_bodies_in_messages_keeps_its_mail_when_opened(tmp_path):
    path = tmp_path / "spool.db"
    old_spool(path)
    spool = open_spool(SpoolSettings(path=path), create=False)
    await spool.open()
    try:
        assert await whole_body(spool, "PENDING") == b"Subject: p\r\n\r\nhello\r\n"
        assert await whole_body(spool, "LARGE") == BIG
        assert await whole_body(spool, "FINAL") is None
        assert [m.id for m in await spool.due(1.0, 10, ["acct"])] == ["LARGE", "PENDING"]
        assert (await spool.pending_summary())[:2] == (2, {"queued": 1, "deferred": 1})
        assert await spool.purge_final(101) == 1  # the final one, by the index of final messages
        assert [m.id for m in await spool.list(ListQuery(include_final=True))] == ["LARGE", "PENDING"]
    finally:
        await spool.close()
    conn = sqlite3.connect(path)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
    conn.close()
    assert "body" not in columns and "pending" in columns


def test_two_processes_opening_an_old_spool_at_once_migrate_it_once(tmp_path):
    path = tmp_path / "spool.db"
    old_spool(path)
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        for conn_info in pool.map(_open_and_count, [path, path]):
            assert conn_info == (2, 2)  # every pending body, once


def _open_and_count(path) -> tuple[int, int]:
    store = open_store(path)
    try:
        return store.conn.execute("SELECT COUNT(*), COUNT(DISTINCT message_id) FROM bodies").fetchone()
    finally:
        store.conn.close()
