"""relay.spool and relay.spool.sqlite: durable queue, group commit, queue IDs."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
import sqlite3
import threading

import pytest

from relay.spool import FileRegion, ListQuery, NewMessage, RecipientUpdate, State, new_queue_id
from relay.spool.sqlite import BodyGone, SpoolStore, SqliteSpool, open_store

RECEIVED = 1_700_000_000.0
ACCOUNTS = ("acme_trigger",)
_ids = itertools.count()


def new_message(message_id: str | None = None, recipients=("a@example.org", "b@example.org"),
                received_at: float = RECEIVED, sender: str = "billing@acme.com") -> NewMessage:
    message_id = message_id or f"M{next(_ids):08d}"
    body = f"From: {sender}\r\nSubject: {message_id}\r\n\r\nhello\r\n".encode()
    return NewMessage(message_id, received_at, "billing", "smtp", "10.20.0.5", "acme_trigger", "trigger",
                      sender, list(recipients), body)


def update(message_id: str, idx: int, state: State, next_attempt: float = RECEIVED, attempts: int = 1,
           reply: str = "250 ok", email_id: str | None = None) -> RecipientUpdate:
    return RecipientUpdate(message_id, idx, state, attempts, next_attempt, reply, email_id)


async def spooled(spool: SqliteSpool, message_id: str) -> bytes | None:
    """The whole body as delivery reads it: through the header section, then chunk by chunk."""
    start = await spool.start(message_id)
    if start is None:
        return None
    first, size = start
    return first + b"".join([chunk async for chunk in spool.chunks(message_id, len(first), size)])


def read_body(store, message_id: str) -> bytes | None:
    """The same through a synchronous store (as the CLI's connection)."""
    data, offset = b"", 0
    while (read := store.read(message_id, offset)) is not None and offset < read[1]:
        data += read[0]
        offset += len(read[0])
    return None if read is None else data


@pytest.fixture
def path(tmp_path):
    return tmp_path / "spool" / "spool.db"


@pytest.fixture
async def spool(path):
    spool = SqliteSpool(path)
    await spool.open()
    yield spool
    await spool.close()


@pytest.fixture
def store(spool, path):
    """A second, synchronous connection, as the CLI's `queue` commands use beside the server."""
    store = open_store(path)
    yield store
    store.conn.close()


# -- store and due ---------------------------------------------------------------------------------


async def test_stored_message_is_due_with_all_recipients(spool):
    """What was stored comes back from due(), every recipient queued and untried."""
    message = new_message()
    await spool.store(message)
    (due,) = await spool.due(RECEIVED, 100, ACCOUNTS)
    assert due.id == message.id
    assert (due.user, due.account, due.channel, due.sender) == ("billing", "acme_trigger", "trigger", "billing@acme.com")
    assert due.size == len(message.body)
    assert [(r.idx, r.address, r.state, r.attempts) for r in due.recipients] == [
        (0, "a@example.org", State.QUEUED, 0),
        (1, "b@example.org", State.QUEUED, 0),
    ]
    assert await spooled(spool, message.id) == message.body


class _RecordingConnection:
    """A connection that keeps every statement with its parameters, to EXPLAIN them as run."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn, self.statements = conn, []

    def execute(self, sql: str, parameters=()):
        self.statements.append((sql, parameters))
        return self.conn.execute(sql, parameters)


@pytest.mark.parametrize("query", ["due", "stranded"])
def test_due_and_stranded_walk_the_pending_partial_index(path, query):
    """Bound states (state IN (?,?)) hide the partial index from SQLite: a full scan per poll."""
    conn = open_store(path).conn
    SpoolStore(conn).insert(dataclasses.replace(new_message(), account="gone_account"))  # stranded has one to find
    recording = _RecordingConnection(conn)
    getattr(SpoolStore(recording), query)(RECEIVED, 10, ACCOUNTS)
    ((select, parameters),) = [(sql, p) for sql, p in recording.statements if "FROM recipients AS r" in sql]  # the walk
    plan = " | ".join(row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + select, parameters))
    assert "USING INDEX recipients_pending" in plan, plan
    conn.close()


async def test_message_is_not_due_before_it_arrived(spool):
    await spool.store(new_message())
    assert await spool.due(RECEIVED - 1, 100, ACCOUNTS) == []


async def test_null_sender_and_binary_body_survive(spool):
    message = new_message(sender="")
    message = dataclasses.replace(message, body=message.body + bytes(range(256)))
    await spool.store(message)
    assert await spooled(spool, message.id) == message.body
    assert (await spool.due(RECEIVED, 10, ACCOUNTS))[0].sender == ""


@pytest.mark.parametrize("size", [0, 1, 256 * 1024, 256 * 1024 + 1, 3 * 256 * 1024 + 7])
async def test_body_written_and_read_in_pieces_round_trips(spool, size):
    body = bytes(index % 251 for index in range(size))  # no chunk looks like its neighbour
    message = dataclasses.replace(new_message(), body=body)
    await spool.store(message)
    assert await spooled(spool, message.id) == body


async def test_body_given_in_pieces_is_stored_as_one_text_with_its_8bit_flag(spool, path):
    """The listener spools the new header and a view of the received body without joining them."""
    received = bytearray(b"Subject: old\r\n\r\n" + "Grüße\r\n".encode() * 100_000)
    pieces = (b"Received: x\r\nSubject: new\r\n\r\n", memoryview(received)[len(b"Subject: old\r\n\r\n"):])
    message = dataclasses.replace(new_message(), body=pieces)
    ascii_message = new_message()
    await spool.store(message)
    await spool.store(ascii_message)
    assert await spooled(spool, message.id) == b"".join(pieces)
    assert [(m.id, m.size, m.eight_bit) for m in await spool.due(RECEIVED, 10, ACCOUNTS)] == sorted([
        (message.id, len(b"".join(pieces)), True), (ascii_message.id, ascii_message.size, False),
    ])


@pytest.mark.parametrize("eight_bit", [False, True])
async def test_a_body_part_in_a_file_region_is_stored_byte_for_byte_with_its_8bit_flag(spool, tmp_path, eight_bit):
    """The main process of acceptor processes spills large bodies to a file: the spool reads only
    the region (at an odd offset, over several chunks), scanning it for 8-bit bytes as it goes."""
    spilled = bytes(index % 95 + 32 for index in range(3 * 256 * 1024 + 11)) + ("ü" if eight_bit else "u").encode()
    with open(tmp_path / "spill", "w+b") as file:
        file.write(b"\xff" * 1001 + spilled + b"\xff" * 5)  # 8-bit bytes outside the region never count
        file.flush()
        pieces = (b"Received: x\r\n\r\n", FileRegion(file, 1001, len(spilled)), b"tail\r\n")
        message = dataclasses.replace(new_message(), body=pieces)
        await spool.store(message)
    assert await spooled(spool, message.id) == b"Received: x\r\n\r\n" + spilled + b"tail\r\n"
    [due] = await spool.due(RECEIVED, 10, ACCOUNTS)
    assert (due.size, due.eight_bit) == (message.size, eight_bit)


async def test_a_file_region_shorter_than_it_says_fails_the_store_and_nothing_is_spooled(spool, tmp_path):
    with open(tmp_path / "spill", "w+b") as file:
        file.write(b"x" * 1000)
        file.flush()
        message = dataclasses.replace(new_message(), body=(b"Subject: s\r\n\r\n", FileRegion(file, 0, 2000)))
        with pytest.raises(OSError, match="1000 bytes short"):
            await spool.store(message)
    assert await spool.due(RECEIVED, 10, ACCOUNTS) == []


async def test_start_reads_through_a_header_longer_than_a_chunk(spool):
    header = b"".join(b"X-Long-%d: %s\r\n" % (n, b"v" * 1000) for n in range(400))  # ~400 KB
    message = dataclasses.replace(new_message(), body=header + b"\r\n" + b"body\r\n" * 100_000)
    await spool.store(message)
    first, size = await spool.start(message.id)
    assert first.startswith(header + b"\r\n") and len(first) < size == message.size


async def test_chunks_stop_with_body_gone_when_the_message_is_deleted_meanwhile(spool, store):
    """`queue delete` during a delivery: the next chunk read says so, never reads another row."""
    message = dataclasses.replace(new_message(), body=b"Subject: s\r\n\r\n" + b"x" * (3 * 256 * 1024))
    await spool.store(message)
    first, size = await spool.start(message.id)
    chunks = spool.chunks(message.id, len(first), size)
    assert len(await anext(chunks)) == 256 * 1024
    assert store.delete(message.id)
    await spool.store(dataclasses.replace(new_message(), body=b"y" * size))  # may take the freed rowid
    with pytest.raises(BodyGone):
        for _ in range(2):  # at most the chunk read ahead before the delete, never one of the new row
            assert set(await anext(chunks)) == {ord("x")}


def test_opening_an_old_spool_adds_the_8bit_column_and_fills_it(path):
    """A spool.db from before the column: its pending messages get their flag once, when opened."""
    path.parent.mkdir(parents=True)
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE messages (id TEXT PRIMARY KEY, received_at REAL NOT NULL, user TEXT NOT NULL, "
        "listener TEXT NOT NULL, client TEXT NOT NULL, account TEXT NOT NULL, channel TEXT NOT NULL, "
        "sender TEXT NOT NULL, size INTEGER NOT NULL, body BLOB, label INTEGER, mail_from TEXT);"
    )
    old.executemany(
        "INSERT INTO messages VALUES (?, 0, 'u', 'l', 'c', 'a', 'ch', 's', 1, ?, NULL, NULL)",
        [("ASCII", b"plain\r\n"), ("EIGHT", "中文\r\n".encode()), ("FINAL", None)],
    )
    old.commit()
    old.close()
    store = open_store(path)
    try:
        flags = dict(store.conn.execute("SELECT id, eight_bit FROM messages"))
    finally:
        store.conn.close()
    assert flags == {"ASCII": 0, "EIGHT": 1, "FINAL": 0}


async def test_body_of_unknown_message_is_none(spool):
    assert await spooled(spool, "NOSUCHID") is None


# -- record ------------------------------------------------------------------------------------------


async def test_all_delivered_nulls_body_and_leaves_the_list(spool, store):
    """Once every recipient is final the body is dropped and `queue list` no longer shows it."""
    message = new_message()
    await spool.store(message)
    await spool.record([
        update(message.id, 0, State.DELIVERED, email_id="mid0$a@example.org"),
        update(message.id, 1, State.DELIVERED, email_id="mid1$b@example.org"),
    ])
    assert await spooled(spool, message.id) is None
    assert await spool.due(RECEIVED + 10**6, 100, ACCOUNTS) == []
    assert [m.id for m in store.list()] == []
    (kept,) = store.list(ListQuery(include_final=True))
    assert [(r.state, r.email_id) for r in kept.recipients] == [
        (State.DELIVERED, "mid0$a@example.org"),
        (State.DELIVERED, "mid1$b@example.org"),
    ]


async def test_partly_delivered_message_keeps_body_and_only_pending_recipient_is_due(spool, store):
    """A partly delivered message resumes where it stopped."""
    message = new_message()
    await spool.store(message)
    await spool.record([
        update(message.id, 0, State.DELIVERED),
        update(message.id, 1, State.DEFERRED, next_attempt=RECEIVED + 60, reply="451 later"),
    ])
    assert await spooled(spool, message.id) == message.body
    assert await spool.due(RECEIVED + 59, 100, ACCOUNTS) == []
    (due,) = await spool.due(RECEIVED + 60, 100, ACCOUNTS)
    assert [(r.idx, r.state, r.attempts, r.last_reply) for r in due.recipients] == [(1, State.DEFERRED, 1, "451 later")]
    assert [m.id for m in store.list()] == [message.id]


async def test_failed_update_and_dsn_are_stored_together(spool, store):
    """A permanent failure and the DSN it causes land in one transaction."""
    message = new_message(recipients=("a@example.org",))
    await spool.store(message)
    dsn = new_message("DSN0001", recipients=("billing@acme.com",), sender="")
    await spool.record([update(message.id, 0, State.FAILED, reply="550 5.1.1 user unknown")], [dsn])
    assert store.get(message.id).recipients[0].state is State.FAILED
    assert await spooled(spool, message.id) is None
    assert await spooled(spool, dsn.id) == dsn.body
    assert [m.id for m in await spool.due(RECEIVED, 100, ACCOUNTS)] == [dsn.id]


async def test_failed_update_is_rolled_back_when_its_dsn_cannot_be_stored(spool, store):
    """Atomic: if the DSN insert fails, the recipient is not marked failed (no bounce is lost)."""
    message = new_message(recipients=("a@example.org",))
    await spool.store(message)
    clashing_dsn = new_message(message.id, recipients=("billing@acme.com",), sender="")  # same id: fails
    with pytest.raises(sqlite3.IntegrityError):
        await spool.record([update(message.id, 0, State.FAILED, reply="550 no")], [clashing_dsn])
    recipient = store.get(message.id).recipients[0]
    assert (recipient.state, recipient.attempts, recipient.last_reply) == (State.QUEUED, 0, None)
    assert await spooled(spool, message.id) == message.body


# -- retry, flush, delete (the CLI's store) --------------------------------------------------------------


async def deferred(spool, count: int = 1) -> list[str]:
    ids = []
    for _ in range(count):
        message = new_message(recipients=("a@example.org",))
        await spool.store(message)
        await spool.record([update(message.id, 0, State.DEFERRED, next_attempt=RECEIVED + 3600, reply="451 later")])
        ids.append(message.id)
    return ids


async def test_retry_one_message_makes_it_due_now(spool, store):
    """`queue retry ID` delivers now: its deferred recipients become due."""
    first, _ = await deferred(spool, 2)
    assert await spool.due(RECEIVED + 1, 100, ACCOUNTS) == []
    assert store.retry(first) == 1
    assert [m.id for m in await spool.due(RECEIVED + 1, 100, ACCOUNTS)] == [first]


async def test_retry_unknown_message_changes_nothing(spool, store):
    await deferred(spool)
    assert store.retry("NOSUCHID") == 0
    assert await spool.due(RECEIVED + 1, 100, ACCOUNTS) == []


async def test_flush_makes_every_deferred_recipient_due(spool, store):
    """`queue flush` (retry without an ID) is Postfix's `postqueue -f`."""
    ids = await deferred(spool, 3)
    assert store.retry() == 3
    assert sorted(m.id for m in await spool.due(RECEIVED + 1, 100, ACCOUNTS)) == sorted(ids)


async def test_flush_leaves_final_recipients_alone(spool, store):
    message = new_message()
    await spool.store(message)
    await spool.record([update(message.id, 0, State.DELIVERED), update(message.id, 1, State.FAILED, reply="550")])
    assert store.retry() == 0
    assert store.retry(message.id) == 0


async def test_delete_removes_message_and_recipients(spool, store):
    (message_id,) = await deferred(spool)
    assert store.delete(message_id) is True
    assert store.get(message_id) is None
    assert await spooled(spool, message_id) is None
    assert store.counts() == {}
    assert store.delete(message_id) is False


# -- group commit ----------------------------------------------------------------------------------------


async def test_concurrent_stores_share_commits_and_all_are_durable(spool, path):
    """200 sessions storing at once pay fewer than 200 fsyncs, and every message is on disk."""
    messages = [new_message() for _ in range(200)]
    commits_before = spool.commits
    await asyncio.gather(*(spool.store(message) for message in messages))
    assert spool.commits - commits_before < 200
    fresh = open_store(path)
    try:
        listed = fresh.list()
        assert sorted(m.id for m in listed) == sorted(m.id for m in messages)
        assert all(read_body(fresh, m.id) == m.body for m in messages)
        assert fresh.counts() == {"queued": 400}
    finally:
        fresh.conn.close()


async def test_failing_operation_fails_only_its_own_caller(spool, path, store):
    """A bad operation in a group rolls back alone: the others in the same group get their commit."""
    original = new_message()
    await spool.store(original)
    batch = [new_message() for _ in range(20)]
    batch.insert(10, new_message(original.id, recipients=("x@example.org",)))  # duplicate id
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # hold the write lock so all 21 queue up behind it
        commits_before = spool.commits
        tasks = [asyncio.ensure_future(spool.store(message)) for message in batch]
        await asyncio.sleep(0)  # let every task enqueue its write (no time passes)
        blocker.execute("COMMIT")
        results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        blocker.close()
    assert spool.commits - commits_before < len(batch)  # they really shared a group
    errors = [index for index, result in enumerate(results) if isinstance(result, BaseException)]
    assert errors == [10]
    assert isinstance(results[10], sqlite3.IntegrityError)
    stored = {m.id for m in store.list()}
    assert stored == {original.id} | {m.id for i, m in enumerate(batch) if i != 10}
    assert read_body(store, original.id) == original.body
    assert [r.address for r in store.get(original.id).recipients] == ["a@example.org", "b@example.org"]


async def test_spool_reopens_with_what_was_committed(path):
    """After close (or a crash after the commit), a new spool on the same file sees everything."""
    first = SqliteSpool(path)
    await first.open()
    message = new_message()
    await first.store(message)
    await first.close()
    second = SqliteSpool(path)
    await second.open()
    try:
        assert [m.id for m in await second.due(RECEIVED, 10, ACCOUNTS)] == [message.id]
    finally:
        await second.close()


# -- queue IDs ---------------------------------------------------------------------------------------------


def test_new_queue_id_unique_over_10000_calls():
    ids = [new_queue_id() for _ in range(10_000)]
    clashes = len(ids) - len(set(ids))
    assert clashes == 0


def test_new_queue_id_unique_for_a_burst_within_one_millisecond():
    """Sessions finishing DATA in the same millisecond must still get distinct IDs
    (the listener calls new_queue_id(now); a clash fails the insert and costs the client a 451)."""
    ids = [new_queue_id(RECEIVED) for _ in range(50_000)]
    clashes = len(ids) - len(set(ids))
    assert clashes == 0


_MS = int(RECEIVED * 1000)
_CARRY = (_MS - _MS % 31 + 31) / 1000  # a millisecond whose base-31 last digit is 0

TIMES = {
    "milliseconds_apart": (RECEIVED, RECEIVED + 0.001),
    "seconds_apart": (RECEIVED, RECEIVED + 1),
    "years_apart": (RECEIVED, RECEIVED + 10 * 365 * 86400),
    "across_a_digit_carry": (_CARRY - 0.0005, _CARRY + 0.0005),  # ...Z then ...0 in the last place
}


@pytest.mark.parametrize("earlier, later", TIMES.values(), ids=TIMES.keys())
def test_new_queue_id_sorts_by_time(earlier, later):
    """IDs sort in time order (to the millisecond), so `queue list` reads oldest first."""
    assert new_queue_id(earlier) < new_queue_id(later)


def test_new_queue_id_shape():
    """Short, upper-case, no vowels (never spells a word), fixed length for current times."""
    ids = [new_queue_id(RECEIVED + i * 12345.678) for i in range(100)]
    assert {len(i) for i in ids} == {14}
    assert all(set(i) <= set("0123456789BCDFGHJKLMNPQRSTVWXYZ") for i in ids)


async def test_a_write_whose_caller_is_cancelled_still_commits(path, monkeypatch):
    """Delivery's outcome is recorded even if the worker is cancelled (a shutdown) while it waits."""
    release = threading.Event()
    real_probe = SpoolStore.probe

    def hanging_probe(store, now):
        release.wait(10)
        real_probe(store, now)

    monkeypatch.setattr(SpoolStore, "probe", hanging_probe)
    spool = SqliteSpool(path, commit_timeout=5)
    await spool.open()
    try:
        stuck = asyncio.ensure_future(spool.probe(1.0))
        await asyncio.sleep(0.05)  # the writer is in the probe's group now
        queued = new_message()
        cancelled = asyncio.ensure_future(spool.store(queued))
        await asyncio.sleep(0.05)  # queued behind the probe
        cancelled.cancel()
        release.set()
        await stuck
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await spool.probe(2.0)  # a later group: the cancelled one's has committed
        assert await spool.get(queued.id) is not None
    finally:
        release.set()
        await spool.close()


async def test_a_commit_that_hangs_times_out_and_the_watchdog_reports_the_stuck_writer(path, monkeypatch):
    """spool.commit_timeout: the caller gets an error (the listener's 451) instead of waiting for
    ever; a write queued behind the stuck one is withdrawn, so it never lands after its 451."""
    release = threading.Event()
    real_probe = SpoolStore.probe

    def hanging_probe(store, now):
        release.wait(10)  # an fsync that does not return (a dead disk, a hung NFS server)
        real_probe(store, now)

    monkeypatch.setattr(SpoolStore, "probe", hanging_probe)
    spool = SqliteSpool(path, commit_timeout=0.3)
    await spool.open()
    try:
        assert spool.unavailable() is None
        stuck = asyncio.ensure_future(spool.probe(1.0))
        await asyncio.sleep(0.05)  # the writer is in the probe's group now
        behind = new_message()
        with pytest.raises(TimeoutError, match="commit_timeout"):
            await spool.store(behind)
        with pytest.raises(TimeoutError, match="may still commit"):
            await stuck
        assert "stuck in a commit" in spool.unavailable()
        release.set()
        for _ in range(100):
            if spool.unavailable() is None:
                break
            await asyncio.sleep(0.02)
        assert spool.unavailable() is None
        assert await spool.get(behind.id) is None  # withdrawn: not on disk after its 451
        later = new_message()
        await spool.store(later)
        assert await spool.get(later.id) is not None
    finally:
        release.set()
        await spool.close()


# -- growth: running counts, pruning in batches, checkpoints off the commit path ----------------------


def counted_from_rows(store) -> tuple[int, dict[str, int]]:
    """pending_summary's figures the O(n) way, as the reference for the running counts."""
    (messages,) = store.conn.execute(
        "SELECT COUNT(DISTINCT message_id) FROM recipients WHERE state IN ('queued', 'deferred')"
    ).fetchone()
    by_state = dict(store.conn.execute(
        "SELECT state, COUNT(*) FROM recipients WHERE state IN ('queued', 'deferred') GROUP BY state"
    ).fetchall())
    return messages, by_state


async def test_running_counts_follow_stores_outcomes_retries_deletes_and_purges(spool, store):
    messages = [new_message(recipients=("a@x.org", "b@x.org", "c@x.org")) for _ in range(4)]
    for message in messages:
        await spool.store(message)
    seen = []
    await spool.record([update(messages[0].id, 0, State.DEFERRED, RECEIVED + 60)])
    seen.append(await spool.pending_summary())
    await spool.record([update(messages[1].id, idx, State.DELIVERED) for idx in range(3)])
    seen.append(await spool.pending_summary())
    await spool.record([update(messages[2].id, 0, State.FAILED, reply="550 no")], [new_message(recipients=("s@acme.com",))])
    seen.append(await spool.pending_summary())
    await spool.retry()
    await spool.delete(messages[3].id)
    seen.append(await spool.pending_summary())
    assert await spool.purge_final(RECEIVED + 1) == 1
    seen.append(await spool.pending_summary())
    assert [(count, by_state) for count, by_state, _ in seen] == [
        (4, {"queued": 11, "deferred": 1}),
        (3, {"queued": 8, "deferred": 1}),
        (4, {"queued": 8, "deferred": 1}),  # the DSN is a message of its own
        (3, {"queued": 5, "deferred": 1}),
        (3, {"queued": 5, "deferred": 1}),
    ]
    assert seen[-1][:2] == counted_from_rows(store)
    assert seen[-1][2] == RECEIVED


def test_the_running_counts_are_counted_once_for_a_spool_that_had_none(path):
    """A spool.db of a release before the counts: counted from its rows when it is opened."""
    store = open_store(path)
    store.conn.execute("BEGIN")
    for _ in range(3):
        store.insert(new_message())
    store.record([update("M-none", 0, State.DELIVERED)])
    store.conn.execute("COMMIT")
    store.conn.executescript(
        "DROP TABLE spool_counts; DROP TRIGGER spool_counts_body_in; DROP TRIGGER spool_counts_body_out; "
        "DROP TRIGGER spool_counts_recipient_in; DROP TRIGGER spool_counts_recipient_moved; "
        "DROP TRIGGER spool_counts_recipient_out;"
    )
    store.conn.close()
    reopened = open_store(path)
    try:
        assert reopened.pending_summary()[:2] == counted_from_rows(reopened) == (3, {"queued": 6})
    finally:
        reopened.conn.close()


async def test_purge_final_forgets_in_batches_oldest_first_and_leaves_pending_mail(spool, store, monkeypatch):
    final = [new_message(received_at=RECEIVED + n, recipients=("a@x.org",)) for n in range(1200)]
    waiting = new_message(received_at=RECEIVED, recipients=("a@x.org",))
    for message in [*final, waiting]:
        await spool.store(message)
    await spool.record([update(message.id, 0, State.DELIVERED) for message in final])
    assert store.purge_final(RECEIVED + 10**6, limit=100) == 100
    assert store.conn.execute("SELECT MIN(received_at) FROM messages WHERE pending = 0").fetchone() == (RECEIVED + 100,)
    batches = []
    real = SpoolStore.purge_final
    monkeypatch.setattr(SpoolStore, "purge_final", lambda self, *args: batches.append(real(self, *args)) or batches[-1])
    assert await spool.purge_final(RECEIVED + 10**6) == 1100
    assert batches == [500, 500, 100]  # each its own transaction: mail commits in between
    assert [m.id for m in await spool.list(ListQuery(include_final=True))] == [waiting.id]


def test_purge_final_walks_the_final_index():
    conn = sqlite3.connect(":memory:")
    from relay.spool.sqlite import _LATE_SCHEMA, _SCHEMA

    conn.executescript(_SCHEMA + _LATE_SCHEMA)
    plan = " ".join(row[3] for row in conn.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM messages INDEXED BY messages_final "
        "WHERE pending = 0 AND received_at < ? ORDER BY received_at LIMIT ?", (1.0, 5)))
    assert "messages_final" in plan and "TEMP B-TREE" not in plan


