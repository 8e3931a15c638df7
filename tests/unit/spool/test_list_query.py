"""`queue list`'s query: the same answer from both backends, and work bounded by the page, not the spool."""

from __future__ import annotations

import dataclasses

import pytest

from relay.spool import ListQuery, NewMessage, RecipientUpdate, Spool, State
from relay.spool.memory import MemorySpool
from relay.spool.sqlite import SqliteSpool, list_sql, open_store
from tests.support.postgres import migrated_postgres_spool

T0 = 1_700_000_000.0


@pytest.fixture(params=["sqlite", "memory", "postgres"])
async def spool(request, tmp_path):
    if request.param == "postgres":
        spool: Spool = await migrated_postgres_spool(request.getfixturevalue("postgres_dsn"), tmp_path)
    else:
        spool = SqliteSpool(tmp_path / "spool.db") if request.param == "sqlite" else MemorySpool()
    await spool.open()
    yield spool
    await spool.close()


async def fill(spool: Spool) -> None:
    """Six messages: two users, pending, partly delivered, all delivered, one failed."""
    for number, (user, recipients) in enumerate([
        ("billing", ["a@example.org"]),
        ("billing", ["a@example.org", "B@Example.org"]),
        ("crm", ["c@example.org"]),
        ("crm", ["b@example.org"]),
        ("billing", ["d@example.org"]),
        ("crm", ["a@example.org", "e@example.org"]),
    ]):
        await spool.store(NewMessage(f"M{number}", T0 + number * 3600, user, "smtp", "10.0.0.5", "acme_trigger",
                                     "trigger", "Other@Acme.com" if number == 3 else "app@acme.com", recipients,
                                     b"Subject: x\r\n\r\nx\r\n"))
    await spool.record([
        RecipientUpdate("M1", 0, State.DELIVERED, 1, T0, "250 ok"),
        RecipientUpdate("M2", 0, State.DELIVERED, 1, T0, "250 ok"),
        RecipientUpdate("M3", 0, State.FAILED, 1, T0, "550 no"),
        RecipientUpdate("M4", 0, State.DEFERRED, 1, T0 + 9e9, "451 later"),
        RecipientUpdate("M5", 1, State.DEFERRED, 1, T0 + 9e9, "451 later"),
    ])


QUERIES = {
    "default_is_pending": (ListQuery(), ["M0", "M1", "M4", "M5"]),
    "all": (ListQuery(include_final=True), ["M0", "M1", "M2", "M3", "M4", "M5"]),
    "user": (ListQuery(user="crm"), ["M5"]),
    "user_all": (ListQuery(user="crm", include_final=True), ["M2", "M3", "M5"]),
    "to_any_case": (ListQuery(to="b@EXAMPLE.org"), ["M1"]),
    "to_all": (ListQuery(to="b@example.org", include_final=True), ["M1", "M3"]),
    "state_deferred": (ListQuery(state=State.DEFERRED), ["M4", "M5"]),
    "state_queued": (ListQuery(state=State.QUEUED), ["M0", "M1", "M5"]),
    "final_state_looks_at_all": (ListQuery(state=State.DELIVERED), ["M1", "M2"]),
    "failed": (ListQuery(state=State.FAILED), ["M3"]),
    "since": (ListQuery(since=T0 + 4 * 3600, include_final=True), ["M4", "M5"]),
    "before": (ListQuery(before=T0 + 2 * 3600, include_final=True), ["M0", "M1"]),
    "sender_any_case": (ListQuery(sender="other@ACME.com", include_final=True), ["M3"]),
    "sender_pending": (ListQuery(sender="app@acme.com", before=T0 + 5 * 3600), ["M0", "M1", "M4"]),
    "page": (ListQuery(limit=2), ["M0", "M1"]),
    "next_page": (ListQuery(after="M1", limit=2), ["M4", "M5"]),
    "everything_at_once": (ListQuery(user="billing", to="d@example.org", state=State.DEFERRED, after="M0",
                                     since=T0, limit=5), ["M4"]),
}


@pytest.mark.parametrize("query, expected", QUERIES.values(), ids=QUERIES.keys())
async def test_list_filters_and_pages_the_same_on_every_backend(spool, query, expected):
    await fill(spool)
    listed = await spool.list(query)
    assert [m.id for m in listed] == expected
    everything = await spool.list(ListQuery(include_final=True))
    assert [m.id for m in everything if query.matches(m)][: query.limit] == expected  # the reference agrees
    by_id = {m.id: m for m in everything}
    assert all(len(m.recipients) == len(by_id[m.id].recipients) for m in listed)  # each with all its recipients


MESSAGES = 100_000


