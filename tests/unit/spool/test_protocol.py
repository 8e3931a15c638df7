"""The Spool protocol as a contract: every behaviour here runs against SqliteSpool, MemorySpool and PostgresSpool.

``test_sqlite.py`` covers what only SQLite has (group commit, blobs and rowids, migrations,
the CLI's synchronous store); this file says what any backend must do, through the async
protocol alone, so the in-memory spool the unit tests use cannot drift from the real one.
"""

from __future__ import annotations

import dataclasses

import pytest

from relay.spool import BodyGone, ListQuery, NewMessage, OutcomeRows, RecipientUpdate, Spool, State, due_key
from relay.spool.events_model import OutboxRow
from relay.spool.memory import MemorySpool
from relay.spool.postgres import PostgresSpool
from relay.spool.sqlite import SqliteSpool
from tests.support.postgres import migrated_postgres_spool

T0 = 1_700_000_000.0
HEAD = b"From: billing@acme.com\r\nSubject: hi\r\n\r\n"
ACCOUNTS = ("acme_trigger",)  # the configured accounts the scheduler asks due() about


def message(message_id: str, recipients=("a@example.org", "b@example.org"), received_at: float = T0,
            sender: str = "billing@acme.com", body: bytes | tuple = HEAD + b"hello\r\n", **fields) -> NewMessage:
    fields.setdefault("account", "acme_trigger")
    return NewMessage(message_id, received_at, "billing", "smtp", "10.20.0.5", fields.pop("account"), "trigger",
                      sender, list(recipients), body, **fields)


def update(message_id: str, idx: int, state: State, next_attempt: float = T0, attempts: int = 1,
           reply: str = "250 ok", email_id: str | None = None) -> RecipientUpdate:
    return RecipientUpdate(message_id, idx, state, attempts, next_attempt, reply, email_id)


@pytest.fixture(params=["sqlite", "memory", "postgres"])
async def spool(request, tmp_path):
    if request.param == "postgres":
        spool: Spool = await migrated_postgres_spool(request.getfixturevalue("postgres_dsn"), tmp_path)
    else:
        spool = SqliteSpool(tmp_path / "spool.db") if request.param == "sqlite" else MemorySpool()
    await spool.open()
    yield spool
    await spool.close()


async def body(spool: Spool, message_id: str) -> bytes | None:
    """The body as delivery reads it: through the header section, then chunk by chunk."""
    start = await spool.start(message_id)
    if start is None:
        return None
    first, size = start
    return first + b"".join([chunk async for chunk in spool.chunks(message_id, len(first), size)])


def shape(messages) -> list[tuple]:
    """Messages and their recipients as plain tuples (SQLite gives eight_bit back as 0/1)."""
    return [
        (m.id, m.size, m.label, m.mail_from, bool(m.eight_bit),
         [(r.idx, r.address, r.state, r.attempts, r.next_attempt, r.last_reply, r.email_id) for r in m.recipients])
        for m in messages
    ]


async def everything(spool: Spool) -> tuple:
    """All an operator can see, to compare before and after a write that must change nothing."""
    listed = await spool.list(ListQuery(include_final=True))
    return shape(listed), await spool.counts(), await spool.pending_summary(), [await body(spool, m.id) for m in listed]


# -- store, then what every reader sees ----------------------------------------------------------------


async def test_a_stored_message_is_seen_alike_by_due_get_list_counts_and_pending_summary(spool):
    plain = message("A1", received_at=T0)
    pieces = (b"Subject: x\r\n\r\n", memoryview(bytearray("Grüße\r\n".encode())))
    eight_bit = message("B2", recipients=("c@example.org",), received_at=T0 + 5, body=pieces,
                        label=7, mail_from="bounce@acme.com")
    await spool.store(eight_bit)
    await spool.store(plain)

    assert await spool.due(T0 - 1, 100, ACCOUNTS) == []
    assert [m.id for m in await spool.due(T0, 100, ACCOUNTS)] == ["A1"]
    due = await spool.due(T0 + 5, 100, ACCOUNTS)
    assert shape(due) == [
        ("A1", plain.size, None, None, False, [
            (0, "a@example.org", State.QUEUED, 0, T0, None, None),
            (1, "b@example.org", State.QUEUED, 0, T0, None, None),
        ]),
        ("B2", eight_bit.size, 7, "bounce@acme.com", True, [(0, "c@example.org", State.QUEUED, 0, T0 + 5, None, None)]),
    ]
    got = await spool.get("B2")
    assert (got.received_at, got.user, got.listener, got.client, got.account, got.channel, got.sender) == (
        T0 + 5, "billing", "smtp", "10.20.0.5", "acme_trigger", "trigger", "billing@acme.com",
    )
    assert got.upstream_sender == "bounce@acme.com"
    assert shape(await spool.list()) == shape(due)
    assert await spool.counts() == {"queued": 3}
    assert await spool.pending_summary() == (2, {"queued": 3}, T0)
    assert await body(spool, "B2") == b"".join(pieces)
    assert await spool.get("NOSUCH") is None