@pytest.mark.parametrize(("log_bytes", "file_bytes", "idle", "mode"), [
    (0, 0, True, None),  # nothing written
    (4096, 8192, False, None),  # small: PASSIVE is enough, the log starts over when the writer pauses
    (32 * 2**20, 32 * 2**20, False, "RESTART"),  # past the bound under load: wait once for the writer
    (0, 32 * 2**20, True, "TRUNCATE"),  # a large file and the writer idle: give the disk back
    (0, 32 * 2**20, False, None),  # a large file, but busy: a TRUNCATE would hold up commits
])
def test_the_checkpoint_after_a_passive_one(log_bytes, file_bytes, idle, mode):
    from relay.spool.sqlite import after_passive

    assert after_passive(log_bytes, file_bytes, idle) == mode


async def test_the_wal_stays_bounded_under_steady_load_and_the_writer_never_checkpoints(path, monkeypatch):
    monkeypatch.setattr("relay.spool.sqlite._CHECKPOINT_EVERY", 0.05)
    monkeypatch.setattr("relay.spool.sqlite._WAL_BOUND", 1 * 2**20)
    wal = path.with_name(path.name + "-wal")
    spool = SqliteSpool(path)
    await spool.open()
    try:
        largest = 0
        body = b"Subject: s\r\n\r\n" + b"x" * 20_000

        async def writing(sessions: int) -> None:
            for _ in range(150):  # 8 sessions x 150 x 20 KB: 24 MB through the WAL, never pausing
                await spool.store(dataclasses.replace(new_message(), body=body))

        async def watching() -> None:
            nonlocal largest
            while True:
                largest = max(largest, wal.stat().st_size if wal.exists() else 0)
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watching())
        await asyncio.gather(*(writing(n) for n in range(8)))
        watcher.cancel()
        autocheckpoint = await spool._write(lambda store: store.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0])
    finally:
        await spool.close()
    assert 0 < largest < 12 * 2**20, largest  # the bound and what a noisy machine writes until the next look
    assert autocheckpoint == 0