def big_spool(path, count: int):
    """``count`` messages of one recipient each, most delivered, written in a few executemany calls."""
    store = open_store(path)
    conn = store.conn
    conn.execute("BEGIN")  # one transaction: the connection is in autocommit mode
    conn.executemany(
        "INSERT INTO messages (id, received_at, user, listener, client, account, channel, sender, size, pending) "
        "VALUES (?, ?, 'billing', 'smtp', '10.0.0.5', 'acme_trigger', 'trigger', 'a@acme.com', 5, ?)",
        ((f"M{n:07d}", T0 + n, n % 10 == 0) for n in range(count)),
    )
    conn.executemany("INSERT INTO bodies (message_id, body) VALUES (?, x'78')", ((f"M{n:07d}",) for n in range(0, count, 10)))
    conn.executemany(
        "INSERT INTO recipients (message_id, idx, address, state, next_attempt) VALUES (?, 0, ?, ?, ?)",
        ((f"M{n:07d}", f"r{n}@example.org", "delivered" if n % 10 else "deferred", T0 + n) for n in range(count)),
    )
    conn.execute("COMMIT")
    return store


def steps(store, query: ListQuery) -> tuple[int, list[str]]:
    """SQLite virtual-machine steps the query takes (deterministic: no clock), and the IDs it gives."""
    counted = [0]

    def count() -> int:
        counted[0] += 1
        return 0

    store.conn.set_progress_handler(count, 1)
    try:
        ids = [m.id for m in store.list(query)]
    finally:
        store.conn.set_progress_handler(None, 1)
    return counted[0], ids


@pytest.fixture(scope="module")
def spools(tmp_path_factory):
    """The same spool at 2,000 and at 100,000 messages, nine in ten of them delivered."""
    folder = tmp_path_factory.mktemp("big")
    return big_spool(folder / "small.db", 2_000), big_spool(folder / "large.db", MESSAGES)


PAGES = {
    "pending": ListQuery(limit=51),
    "pending_next_page": ListQuery(limit=51, after="M0010000"),
    "deferred": ListQuery(limit=51, state=State.DEFERRED),
    "user": ListQuery(limit=51, user="billing"),
    "all": ListQuery(limit=51, include_final=True),
    "delivered": ListQuery(limit=51, state=State.DELIVERED),
}


@pytest.mark.parametrize("query", PAGES.values(), ids=PAGES.keys())
def test_a_page_of_queue_list_costs_the_same_at_100k_messages_as_at_2k(spools, query):
    small, large = spools
    small_steps, small_ids = steps(small, dataclasses.replace(query, after=query.after and "M0001000"))
    large_steps, large_ids = steps(large, query)
    assert len(large_ids) == len(small_ids) == 51
    assert large_steps < 2 * small_steps, (small_steps, large_steps)  # a scan would be ~50 times more


@pytest.mark.parametrize("query", PAGES.values(), ids=PAGES.keys())
def test_queue_list_walks_an_index_in_order_and_never_sorts(spools, query):
    sql, parameters = list_sql(query)
    plan = " / ".join(row[3] for row in spools[0].conn.execute(f"EXPLAIN QUERY PLAN {sql}", parameters))
    index = "recipients_pending_messages" if query.pending_only else "sqlite_autoindex_messages_1"
    assert index in plan and "TEMP B-TREE" not in plan, plan


async def test_messages_are_found_by_sendcloud_emailid_and_status_on_every_backend(spool):
    """The dashboard's and `queue list`'s search by what SendCloud said: its emailId, its status."""
    from relay.spool.events_model import Applied, ReceivedEvent, RecipientEvent

    await fill(spool)
    await spool.record([RecipientUpdate("M5", 0, State.DELIVERED, 1, T0, "250 #mid#Queued", "mid0$a@example.org")])
    target = await spool.event_target("mid0$a@example.org", None, None)
    event_id = await spool.store_event(ReceivedEvent(T0, "invalid", "{}", ("token:st",)))
    await spool.apply_event(Applied(event_id, target, "invalid", T0 + 5, RecipientEvent("invalid", T0 + 5)))
    assert [m.id for m in await spool.list(ListQuery(email_id="mid0$a@example.org", include_final=True))] == ["M5"]
    assert await spool.list(ListQuery(email_id="mid0$nobody@example.org", include_final=True)) == []
    assert [m.id for m in await spool.list(ListQuery(status="invalid", include_final=True))] == ["M5"]
    assert await spool.list(ListQuery(status="delivered", include_final=True)) == []
    assert [m.id for m in await spool.list(ListQuery(status="invalid", user="crm"))] == ["M5"]  # pending walk too
