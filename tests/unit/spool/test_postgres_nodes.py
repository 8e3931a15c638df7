"""Two relay nodes on one PostgreSQL database (the private cluster): what must hold across them.

Each "node" is a PostgresSpool of its own on its own pool (as two machines would have).
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from relay.config import Spool as SpoolSettings
from relay.policy.auth import AuthGuard, GuardSettings
from relay.policy.rates import PersistentRates
from relay.spool import rate_store, suppression_reader
from relay.spool.events_model import Applied, OutboxRow, ReceivedEvent
from relay.spool.postgres_events import PostgresRateStore, PostgresSuppressionReader, rate_rows
from tests.support.postgres import migrate_database, migrated_postgres_spool

T0 = 1_700_000_000.0
ALL = frozenset({"batch", "trigger"})


@pytest.fixture
async def dsn(postgres_dsn):
    await migrate_database(postgres_dsn)
    return postgres_dsn


@pytest.fixture
async def nodes(dsn, tmp_path):
    a = await migrated_postgres_spool(dsn, tmp_path, node="node-a")
    b = await migrated_postgres_spool(dsn, tmp_path, node="node-b")
    await a.open()
    await b.open()
    yield a, b
    await a.close()
    await b.close()


async def expire_claims(dsn: str, table: str) -> None:
    """As if the node holding them had died CLAIM seconds ago."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"UPDATE {table} SET claimed_until = now() - interval '1 second' WHERE claimed_by IS NOT NULL")
    finally:
        await conn.close()


async def test_the_same_webhook_received_by_both_nodes_at_once_is_stored_once(nodes):
    a, b = nodes
    events = [ReceivedEvent(T0, "deliver", "{}", (f"token:{n}", f"event:deliver:{n}")) for n in range(30)]
    results = await asyncio.gather(*(node.store_event(e) for e in events for node in (a, b)))
    for n in range(30):
        pair = results[2 * n : 2 * n + 2]
        assert sum(r is not None for r in pair) == 1, pair
    # the keys of an event need not arrive in one order: a retry naming them the other way round
    assert await b.store_event(ReceivedEvent(T0, "deliver", "{}", ("event:deliver:3", "token:3"))) is None


async def test_an_unapplied_event_is_applied_by_the_node_that_stored_it_unless_it_died(nodes, dsn):
    a, b = nodes
    event_id = await a.store_event(ReceivedEvent(T0, "deliver", "{}", ("token:1",)))
    assert [e.id for e in await a.unapplied_events(10)] == [event_id]
    assert await b.unapplied_events(10) == []  # a's applier has it in hand
    await expire_claims(dsn, "events")
    assert [e.id for e in await b.unapplied_events(10)] == [event_id]
    assert await a.unapplied_events(10) == []  # now b's
    await b.apply_event(Applied(event_id))
    await expire_claims(dsn, "events")
    assert await a.unapplied_events(10) == [] and await b.unapplied_events(10) == []


async def test_a_suppression_change_on_one_node_changes_the_version_the_other_sees(nodes, dsn):
    a, b = nodes
    reader = PostgresSuppressionReader(dsn)  # what an acceptor process of node b reads
    try:
        assert await reader.suppression_version() == 0
        await a.add_suppressions([("x@example.org", "manual", ALL, None, T0, None, None)])
        seen = await b.suppression_version()
        assert seen > 0 and await reader.suppression_version() == seen
        assert [row[0] for row in await reader.suppressions()] == ["x@example.org"]
        assert await b.remove_suppression("nobody@example.org") == 0
        assert await a.suppression_version() == seen  # removing nothing changes nothing
        await asyncio.gather(
            a.add_suppressions([("y@example.org", "manual", ALL, None, T0, None, None)]),
            b.remove_suppression("x@example.org"),
            b.add_suppressions([("z@example.org", "manual", ALL, "acme_batch", T0, None, None)]),
        )
        assert await a.suppression_version() == seen + 3  # each change its own step, none lost
        assert [(row[0], row[3]) for row in await reader.suppressions()] == [
            ("y@example.org", None), ("z@example.org", "acme_batch")]
    finally:
        await reader.close()