def test_stranded_finds_the_accounts_with_mail_waiting_by_their_index_without_reading_the_backlog(path):
    store = open_store(path)
    store.conn.execute("BEGIN")
    for _ in range(300):
        store.insert(new_message(recipients=("a@x.org",)))
    store.insert(dataclasses.replace(new_message(), account="gone_account"))
    store.conn.execute("COMMIT")
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    store.conn.set_progress_handler(count, 1)
    assert store.stranded(RECEIVED + 1, 10, ("acme_trigger", "gone_account")) == []
    nothing_stranded = steps[0]
    store.conn.set_progress_handler(None, 1)
    assert nothing_stranded < 300  # a few steps per account, not one per waiting message
    assert [m.account for m in store.stranded(RECEIVED + 1, 10, ACCOUNTS)] == ["gone_account"]
    store.conn.close()


# -- reading a body for delivery: one blob handle per walk, its snapshot bounded --------------------


@pytest.mark.parametrize(("age", "restarting", "kept"), [
    (0.0, False, True),  # a delivery under way keeps its handle: no walk from the start per chunk
    (0.49, False, True),
    (0.5, False, False),  # held long enough: the next chunk opens again, at its offset
    (0.0, True, False),  # a RESTART or TRUNCATE waits to start the WAL over: no snapshot may stand in its way
])
def test_a_body_reader_keeps_its_snapshot_for_a_bounded_time_and_never_against_a_restart(age, restarting, kept):
    from relay.spool.sqlite import keep_snapshot

    assert keep_snapshot(age, restarting) is kept


