"""A large message is held once on its way from DATA to the spool: measured, not timed.

tracemalloc counts every allocation Python makes (SQLite's own page cache is not Python's),
so the peak while preparing and storing a 4 MB message, its receive buffer included, says
how many copies of it existed at once. The figure is deterministic: no timing, no threads
racing (the spool's SQL runs here synchronously, as its writer thread runs it).
"""

from __future__ import annotations

import asyncio
import tracemalloc

from relay.prepare import Preparer, Submission
from relay.spool import NewMessage
from relay.spool.sqlite import SpoolStore, connect
from tests.unit.helpers import BASE, config_from

SIZE = 4 * 1024 * 1024


def received_text() -> bytearray:
    """What the listener's DATA reader hands over: one buffer, CRLF lines, a few dot-lines."""
    header = b"From: app@acme.com\r\nTo: a@example.net\r\nSubject: large\r\n\r\n"
    line = b"0123456789" * 7 + b"\r\n"
    text = bytearray(header)
    while len(text) < SIZE:
        text += line * 1000 + b".a line starting with a dot\r\n"
    return text


def prepare_and_store(tmp_path, data: bytearray, queue_id: str = "3ZK7Q9M2XD4HWT") -> None:
    config = config_from(BASE)
    submission = Submission(
        user="billing", listener="smtp", sender="app@acme.com", recipients=["a@example.net"], data=data,
        helo="app.acme.com", client_ip="10.0.0.5", esmtp=True, tls=None, authenticated_user=None,
    )
    preparer = Preparer()
    try:
        prepared = asyncio.run(preparer.prepare(config, submission, queue_id, 1_700_000_000.0))
    finally:
        preparer.close()
    message = NewMessage(
        queue_id, 1_700_000_000.0, "billing", "smtp", "10.0.0.5", prepared.route.account,
        prepared.route.channel, "app@acme.com", ["a@example.net"], prepared.body,
    )
    store = SpoolStore(connect(tmp_path / "spool.db"))
    try:
        store.conn.execute("BEGIN IMMEDIATE")
        store.insert(message)
        store.conn.execute("COMMIT")
        assert prepared.holds(data)  # the spooled body was a view of the received one
        assert store.read(message.id, 0)[1] == message.size > len(data)
    finally:
        store.conn.close()


def test_a_large_message_is_held_once_from_data_to_the_spool(tmp_path):
    connect(tmp_path / "spool.db").close()  # the schema, and SQLite's first allocations, before measuring
    prepare_and_store(tmp_path, bytearray(b"Subject: warm-up\r\n\r\nx\r\n"), "3ZK7Q9M2XD4HWS")  # imports, caches
    tracemalloc.start()
    try:
        data = received_text()
        tracemalloc.reset_peak()
        prepare_and_store(tmp_path, data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.3 * len(data), f"peak {peak / len(data):.2f} x the message"
