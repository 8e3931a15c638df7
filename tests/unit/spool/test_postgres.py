"""What only the PostgreSQL spool has: group commit over asyncpg, bodies in pieces, leases shared by
nodes (claims, fencing, renew, release), NOTIFY, migrations. The contract every backend keeps is in
test_protocol.py; these run on the private cluster (``postgres_dsn``)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
import tracemalloc

import asyncpg
import pytest

from relay.process.startup import StartupError, open_spool_or_refuse
from relay.spool import FileRegion, ListQuery, NewMessage, RecipientUpdate, State
from relay.spool.events_model import ReceivedEvent
from relay.spool.postgres import PIECE, PostgresSpool, QueueIdTaken, inline_body, list_sql, uniform_pieces
from relay.spool.postgres_migrate import migrate, mismatch, schema_version
from relay.spool.postgres_schema import LATEST
from tests.support.postgres import migrated_postgres_spool
from tests.unit.spool.test_list_query import PAGES  # the same pages as SQLite's plans are checked on

T0 = 1_700_000_000.0
ACCOUNTS = ("acme_trigger",)
HEAD = b"From: billing@acme.com\r\nSubject: hi\r\n\r\n"


def message(message_id: str, recipients=("a@example.org",), received_at: float = T0, body=HEAD + b"hello\r\n"):
    return NewMessage(message_id, received_at, "billing", "smtp", "10.20.0.5", "acme_trigger", "trigger",
                      "billing@acme.com", list(recipients), body)


@pytest.fixture
async def nodes(postgres_dsn, tmp_path):
    """Two nodes, ``a`` and ``b``, on one database; a's lease is short enough to see it run out."""
    a = await migrated_postgres_spool(postgres_dsn, tmp_path, node="a", lease=0.5)
    b = PostgresSpool(postgres_dsn, node="b", lease=30.0, spill_directory=tmp_path)
    await a.open()
    await b.open()
    yield a, b
    await a.close()
    await b.close()


# -- pure parts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("pieces, expected", [
    ((), []),
    ((b"",), []),
    ((b"abc",), [3]),
    ((b"x" * PIECE,), [PIECE]),
    ((b"h" * 10, memoryview(b"x" * PIECE)), [PIECE, 10]),
    ((b"h" * 10, b"x" * (2 * PIECE + 5)), [PIECE, PIECE, 15]),
])
def test_a_body_is_cut_into_pieces_of_exactly_256_kib_but_the_last(pieces, expected):
    cut = list(uniform_pieces(pieces))
    assert [len(piece) for piece in cut] == expected
    assert b"".join(cut) == b"".join(bytes(piece) for piece in pieces)


def test_only_a_small_body_in_memory_goes_inline():
    with tempfile.TemporaryFile() as file:
        file.write(b"x" * 10)
        assert inline_body(message("A", body=b"x" * PIECE * 4))
        assert not inline_body(message("A", body=b"x" * (PIECE * 4 + 1)))
        assert not inline_body(message("A", body=(HEAD, FileRegion(file, 0, 10))))


def test_a_page_of_queue_list_numbers_its_parameters_in_order():

    sql, parameters = list_sql(ListQuery(user="crm", to="A@x.org", after="M1", limit=5, state=State.DEFERRED))
    assert parameters == ["M1", "crm", "a@x.org", "deferred", 5]
    assert "m.pending AND m.id > $1" in sql and sql.endswith("ORDER BY m.id LIMIT $5")


@pytest.mark.parametrize("found, problem", [
    (0, "spool database is at schema version 0, this relay needs 3: run sendcloud-relay migrate"),
    (3, None),
    (4, "spool database is newer (4) than this relay (3): upgrade the relay"),
])
def test_the_schema_must_be_exactly_the_relays(found, problem):
    assert mismatch(found, 3) == problem


# -- group commit -------------------------------------------------------------------------------------


async def test_concurrent_stores_share_commits_and_a_bad_one_fails_alone(nodes):
    a, _ = nodes
    await a.store(message("TAKEN"))
    commits = a.commits
    results = await asyncio.gather(*(a.store(message(f"M{n:02d}")) for n in range(20)), a.store(message("TAKEN")),
                                   return_exceptions=True)
    assert isinstance(results[-1], QueueIdTaken) and "TAKEN" in str(results[-1])
    assert results[:-1] == [None] * 20
    assert 1 <= a.commits - commits < 21
    assert len(await a.list()) == 21