async def test_an_empty_spool_reports_nothing(spool):
    assert await spool.due(T0, 100, ACCOUNTS) == []
    assert await spool.list(ListQuery(include_final=True)) == []
    assert await spool.counts() == {}
    assert await spool.pending_summary() == (0, {}, None)
    assert await spool.start("NOSUCH") is None
    assert spool.unavailable() is None
    assert spool.spill_directory.is_dir()


async def test_storing_an_id_twice_fails_and_keeps_the_first(spool):
    await spool.store(message("A1"))
    before = await everything(spool)
    with pytest.raises(Exception):  # noqa: B017 - the protocol does not name the error
        await spool.store(message("A1", recipients=("x@example.org",), body=b"other"))
    assert await everything(spool) == before


@pytest.mark.parametrize("size", [0, 5, 256 * 1024 + 1, 3 * 256 * 1024 + 7])
async def test_start_reads_through_the_header_section_and_chunks_give_the_rest(spool, size):
    header = b"".join(b"X-Long-%d: %s\r\n" % (n, b"v" * 1000) for n in range(300)) + b"\r\n"  # > one chunk
    text = header + bytes(index % 251 for index in range(size))
    await spool.store(message("A1", body=text))
    first, total = await spool.start("A1")
    assert total == len(text)
    assert first.startswith(header)
    assert len(first) < total or size < 256 * 1024  # the body is not read whole up front
    assert await body(spool, "A1") == text


async def test_an_empty_body_starts_empty(spool):
    await spool.store(message("A1", body=b""))
    assert await spool.start("A1") == (b"", 0)


# -- due -------------------------------------------------------------------------------------------------


async def test_due_takes_the_earliest_due_messages_up_to_the_limit_each_with_all_its_due_recipients(spool):
    """``limit`` counts messages; a message is never cut apart, and sorts by its first due recipient."""
    await spool.store(message("A1", recipients=("a0@x.org", "a1@x.org", "a2@x.org")))
    await spool.store(message("B2", recipients=("b0@x.org", "b1@x.org")))
    await spool.store(message("C3", recipients=("c0@x.org",)))
    await spool.record([
        update("A1", 0, State.DEFERRED, next_attempt=T0 + 20),
        update("A1", 1, State.DEFERRED, next_attempt=T0 + 40),
        update("A1", 2, State.DELIVERED),
        update("B2", 0, State.DEFERRED, next_attempt=T0 + 30),
        update("B2", 1, State.DEFERRED, next_attempt=T0 + 10),
        update("C3", 0, State.DEFERRED, next_attempt=T0 + 15),
    ])

    def picked(messages):
        return [(m.id, [r.idx for r in m.recipients]) for m in messages]

    assert picked(await spool.due(T0 + 100, 1, ACCOUNTS)) == [("B2", [0, 1])]
    assert picked(await spool.due(T0 + 100, 2, ACCOUNTS)) == [("B2", [0, 1]), ("C3", [0])]
    assert picked(await spool.due(T0 + 100, 100, ACCOUNTS)) == [("B2", [0, 1]), ("C3", [0]), ("A1", [0, 1])]
    assert picked(await spool.due(T0 + 25, 100, ACCOUNTS)) == [("B2", [1]), ("C3", [0]), ("A1", [0])]
    assert await spool.due(T0 + 100, 0, ACCOUNTS) == []


async def test_due_pages_resume_after_the_cursor_of_the_last_message_of_the_page(spool):
    """Pages by :func:`due_key` of the last message: each message once, in order, nothing skipped."""
    for number in range(7):
        await spool.store(message(f"M{number}", recipients=("a@x.org", "b@x.org", "c@x.org")))
    await spool.record([  # every message's recipients due together, but in reverse order of the IDs
        update(f"M{number}", idx, State.DEFERRED, next_attempt=T0 + 100 - number)
        for number in range(7) for idx in range(3)
    ])
    seen, after = [], None
    while page := await spool.due(T0 + 100, 3, ACCOUNTS, after=after):
        assert all(len(m.recipients) == 3 for m in page)
        seen.extend(m.id for m in page)
        after = due_key(page[-1], after)
    assert seen == [f"M{number}" for number in reversed(range(7))]
    assert due_key(page_one := (await spool.due(T0 + 100, 1, ACCOUNTS))[0]) == (T0 + 94, "M6") and page_one.id == "M6"