def _big(store, chunks: int = 5) -> NewMessage:
    body = b"Subject: s\r\n\r\n" + bytes(index % 251 for index in range(chunks * 256 * 1024 - 16)) + b"\r\n"
    message = dataclasses.replace(new_message(), body=body)
    store.conn.execute("BEGIN")
    store.insert(message)
    store.conn.execute("COMMIT")
    return message


@pytest.mark.parametrize(("step", "restart_wanted", "transactions"), [
    (0.0, False, 1),  # one snapshot, one handle for the whole body
    (0.3, False, 3),  # the clock passes the bound every other chunk: opened again there
    (0.0, True, 5),  # a RESTART wanted: a short transaction per chunk, as before
])
def test_a_body_reader_reads_the_whole_body_in_order_whatever_its_snapshots(path, store, step, restart_wanted, transactions):
    from relay.spool.sqlite import BodyReader, body_connection

    message = _big(store)
    body = b"".join(message.pieces)
    now = [0.0]

    def clock() -> float:
        now[0] += step
        return now[0]

    conn = body_connection(path)
    begun = []
    conn.set_trace_callback(lambda sql: begun.append(sql) if sql == "BEGIN" else None)
    reader = BodyReader(conn, message.id, len(body), clock)
    data = b""
    while len(data) < len(body):
        data += reader.read(len(data), store.body_rowid(message.id), restart_wanted)
        if step == 0.0:
            assert conn.in_transaction is not restart_wanted
    assert data == body
    assert len(begun) == transactions
    assert reader.close() is conn and not conn.in_transaction
    conn.close()