async def test_a_failed_commit_fails_the_whole_group(nodes, postgres_dsn):
    a, _ = nodes
    conn = await asyncpg.connect(postgres_dsn)
    try:  # every commit fails: a deferred trigger that refuses every insert, run at COMMIT
        await conn.execute("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                           "$$ BEGIN RAISE EXCEPTION 'disk full'; END $$")
        await conn.execute("CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON messages DEFERRABLE INITIALLY DEFERRED "
                           "FOR EACH ROW EXECUTE FUNCTION refuse()")
    finally:
        await conn.close()
    results = await asyncio.gather(*(a.store(message(f"M{n}")) for n in range(5)), return_exceptions=True)
    assert all(isinstance(result, OSError) and "disk full" in str(result) for result in results)
    assert await a.list() == []


async def test_a_bug_in_a_write_fails_its_group_and_the_spool_keeps_committing(nodes, monkeypatch):
    """Not a database error: the group's callers get an OSError (their 451) at once, not at
    commit_timeout, and the batcher lives on for the next group."""
    a, _ = nodes
    real_insert = a._insert
    calls = []

    async def buggy_once(conn, messages):
        calls.append(len(messages))
        if len(calls) == 1:
            raise KeyError("a bug")
        await real_insert(conn, messages)

    monkeypatch.setattr(a, "_insert", buggy_once)
    with pytest.raises(OSError, match="KeyError"):
        await asyncio.wait_for(a.store(message("M1")), 2)
    await a.store(message("M2"))
    assert [m.id for m in await a.list()] == ["M2"]


async def test_outcomes_counters_and_events_of_many_callers_share_one_commit_each_with_its_own_result(nodes):
    a, b = nodes
    for name in ("M1", "M2", "M3"):
        await a.store(message(name))
    await a.store_event(ReceivedEvent(T0, "open", "{}", ("known",)))
    await asyncio.sleep(0.7)  # a's lease runs out: b takes M3 over
    assert [m.id for m in await b.due(time.time(), 10, ACCOUNTS)] == ["M1", "M2", "M3"]
    await b.release(["M1", "M2"])
    assert {m.id for m in await a.due(time.time(), 10, ACCOUNTS)} == {"M1", "M2"}
    hour = ("2026-12-01T10", "user", "billing", "requested")
    commits, operations = a.commits, a.operations
    results = await asyncio.gather(
        a.record([RecipientUpdate("M1", 0, State.DELIVERED, 1, T0, "250 ok")]),
        a.record([RecipientUpdate("M2", 0, State.FAILED, 1, T0, "550 no")], [message("DSN2")]),
        a.record([RecipientUpdate("M3", 0, State.FAILED, 1, T0, "550 no")], [message("DSN3")]),  # b's now
        a.add_stats([(*hour, 1)]), a.add_stats([(*hour, 2), ("2026-12-01T10", "account", "acme", "requested", 1)]),
        a.store_event(ReceivedEvent(T0, "open", "{}", ("new", "same"))),
        a.store_event(ReceivedEvent(T0, "open", "{}", ("same",))),  # a key the group's first event took
        a.store_event(ReceivedEvent(T0, "open", "{}", ("known", "other"))),  # a key of an earlier event
    )
    assert (a.commits, a.operations) == (commits + 1, operations + 8)  # every one in the group
    assert results[:3] == [set(), set(), {"M3"}]
    assert isinstance(results[5], int) and results[6:] == [None, None]
    assert [r.state for r in (await a.get("M1")).recipients + (await a.get("M2")).recipients] == [
        State.DELIVERED, State.FAILED]
    assert await a.get("DSN2") is not None and await a.get("DSN3") is None  # no DSN for a fenced outcome
    assert (await a.get("M3")).recipients[0].state is State.QUEUED
    assert sorted(await a.stats("2026-12-01T00")) == [("2026-12-01T10", "account", "acme", "requested", 1), (*hour, 3)]
    assert await a._db().fetchval("SELECT count(*) FROM events") == 2  # the refused ones left nothing behind
    assert await a._db().fetchval("SELECT count(*) FROM event_keys WHERE key = 'other'") == 0


async def test_a_write_that_fails_in_a_merged_group_fails_alone(nodes):
    a, _ = nodes
    for name in ("M1", "M2"):
        await a.store(message(name))
    await a.store(message("TAKEN"))
    commits = a.commits
    results = await asyncio.gather(
        a.record([RecipientUpdate("M1", 0, State.DELIVERED, 1, T0, "250 ok")]),
        a.record([RecipientUpdate("M2", 0, State.FAILED, 1, T0, "550 no")], [message("TAKEN")]),  # its DSN's ID is taken
        a.add_stats([("2026-12-01T10", "user", "billing", "requested", 1)]),
        a.store(message("M4")),
        return_exceptions=True,
    )
    assert a.commits == commits + 1
    assert results[0] == set() and isinstance(results[1], QueueIdTaken) and results[2:] == [None, None]
    assert (await a.get("M1")).recipients[0].state is State.DELIVERED
    assert (await a.get("M2")).recipients[0].state is State.QUEUED  # the failed record changed nothing
    assert await a.stats("2026-12-01T00") == [("2026-12-01T10", "user", "billing", "requested", 1)]
    assert await a.get("M4") is not None


async def test_a_pooled_connection_is_given_back_without_a_reset_round_trip_but_never_inside_a_transaction(nodes):
    a, _ = nodes
    async with a._db().acquire() as conn:
        raw = conn._con  # the connection behind the pool's proxy
        queries = []
        raw.add_query_logger(lambda record: queries.append(record.query))
        await conn.execute("BEGIN")  # left open by a careless user
    assert queries == ["BEGIN", "ROLLBACK"]  # asyncpg's own safety net, and nothing else
    async with a._db().acquire() as conn:
        assert conn._con is raw and not conn.is_in_transaction()


# -- bodies -------------------------------------------------------------------------------------------


async def test_a_10_mb_body_from_a_file_is_stored_and_read_back_a_piece_at_a_time(nodes, postgres_dsn):
    a, _ = nodes
    size = 10 * 1024 * 1024
    with tempfile.TemporaryFile() as file:
        digest = hashlib.sha256(HEAD)
        for _ in range(size // (1024 * 1024)):
            block = os.urandom(1024 * 1024)
            file.write(block)
            digest.update(block)
        file.flush()
        tracemalloc.start()
        try:
            await a.store(message("BIG", body=(HEAD, FileRegion(file, 0, size))))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, peak  # a few pieces in flight, never the whole 10 MB
    conn = await asyncpg.connect(postgres_dsn)
    try:
        lengths = [row[0] for row in await conn.fetch("SELECT length(data) FROM bodies WHERE message_id = 'BIG' "
                                                      "ORDER BY seq")]
    finally:
        await conn.close()
    assert lengths[:-1] == [PIECE] * (len(lengths) - 1) and sum(lengths) == size + len(HEAD)
    first, total = await a.start("BIG")
    assert total == size + len(HEAD) and first.startswith(HEAD) and len(first) <= PIECE
    read = hashlib.sha256(first)
    chunks = [chunk async for chunk in a.chunks("BIG", len(first), total)]
    for chunk in chunks:
        read.update(chunk)
    assert max(len(chunk) for chunk in chunks) <= PIECE
    assert read.hexdigest() == digest.hexdigest()


# -- leases ------------------------------------------------------------------------------------------


async def test_a_node_delivers_its_own_intake_until_its_lease_runs_out_then_another_takes_over(nodes):
    a, b = nodes
    await a.store(message("M1"))
    assert await b.due(time.time(), 10, ACCOUNTS) == []  # a holds it from the store on
    assert [m.id for m in await a.due(time.time(), 10, ACCOUNTS)] == ["M1"]  # its own, again
    await asyncio.sleep(0.7)  # a's lease (0.5 s) runs out
    assert [m.id for m in await b.due(time.time(), 10, ACCOUNTS)] == ["M1"]
    assert await a.due(time.time(), 10, ACCOUNTS) == []  # b holds it now

    deferred = RecipientUpdate("M1", 0, State.DEFERRED, 1, T0 + 600, "451 later")
    assert await b.record([deferred]) == set()
    late = RecipientUpdate("M1", 0, State.DELIVERED, 1, T0, "250 ok")
    dsn = message("DSN1")
    assert await a.record([late], [dsn]) == {"M1"}  # fenced: b's outcome stands, and no DSN of a's
    recipient = (await a.get("M1")).recipients[0]
    assert (recipient.state, recipient.last_reply) == (State.DEFERRED, "451 later")
    assert await a.get("DSN1") is None

    assert await a.renew(["M1"]) == {"M1"}
    assert await b.renew(["M1"]) == set()


async def test_a_released_lease_is_free_at_once_and_a_final_message_gives_its_lease_back(nodes):
    a, b = nodes
    await b.store(message("M1"))
    await b.store(message("M2"))
    assert await a.due(time.time(), 10, ACCOUNTS) == []
    await b.release(["M1"])
    assert [m.id for m in await a.due(time.time(), 10, ACCOUNTS)] == ["M1"]
    await b.record([RecipientUpdate("M2", 0, State.DELIVERED, 1, T0, "250 ok")])
    conn_row = await a._db().fetchrow("SELECT pending, lease_until FROM messages WHERE id = 'M2'")
    assert (conn_row["pending"], conn_row["lease_until"]) == (False, None)


async def test_two_nodes_claiming_at_once_never_get_the_same_message(postgres_dsn, tmp_path):
    intake = await migrated_postgres_spool(postgres_dsn, tmp_path, node="intake", lease=0.001)
    a = PostgresSpool(postgres_dsn, node="a", spill_directory=tmp_path)
    b = PostgresSpool(postgres_dsn, node="b", spill_directory=tmp_path)
    for spool in (intake, a, b):
        await spool.open()
    try:
        await asyncio.gather(*(intake.store(message(f"M{n:03d}", received_at=T0 + n)) for n in range(300)))
        await asyncio.sleep(0.05)  # the intake node's leases have run out

        async def claim_all(node: PostgresSpool) -> list[str]:
            """Claim and deliver until nothing is left (a node's own claims stay claimable by it)."""
            claimed = []
            while batch := await node.due(T0 + 1000, 7, ACCOUNTS):
                claimed += [m.id for m in batch]
                assert await node.record([RecipientUpdate(m.id, 0, State.DELIVERED, 1, T0, "250") for m in batch]) == set()
            return claimed

        got_a, got_b = await asyncio.gather(claim_all(a), claim_all(b))
        assert not set(got_a) & set(got_b)
        assert sorted(got_a + got_b) == [f"M{n:03d}" for n in range(300)]
        assert got_a and got_b
    finally:
        for spool in (intake, a, b):
            await spool.close()


async def test_limit_counts_messages_each_with_all_its_due_recipients_earliest_due_first(nodes):
    a, _ = nodes
    await a.store(message("A1", recipients=("a0@x.org", "a1@x.org", "a2@x.org")))
    await a.store(message("B2", recipients=("b0@x.org", "b1@x.org")))
    await a.store(message("C3", recipients=("c0@x.org",)))
    await a.record([
        RecipientUpdate("A1", 0, State.DEFERRED, 1, T0 + 30, "451"),
        RecipientUpdate("A1", 1, State.DEFERRED, 1, T0 + 30, "451"),
        RecipientUpdate("A1", 2, State.DELIVERED, 1, T0, "250"),
        RecipientUpdate("B2", 0, State.DEFERRED, 1, T0 + 10, "451"),
        RecipientUpdate("B2", 1, State.DEFERRED, 1, T0 + 10, "451"),
        RecipientUpdate("C3", 0, State.DEFERRED, 1, T0 + 20, "451"),
    ])
    picked = await a.due(T0 + 100, 2, ACCOUNTS)
    assert [(m.id, [r.idx for r in m.recipients]) for m in picked] == [("B2", [0, 1]), ("C3", [0])]
    picked = await a.due(T0 + 100, 10, ACCOUNTS)
    assert [(m.id, [r.idx for r in m.recipients]) for m in picked] == [("B2", [0, 1]), ("C3", [0]), ("A1", [0, 1])]
    assert await a.due(T0 + 5, 10, ACCOUNTS) == []


# -- LISTEN/NOTIFY --------------------------------------------------------------------------------------


async def test_a_flush_or_a_release_on_another_node_wakes_wait_for_work(nodes):
    a, b = nodes
    await a.store(message("M1"))
    await a.record([RecipientUpdate("M1", 0, State.DEFERRED, 1, T0 + 9e9, "451")])
    await b.wait_for_work(0)  # listening from now on
    for wake in (lambda: a.retry(), lambda: a.release(["M1"])):
        waiting = asyncio.create_task(b.wait_for_work(30))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        started = time.monotonic()
        await wake()
        assert await asyncio.wait_for(waiting, 5) is True  # the scheduler then looks behind its walk
        assert time.monotonic() - started < 5
    started = time.monotonic()
    assert await b.wait_for_work(0.2) is False  # nothing announced: the whole timeout
    assert time.monotonic() - started >= 0.19


async def test_wait_for_work_listens_again_after_its_connection_drops(nodes, postgres_dsn):
    a, b = nodes
    await b.wait_for_work(0)
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE pid <> pg_backend_pid() AND query LIKE 'LISTEN%'")
    finally:
        await conn.close()
    await asyncio.wait_for(b.wait_for_work(30), 5)  # the drop itself wakes it (notifications may be lost)
    await b.wait_for_work(0)  # connects again
    await a.store(message("M1"))
    waiting = asyncio.create_task(b.wait_for_work(30))
    await asyncio.sleep(0.1)
    await a.retry("M1")
    await asyncio.wait_for(waiting, 5)


# -- migrations and startup ------------------------------------------------------------------------------


async def test_migrating_twice_or_from_two_nodes_at_once_is_harmless(postgres_dsn):
    first, second = await asyncpg.connect(postgres_dsn), await asyncpg.connect(postgres_dsn)
    try:
        applied = await asyncio.gather(migrate(first), migrate(second))
        assert sorted(version for done in applied for version, _ in done) == list(range(1, LATEST + 1))  # once each
        assert await migrate(first) == []
        assert await schema_version(first) == LATEST
        assert await first.fetchval("SELECT count(*) FROM schema_migrations") == LATEST
    finally:
        await first.close()
        await second.close()


async def test_the_hot_tables_vacuum_after_one_percent_dead_rows(postgres_dsn):
    """A queue table bloats at autovacuum's default 20 %: migrate sets the hot tables' own thresholds."""
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await migrate(conn)
        rows = await conn.fetch("SELECT relname, reloptions FROM pg_class WHERE relname = ANY($1::text[])",
                                ["messages", "recipients", "bodies", "events"])
        options = {row["relname"]: set(row["reloptions"] or ()) for row in rows}
    finally:
        await conn.close()
    for table in ("messages", "recipients", "bodies"):
        assert {"autovacuum_vacuum_scale_factor=0.01", "autovacuum_vacuum_cost_delay=0"} <= options[table], table
    assert options["events"] == set()


async def test_serve_refuses_an_unmigrated_and_a_newer_database_with_one_line(postgres_dsn, tmp_path):
    spool = PostgresSpool(postgres_dsn, node="a", spill_directory=tmp_path)
    with pytest.raises(StartupError) as refused:
        await open_spool_or_refuse(spool)
    assert str(refused.value) == (f"spool database is at schema version 0, this relay needs {LATEST}: "
                                  "run sendcloud-relay migrate")
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await migrate(conn)
        await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, 'future')", LATEST + 1)
    finally:
        await conn.close()
    with pytest.raises(StartupError) as refused:
        await open_spool_or_refuse(spool)
    assert str(refused.value) == f"spool database is newer ({LATEST + 1}) than this relay ({LATEST}): upgrade the relay"


async def test_a_connection_error_never_shows_the_password(tmp_path):
    from tests.support import free_port

    spool = PostgresSpool(f"postgresql://relay:hunter2secret@127.0.0.1:{free_port()}/relay", node="a",
                          spill_directory=tmp_path)
    with pytest.raises(OSError) as failed:
        await spool.open()
    assert "hunter2secret" not in str(failed.value) and "relay:***@127.0.0.1" in str(failed.value)


# -- queue list: a page walks an index in ID order --------------------------------------------------------




@pytest.fixture(scope="module")
def big_database(postgres_cluster):
    """100,000 messages of one recipient each, nine in ten delivered, analysed."""
    dsn = postgres_cluster.create_database()

    async def fill() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
            await conn.execute(
                'INSERT INTO messages (id, received_at, "user", listener, client, account, channel, sender, size, '
                "pending, next_due) SELECT 'M' || lpad(n::text, 7, '0'), $1 + n, 'billing', 'smtp', '10.0.0.5', "
                "'acme_trigger', 'trigger', 'a@acme.com', 5, n % 10 = 0, CASE WHEN n % 10 = 0 THEN $1 + n END "
                "FROM generate_series(0, 99999) AS n", T0)
            await conn.execute(
                "INSERT INTO recipients (message_id, idx, address, state, next_attempt) SELECT 'M' || lpad(n::text, 7, "
                "'0'), 0, 'r' || n || '@example.org', CASE WHEN n % 10 = 0 THEN 'deferred' ELSE 'delivered' END, $1 + n "
                "FROM generate_series(0, 99999) AS n", T0)
            await conn.execute("ANALYZE")
        finally:
            await conn.close()

    asyncio.run(fill())
    return dsn


@pytest.mark.parametrize("query", PAGES.values(), ids=PAGES.keys())
def test_a_page_of_queue_list_walks_an_index_and_never_sorts_or_scans(big_database, query):
    async def plan() -> str:
        conn = await asyncpg.connect(big_database)
        try:
            sql, parameters = list_sql(query)
            return "\n".join(row[0] for row in await conn.fetch(f"EXPLAIN {sql}", *parameters))
        finally:
            await conn.close()

    text = asyncio.run(plan())
    index = "messages_pending" if query.pending_only else "messages_pkey"
    assert f"Index Scan using {index}" in text and "Sort" not in text and "Seq Scan on messages" not in text, text