async def test_a_page_after_the_cursor_still_carries_the_messages_earlier_due_recipients(spool):
    if isinstance(spool, PostgresSpool):
        pytest.skip("PostgresSpool sorts a message by its earliest due recipient (messages.next_due): a walk meets it once")
    await spool.store(message("A1", recipients=("a0@x.org", "a1@x.org")))
    await spool.store(message("B2", recipients=("b0@x.org",)))
    await spool.record([update("A1", 0, State.DEFERRED, next_attempt=T0 + 10),
                        update("A1", 1, State.DEFERRED, next_attempt=T0 + 30),
                        update("B2", 0, State.DEFERRED, next_attempt=T0 + 20)])
    page = await spool.due(T0 + 100, 10, ACCOUNTS, after=(T0 + 20, "B2"))
    assert [(m.id, [r.idx for r in m.recipients]) for m in page] == [("A1", [0, 1])]
    assert due_key(page[0], (T0 + 20, "B2")) == (T0 + 30, "A1")


# -- record ------------------------------------------------------------------------------------------------


async def test_record_updates_recipients_and_keeps_the_email_id_an_update_does_not_give(spool):
    await spool.store(message("A1"))
    await spool.record([update("A1", 0, State.DEFERRED, next_attempt=T0 + 60, reply="451 later", email_id="E0")])
    await spool.record([update("A1", 0, State.DEFERRED, next_attempt=T0 + 300, attempts=2, reply="451 again")])
    got = await spool.get("A1")
    assert [(r.state, r.attempts, r.next_attempt, r.last_reply, r.email_id) for r in got.recipients] == [
        (State.DEFERRED, 2, T0 + 300, "451 again", "E0"),
        (State.QUEUED, 0, T0, None, None),
    ]
    assert await spool.counts() == {"deferred": 1, "queued": 1}
    assert await spool.pending_summary() == (1, {"deferred": 1, "queued": 1}, T0)


async def test_a_partly_delivered_message_keeps_its_body_and_a_final_one_drops_it(spool):
    await spool.store(message("A1"))
    await spool.record([update("A1", 0, State.DELIVERED, email_id="M0$a@example.org")])
    assert await body(spool, "A1") == message("A1").body
    assert [m.id for m in await spool.list()] == ["A1"]

    await spool.record([update("A1", 1, State.FAILED, reply="550 no such user")])
    assert await spool.start("A1") is None
    assert await spool.due(T0 + 10**6, 100, ACCOUNTS) == []
    assert await spool.list() == []
    assert [m.id for m in await spool.list(ListQuery(include_final=True))] == ["A1"]
    assert [(r.state, r.email_id) for r in (await spool.get("A1")).recipients] == [
        (State.DELIVERED, "M0$a@example.org"), (State.FAILED, None),
    ]
    assert await spool.counts() == {"delivered": 1, "failed": 1}
    assert await spool.pending_summary() == (0, {}, None)


async def test_updates_for_a_message_that_is_gone_change_nothing(spool):
    await spool.store(message("A1"))
    before = await everything(spool)
    await spool.record([update("GONE", 0, State.DELIVERED)])
    assert await everything(spool) == before


async def test_a_dsn_is_stored_with_the_failure_that_caused_it(spool):
    await spool.store(message("A1", recipients=("a@example.org",)))
    dsn = message("D9", recipients=("billing@acme.com",), sender="", received_at=T0 + 1,
                  body=b"Subject: Undelivered Mail\r\n\r\nsorry\r\n")
    await spool.record([update("A1", 0, State.FAILED, reply="550 5.1.1 user unknown")], [dsn])
    assert (await spool.get("A1")).recipients[0].state is State.FAILED
    assert await spool.start("A1") is None
    (due,) = await spool.due(T0 + 1, 100, ACCOUNTS)
    assert (due.id, due.sender, due.upstream_sender, [r.address for r in due.recipients]) == (
        "D9", "", "", ["billing@acme.com"],
    )
    assert await body(spool, "D9") == dsn.body