def test_a_body_reader_sees_its_body_gone_or_replaced_by_another_row(path, store):
    from relay.spool.sqlite import BodyReader, body_connection

    message = _big(store, 3)
    reader = BodyReader(body_connection(path), message.id, message.size)
    rowid = store.body_rowid(message.id)
    assert len(reader.read(0, rowid, False)) == 256 * 1024
    with pytest.raises(BodyGone):
        reader.read(256 * 1024, rowid + 1, False)  # the same ID, another row: never read on from it
    assert reader.close() is not None
    with pytest.raises(BodyGone):
        BodyReader(body_connection(path), message.id, message.size + 1).read(0, rowid, False)  # not the size it had


async def test_a_delivery_that_stops_early_leaves_no_snapshot_behind(path, spool):
    """The upstream failed mid-DATA: the walk is closed, its connection kept for the next
    delivery with no transaction open, so a RESTART of the WAL is not held up."""
    message = dataclasses.replace(new_message(), body=b"Subject: s\r\n\r\n" + b"x" * (5 * 256 * 1024))
    await spool.store(message)
    first, size = await spool.start(message.id)
    chunks = spool.chunks(message.id, len(first), size)
    await anext(chunks)
    await chunks.aclose()
    await spool._read(lambda: None)  # the close queued behind the read ahead
    assert spool._idle_body_connections and not any(conn.in_transaction for conn in spool._idle_body_connections)
    assert await spooled(spool, message.id) == message.body  # the next delivery takes that connection
    await spool._read(lambda: None)  # and gives it back
    assert len(spool._idle_body_connections) == 1


