"""A large message is held once on its way from DATA to the spool: measured, not timed.

tracemalloc counts every allocation Python makes (SQLite's own page cache is not Python's),
so the peak while preparing and storing a 4 MB message, its receive buffer included, says
how many copies of it existed at once. The figure is deterministic: no timing, no threads
racing (the spool's SQL runs here synchronously, as its writer thread runs it).

With acceptor processes, the acceptor keeps its receive buffer until the main process has
committed; the main process's frame loop (driven here in-process over a real socketpair into
a real spool) must not hold a second copy meanwhile: past 1 MiB it spills to a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import gc
import os
import socket
import tempfile
import tracemalloc
import warnings

import pytest

from relay.policy.anvil import LocalLimits
from relay.process.acceptor import LoopPassWriter, RemoteLimits, SpoolClient, SpoolUnreachable
from relay.process.ipc import BodyPiece, write_frame
from relay.process.supervisor import AcceptorPool
from relay.rewrite.pipeline import Preparer, Submission
from relay.spool import NewMessage
from relay.spool.sqlite import SpoolStore, SqliteSpool, connect
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


class _Submitted:
    """The scheduler's intake: what the main process handed over after the commit."""

    def __init__(self):
        self.ids: list[str] = []

    def submit(self, message: NewMessage) -> None:
        self.ids.append(message.id)


@contextlib.asynccontextmanager
async def main_process(tmp_path):
    """The main process's side of acceptor processes, in-process: its frame loop for one
    acceptor over a real socketpair, storing into a real spool; yields the acceptor's end."""
    config = config_from(BASE)
    spool = SqliteSpool(tmp_path / "spool.db")
    await spool.open()
    scheduler = _Submitted()

    async def intake(message: NewMessage) -> None:  # as the relay's: durable, then to the scheduler
        await spool.store(message)
        scheduler.submit(message)

    pool = AcceptorPool(config, intake, spool.spill_directory, LocalLimits(lambda: config), 1)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    main_reader, main_writer = await asyncio.open_unix_connection(sock=ours)
    reader, writer = await asyncio.open_unix_connection(sock=theirs)
    serving = asyncio.create_task(pool._serve(0, main_reader, main_writer))
    link = LoopPassWriter(writer)
    client = SpoolClient(reader, link, lambda new: None, lambda answer: limits.answered(answer))
    limits = RemoteLimits(link, client.closed)
    try:
        yield spool, scheduler, client, limits, writer
    finally:
        writer.close()
        await serving
        main_writer.close()
        await spool.close()


def spill_files(directory) -> int:
    """Open descriptors of unlinked files in ``directory``: the spills. Counting every descriptor
    would also count the spool's own (its checkpointer thread opens the WAL on its first pass)."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor, closed by now
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
    return sum(target.startswith(f"{directory}/") and target.endswith(" (deleted)") for target in targets)


async def test_the_main_process_of_acceptors_spills_a_large_body_instead_of_holding_it(tmp_path):
    """With acceptor processes the acceptor holds the received message until the commit; the
    main process must not hold a second copy: past 1 MiB it writes the pieces to a file."""
    body = bytes(received_text()) * 2  # 8 MB, made before measuring: it is the acceptor's copy
    large = NewMessage("3ZK7Q9M2XD4HWT", 1.0, "billing", "smtp", "10.0.0.5", "acme_trigger", "trigger",
                       "app@acme.com", ["a@example.net"], (b"Received: x\r\n", memoryview(body)))
    async with main_process(tmp_path) as (spool, scheduler, client, _, _):
        await client.store(dataclasses.replace(large, id="3ZK7Q9M2XD4HWS", body=b"Subject: warm-up\r\n\r\nx\r\n"))
        tracemalloc.start()
        try:
            await client.store(large)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        first, size = await spool.start(large.id)
        stored = first + b"".join([chunk async for chunk in spool.chunks(large.id, len(first), size)])
    assert scheduler.ids == ["3ZK7Q9M2XD4HWS", large.id]
    assert stored == b"Received: x\r\n" + body  # byte for byte, through the file
    # What stays: at most 1 MiB of held pieces, and a few 256 KB frames in socket and stream
    # buffers (0.25-0.35 x here); holding the pieces until the commit made it over 1 x.
    assert peak < 0.5 * len(body), f"peak {peak / len(body):.2f} x the message"


async def test_a_body_left_unfinished_by_an_acceptor_that_went_away_has_its_file_closed(tmp_path):
    """Closed, not left to the garbage collector (which would close it with a ResourceWarning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        async with main_process(tmp_path) as (spool, scheduler, _, limits, writer):
            assert spill_files(spool.spill_directory) == 0
            for _ in range(6):  # 1.5 MB: past the spill threshold
                write_frame(writer, BodyPiece(1), b"x" * 256 * 1024)
                await writer.drain()
            assert await limits.auth_locked_for("10.0.0.5", "billing") is None  # answered after the pieces
            assert spill_files(spool.spill_directory) == 1
        assert spill_files(spool.spill_directory) == 0  # closed when the acceptor's link ended
        gc.collect()
    assert [str(w.message) for w in caught if "unclosed file" in str(w.message)] == []
    assert scheduler.ids == []


async def test_a_spill_that_fails_fails_that_message_only(tmp_path, monkeypatch):
    """Disk full while buffering: the acceptor hears of it for this message (and answers 451),
    and its link to the main process keeps serving the next one."""

    def disk_full(**_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryFile", disk_full)
    large = NewMessage("3ZK7Q9M2XD4HWT", 1.0, "billing", "smtp", "10.0.0.5", "acme_trigger", "trigger",
                       "app@acme.com", ["a@example.net"], b"Subject: s\r\n\r\n" + b"x" * 2 * 1024 * 1024)
    async with main_process(tmp_path) as (_, scheduler, client, _, _):
        with pytest.raises(SpoolUnreachable, match="No space left on device"):
            await client.store(large)
        await client.store(dataclasses.replace(large, id="3ZK7Q9M2XD4HWV", body=b"Subject: small\r\n\r\nx\r\n"))
    assert scheduler.ids == ["3ZK7Q9M2XD4HWV"]