async def test_a_record_whose_dsn_cannot_be_stored_changes_nothing(spool):
    """One write, whole or not at all: a failure is never marked without its DSN."""
    await spool.store(message("A1", recipients=("a@example.org",)))
    before = await everything(spool)
    clashing = message("A1", recipients=("billing@acme.com",), sender="")
    with pytest.raises(Exception):  # noqa: B017 - the protocol does not name the error
        await spool.record([update("A1", 0, State.FAILED, reply="550 no")], [clashing])
    assert await everything(spool) == before


async def test_mail_of_an_unconfigured_account_never_stands_in_front_of_due_mail(spool):
    """600 recipients of a removed account, due earlier, ahead of one deliverable recipient."""
    for number in range(6):
        await spool.store(message(f"G{number}", recipients=[f"r{n}@example.org" for n in range(100)],
                                  received_at=T0 - 100 + number, account="gone_account"))
    await spool.store(message("A1", recipients=("a@example.org",)))
    assert [m.id for m in await spool.due(T0, 500, ACCOUNTS)] == ["A1"]
    stranded = await spool.stranded(T0, 5, ACCOUNTS)
    assert [(m.id, len(m.recipients)) for m in stranded] == [(f"G{n}", 100) for n in range(5)]  # the limit holds there too
    assert {m.account for m in stranded} == {"gone_account"}
    assert [m.id for m in await spool.stranded(T0, 5, ACCOUNTS, after=due_key(stranded[-1]))] == ["G5"]
    assert [m.id for m in await spool.due(T0, 500, ("acme_trigger", "gone_account"))][:5] == [f"G{n}" for n in range(5)]
    assert await spool.stranded(T0, 500, ("acme_trigger", "gone_account")) == []


# -- reading while the message changes -------------------------------------------------------------------


@pytest.mark.parametrize("change", ["deleted", "final"])
async def test_a_body_deleted_or_made_final_while_it_is_read_is_body_gone(spool, change):
    await spool.store(message("A1", body=HEAD + b"x" * (3 * 256 * 1024)))
    first, size = await spool.start("A1")
    chunks = spool.chunks("A1", len(first), size)
    assert len(await anext(chunks)) == 256 * 1024
    if change == "deleted":
        assert await spool.delete("A1") is True
    else:
        await spool.record([update("A1", 0, State.DELIVERED), update("A1", 1, State.FAILED, reply="550")])
    with pytest.raises(BodyGone):
        for _ in range(2):  # a backend may have read one chunk ahead, before the change
            await anext(chunks)


# -- retry, flush, delete, purge ---------------------------------------------------------------------------


async def test_retry_of_one_message_makes_its_queued_and_deferred_recipients_due_now(spool):
    await spool.store(message("A1", recipients=("a@x.org", "b@x.org", "c@x.org"), received_at=T0 + 500))
    await spool.store(message("B2"))
    await spool.record([
        update("A1", 0, State.DEFERRED, next_attempt=T0 + 3600),
        update("A1", 1, State.DELIVERED),
        update("B2", 0, State.DEFERRED, next_attempt=T0 + 3600),
    ])
    assert await spool.retry("A1") == 2  # idx 0 deferred, idx 2 still queued (not due before T0 + 500)
    assert [(m.id, [(r.idx, r.next_attempt) for r in m.recipients]) for m in await spool.due(T0 + 1, 100, ACCOUNTS)] == [
        ("A1", [(0, 0), (2, 0)]), ("B2", [(1, T0)]),
    ]
    assert await spool.retry("NOSUCH") == 0


async def test_flush_makes_every_deferred_recipient_due_and_leaves_queued_and_final_ones(spool):
    await spool.store(message("A1", received_at=T0 + 500))
    await spool.store(message("B2"))
    await spool.record([
        update("A1", 0, State.DEFERRED, next_attempt=T0 + 3600),
        update("B2", 0, State.DEFERRED, next_attempt=T0 + 3600),
        update("B2", 1, State.FAILED, reply="550"),
    ])
    assert await spool.retry() == 2
    assert [(m.id, [r.idx for r in m.recipients]) for m in await spool.due(T0 + 1, 100, ACCOUNTS)] == [("A1", [0]), ("B2", [0])]
    assert (await spool.get("A1")).recipients[1].next_attempt == T0 + 500  # queued: untouched
    assert await spool.retry() == 2  # still deferred: a second flush finds them again


async def test_delete_forgets_the_message_and_says_whether_it_was_there(spool):
    await spool.store(message("A1"))
    await spool.store(message("B2"))
    assert await spool.delete("A1") is True
    assert await spool.delete("A1") is False
    assert await spool.get("A1") is None
    assert await spool.start("A1") is None
    assert [m.id for m in await spool.list(ListQuery(include_final=True))] == ["B2"]
    assert await spool.counts() == {"queued": 2}