async def test_statistics_added_on_both_nodes_at_once_add_up(nodes):
    a, b = nodes
    keys = [("2026-12-01T10", "user", f"team{n}", "delivered") for n in range(5)]
    rounds = 20
    # each node names the same counters in another order: locks taken in key order never deadlock
    await asyncio.gather(*(
        node.add_stats([(*key, 1) for key in (keys if node is a else keys[::-1])] + [(*keys[0], 1)])
        for _ in range(rounds) for node in (a, b)
    ))
    totals = {row[2]: row[4] for row in await b.stats("2026-12-01T00")}
    assert totals == {"team0": 4 * rounds, "team1": 2 * rounds, "team2": 2 * rounds, "team3": 2 * rounds,
                      "team4": 2 * rounds}


async def test_a_fanout_row_is_never_due_on_both_nodes_at_once(nodes, dsn):
    a, b = nodes
    rows = [OutboxRow("billing", "https://x.example/hook", f"{n}".encode(), T0, T0) for n in range(20)]
    await a.enqueue_fanout(rows)
    first, second = await asyncio.gather(a.due_fanout(T0, 8), b.due_fanout(T0, 8))
    taken = [row.id for row in first + second]
    assert len(taken) == len(set(taken)) == 16
    rest = await b.due_fanout(T0, 100)  # b's own again, and the four nobody held
    assert len(rest) == 12 and not {row.id for row in rest} & {row.id for row in first}
    assert [row.id for row in await a.due_fanout(T0, 100)] == [row.id for row in first]  # a's own, still a's
    await a.fanout_retry(first[0].id, 1, T0)  # a POST failed: back for whichever node comes next
    assert [row.id for row in await b.due_fanout(T0, 100)] == sorted([first[0].id, *(r.id for r in rest)])
    await expire_claims(dsn, "fanout")  # a died with the rest in hand
    assert len(await b.due_fanout(T0, 100)) == 20