async def test_a_stalled_delivery_does_not_hold_the_writer_up_for_its_restart(path, spool):
    """A delivery waiting on a slow upstream keeps its snapshot; the writer's RESTART waits for it
    only briefly (_RESTART_WAIT_MS, then the next try), not for its busy timeout (10 s)."""
    message = dataclasses.replace(new_message(), body=b"Subject: s\r\n\r\n" + b"x" * (5 * 256 * 1024))
    await spool.store(message)
    first, size = await spool.start(message.id)
    chunks = spool.chunks(message.id, len(first), size)
    await anext(chunks)
    await spool._read(lambda: None)  # the read ahead is done: the snapshot is open, the walk stalled
    spool._restart_wanted.set()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await spool.store(new_message())
    await spool.store(new_message())  # the restart ran between the two groups
    assert loop.time() - started < 5
    assert not spool._restart_wanted.is_set()
    assert await spool._write(lambda store: store.conn.execute("PRAGMA busy_timeout").fetchone()[0]) == 10000
    rest = b"".join([chunk async for chunk in chunks])
    assert first + b"x" * 256 * 1024 + rest == message.body


def _reading(conn: sqlite3.Connection) -> bool:
    """Whether a connection holds a read transaction; False for one closed and not yet collected
    (another test's: the whole suite leaves some behind)."""
    try:
        return conn.in_transaction
    except sqlite3.ProgrammingError:
        return False


@pytest.mark.parametrize("flag", ["_restart_wanted", "_truncating"])
async def test_a_delivery_keeps_no_snapshot_while_the_wal_is_to_start_over(spool, flag):
    message = dataclasses.replace(new_message(), body=b"Subject: s\r\n\r\n" + b"x" * (5 * 256 * 1024))
    await spool.store(message)
    first, size = await spool.start(message.id)
    chunks = spool.chunks(message.id, len(first), size)
    await anext(chunks)
    getattr(spool, flag).set()
    await anext(chunks)  # the chunk read ahead; the next read ahead ends its transaction
    await spool._read(lambda: None)
    readers = [conn for conn in gc.get_objects() if isinstance(conn, sqlite3.Connection) and _reading(conn)]
    getattr(spool, flag).clear()
    assert readers == []
    await chunks.aclose()