async def test_purge_forgets_only_final_messages_that_arrived_before_the_cutoff(spool):
    for message_id, received_at in [("A1", T0), ("B2", T0), ("C3", T0 + 100)]:
        await spool.store(message(message_id, received_at=received_at))
    await spool.record([update(message_id, idx, State.DELIVERED) for message_id in ("A1", "C3") for idx in (0, 1)])
    assert await spool.purge_final(T0 + 100) == 1  # A1: final and old; B2 pending; C3 not old enough
    assert [m.id for m in await spool.list(ListQuery(include_final=True))] == ["B2", "C3"]
    assert await spool.purge_final(T0 + 101) == 1
    assert [m.id for m in await spool.list(ListQuery(include_final=True))] == ["B2"]


# -- what callers get, and what writes cost --------------------------------------------------------------


async def test_records_handed_out_are_the_callers_own(spool):
    """Changing a list the spool returned never changes the spool."""
    await spool.store(message("A1"))
    got = await spool.get("A1")
    got.recipients.clear()
    (due,) = await spool.due(T0, 100, ACCOUNTS)
    due.recipients.pop()
    assert len((await spool.get("A1")).recipients) == 2
    assert len((await spool.list())[0].recipients) == 2


async def test_each_write_awaited_alone_is_one_commit(spool):
    commits, operations = spool.commits, spool.operations
    await spool.store(message("A1"))
    await spool.record([update("A1", 0, State.DEFERRED, next_attempt=T0 + 60)])
    await spool.retry()
    await spool.probe(T0)
    await spool.purge_final(T0)
    await spool.delete("A1")
    assert (spool.commits - commits, spool.operations - operations) == (6, 6)


# -- MemorySpool's own: a full disk, for the tests of its callers ------------------------------------------


async def test_memory_spool_fail_writes_makes_every_write_raise_and_change_nothing():
    spool = MemorySpool()
    await spool.store(message("A1"))
    before, commits = await everything(spool), spool.commits
    spool.fail_writes = OSError(28, "No space left on device")
    writes = [
        spool.store(message("B2")),
        spool.record([update("A1", 0, State.DELIVERED)], [message("D9")]),
        spool.retry(), spool.retry("A1"), spool.delete("A1"), spool.purge_final(T0 + 1), spool.probe(T0),
    ]
    for write in writes:
        with pytest.raises(OSError, match="No space left"):
            await write
    assert (await everything(spool), spool.commits) == (before, commits)
    spool.fail_writes = None
    await spool.store(dataclasses.replace(message("B2")))
    assert [m.id for m in await spool.list()] == ["A1", "B2"]
    await spool.close()


# -- the events stage's rows for an outcome ------------------------------------------------------------


async def test_an_outcome_is_recorded_with_its_counters_and_outbox_rows_in_one_write(spool):
    await spool.store(message("A1"))
    stats = (("2023-11-14T22", "user", "billing", "requested", 1),)
    outbox = OutboxRow("billing", "https://hooks.acme.com/sc", b'{"event":"failed"}', T0, T0)
    commits = spool.commits
    await spool.record([update("A1", 0, State.DELIVERED), update("A1", 1, State.FAILED, reply="550 no")],
                       rows=OutcomeRows(stats, (outbox,)))
    assert spool.commits == commits + 1
    assert [r.state for r in (await spool.get("A1")).recipients] == [State.DELIVERED, State.FAILED]
    assert await spool.stats("2023-11-14T00") == list(stats)
    assert [(row.user, row.url, row.body) for row in await spool.due_fanout(T0, 10)] == [
        ("billing", outbox.url, outbox.body),
    ]


async def test_rows_that_cannot_be_written_never_keep_the_outcome_off_the_disk(spool):
    """A lost count is logged; a lost outcome would send the message again."""
    await spool.store(message("A1"))
    malformed = (("2023-11-14T22", "user", "billing", "requested"),)  # no count: every backend refuses it
    outbox = OutboxRow("billing", "https://hooks.acme.com/sc", b"{}", T0, T0)
    await spool.record([update("A1", 0, State.DELIVERED)], rows=OutcomeRows(malformed, (outbox,)))
    assert (await spool.get("A1")).recipients[0].state is State.DELIVERED
    assert await spool.stats("2023-11-14T00") == []
    assert await spool.due_fanout(T0, 10) == []  # the rows went together or not at all