async def test_rate_windows_saved_by_both_nodes_add_up_and_old_ones_go(dsn):
    a, b = PostgresRateStore(dsn), PostgresRateStore(dsn)
    now = time.time()
    current = int(now // 60)
    try:
        await a.save({("user:billing", 60.0, current - 5): 3}, now - 300)  # long gone by now
        saves = [node.save({("user:billing", 60.0, current): 1, ("client:192.0.2.7", 60.0, current): 2}, now)
                 for _ in range(10) for node in (a, b)]
        await asyncio.gather(*saves)
        stored = await b.save({}, now)
        assert stored == {("user:billing", 60.0, current): 10 * 2, ("client:192.0.2.7", 60.0, current): 2 * 10 * 2}
    finally:
        await a.close()
        await b.close()


def test_rate_rows_are_in_key_order_without_windows_already_forgotten():
    increments = {("b", 60.0, 10): 1, ("a", 60.0, 10): 2, ("a", 60.0, 7): 5, ("c", 60.0, 10): 0}
    assert rate_rows(increments, 11 * 60.0) == [["a", "b"], [60.0, 60.0], [10, 10], [2, 1]]


async def test_a_bad_dsn_is_an_oserror_that_names_no_password(dsn):
    store = PostgresRateStore(dsn.replace("relay@", "relay:hunter2@").rsplit("/", 1)[0] + "/no_such_database")
    with pytest.raises(OSError) as raised:
        await store.save({}, time.time())
    assert "hunter2" not in str(raised.value)
    await store.close()


# -- AUTH lockouts across nodes ----------------------------------------------------------------------


class Node:
    """One node's main process: its AuthGuard on its rate counter, synced through the database."""

    def __init__(self, dsn: str, settings: GuardSettings):
        self.rates = PersistentRates(PostgresRateStore(dsn))
        self.guard = AuthGuard(lambda: settings, shared=self.rates.counter)


SETTINGS = GuardSettings(base_delay=1.0, window=600.0, lockout_failures=5, lockout_duration=900.0, max_delay=30.0)


@pytest.fixture
async def two_nodes(dsn):
    pair = Node(dsn, SETTINGS), Node(dsn, SETTINGS)
    yield pair
    for node in pair:
        await node.rates.stop()


async def sync(*nodes: Node) -> None:
    """What each node's once-a-second save does: its counts out, everyone's back."""
    for node in nodes:
        await node.rates.save()
    for node in nodes:
        await node.rates.save()


async def test_a_guesser_alternating_nodes_is_locked_after_as_many_failures_as_on_one(two_nodes):
    one = AuthGuard(lambda: SETTINGS)
    alone = [one.failed("203.0.113.9", "billing") for _ in range(SETTINGS.lockout_failures)]
    assert one.locked_for("203.0.113.9", "billing") is not None
    delays, locked = [], []
    for n in range(SETTINGS.lockout_failures):
        node = two_nodes[n % 2]
        assert node.guard.locked_for("203.0.113.9", "billing") is None
        delays.append(node.guard.failed("203.0.113.9", "billing"))
        await sync(*two_nodes)
        locked.append([other.guard.locked_for("203.0.113.9", "billing") is not None for other in two_nodes])
    assert delays == alone  # the reply delay grows across nodes as on one
    assert locked == [[False, False]] * (SETTINGS.lockout_failures - 1) + [[True, True]]
    left = two_nodes[0].guard.locked_for("203.0.113.9", "billing")
    assert left == pytest.approx(SETTINGS.lockout_duration, abs=3)
    assert two_nodes[1].guard.locked_for("198.51.100.1", "billing") is not None  # the username, from anywhere new


async def test_a_smarthost_that_logged_in_on_one_node_is_not_locked_out_of_its_user_on_the_other(two_nodes):
    a, b = two_nodes
    a.guard.succeeded("10.0.0.5", "mailhub")
    for n in range(SETTINGS.lockout_failures):
        two_nodes[n % 2].guard.failed(f"203.0.113.{n}", "mailhub")  # a botnet guessing, over both nodes
    await sync(a, b)
    assert b.guard.locked_for("203.0.113.99", "mailhub") is not None
    assert b.guard.locked_for("10.0.0.5", "mailhub") is None


async def test_spool_backend_postgres_gives_every_process_the_shared_stores(dsn):
    settings = SpoolSettings(backend="postgres", dsn=dsn)
    rates, reader = rate_store(settings), suppression_reader(settings)
    try:
        assert isinstance(rates, PostgresRateStore) and isinstance(reader, PostgresSuppressionReader)
        assert await rates.save({}, time.time()) == {} and await reader.suppression_version() == 0
    finally:
        await rates.close()
        await reader.close()


async def test_both_nodes_applying_at_once_add_up_without_deadlock(nodes):
    a, b = nodes
    ids = {node: [await node.store_event(ReceivedEvent(T0, "invalid", "{}", (f"{id(node)}:{n}",))) for n in range(40)]
           for node in (a, b)}
    counters = [("2026-12-01T10", group, "v", "invalid", 1) for group in ("user", "account", "channel", "domain")]

    def applied(node, n, event_id):
        order = counters if (n + (node is b)) % 2 else counters[::-1]
        return Applied(event_id, suppression=(f"x{n % 3}@example.org", "invalid", ALL, None, T0, None, None),
                       stats=tuple(order))

    await asyncio.gather(*(node.apply_event(applied(node, n, event_id))
                           for node in (a, b) for n, event_id in enumerate(ids[node])))
    assert {row[1]: row[4] for row in await a.stats("2026-12-01T00")} == dict.fromkeys(
        ("account", "channel", "domain", "user"), 80)
    assert await a.unapplied_events(100) == [] and await b.unapplied_events(100) == []
    assert len(await b.suppressions()) == 3


async def test_an_applied_event_that_fails_in_a_group_fails_alone_and_stays_unapplied(nodes):
    a, _ = nodes
    good, bad = [await a.store_event(ReceivedEvent(T0, "open", "{}", (f"token:{n}",))) for n in range(2)]
    broken = OutboxRow("billing", "https://x.example/hook", "not bytes", T0, T0)  # refused by the database
    commits = a.commits
    results = await asyncio.gather(
        a.apply_event(Applied(good, stats=(("2026-12-01T10", "user", "billing", "open", 1),))),
        a.apply_event(Applied(bad, stats=(("2026-12-01T10", "user", "billing", "open", 1),), outbox=(broken,))),
        return_exceptions=True,
    )
    assert a.commits == commits + 1  # one group
    assert results[0] is None and "not bytes" in str(results[1])  # the applier reads the bad one back later
    assert [e.id for e in await a.unapplied_events(10)] == [bad]
    assert await a.stats("2026-12-01T00") == [("2026-12-01T10", "user", "billing", "open", 1)]  # the good one's only
