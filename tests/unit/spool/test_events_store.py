"""The event storage of the spool (issue #12) as a contract, against SqliteSpool, MemorySpool and
PostgresSpool (on the private cluster).

Received events and their dedupe keys, the mapping of an event to its recipient, SendCloud's
status and history per recipient, the suppression list and its version, hourly counters and
the fan-out outbox.
"""

from __future__ import annotations

import asyncio

import pytest

from relay.spool import State
from relay.spool.events_model import Applied, EventTarget, Fate, OutboxRow, ReceivedEvent, RecipientEvent
from relay.spool.memory import MemorySpool
from relay.spool.sqlite import SqliteSpool
from tests.support.postgres import migrated_postgres_spool
from tests.unit.spool.test_protocol import T0, message, update

ALL = frozenset({"batch", "trigger"})
BATCH = frozenset({"batch"})
EMAIL_ID = "1426390015358_15_6484_8661.sc-10_10_127_51-inbound0$a@example.org"


@pytest.fixture(params=["sqlite", "memory", "postgres"])
async def spool(request, tmp_path):
    if request.param == "postgres":
        spool = await migrated_postgres_spool(request.getfixturevalue("postgres_dsn"), tmp_path)
    else:
        spool = SqliteSpool(tmp_path / "spool.db") if request.param == "sqlite" else MemorySpool()
    await spool.open()
    yield spool
    await spool.close()


def received(keys=("token:abc", "event:deliver:x:1"), event="deliver") -> ReceivedEvent:
    return ReceivedEvent(T0, event, '{"event": "deliver"}', keys)


async def delivered_message(spool) -> None:
    await spool.store(message("Q1", recipients=("a@example.org", "B@Example.org"), label=7))
    await spool.record([update("Q1", 0, State.DELIVERED, email_id=EMAIL_ID), update("Q1", 1, State.DELIVERED)])


async def test_an_event_is_stored_once_whatever_key_repeats(spool):
    first = await spool.store_event(received())
    assert isinstance(first, int)
    assert await spool.store_event(received(keys=("token:abc", "event:other"))) is None
    assert await spool.store_event(received(keys=("token:new", "event:deliver:x:1"))) is None
    assert [e.id for e in await spool.unapplied_events(10)] == [first]
    second = await spool.store_event(received(keys=("token:zzz",)))
    assert [e.id for e in await spool.unapplied_events(10)] == [first, second]
    assert (await spool.unapplied_events(10))[0].fields == '{"event": "deliver"}'


async def test_an_applied_event_is_no_longer_pending_and_its_keys_stay_known(spool):
    event_id = await spool.store_event(received())
    await spool.apply_event(Applied(event_id))
    assert await spool.unapplied_events(10) == []
    assert await spool.store_event(received()) is None


async def test_prune_forgets_old_applied_events_and_their_keys_in_batches(spool):
    ids = [await spool.store_event(received(keys=(f"token:{n}",))) for n in range(3)]
    for event_id in ids[:2]:
        await spool.apply_event(Applied(event_id))
    assert await spool.prune_events(T0 + 1, limit=1) == 1
    assert await spool.prune_events(T0 + 1, limit=10) == 1  # the unapplied one stays
    assert await spool.prune_events(T0 - 1, limit=10) == 0
    again = await spool.store_event(received(keys=("token:0",)))  # its key went with the pruned event
    assert again is not None
    assert [e.id for e in await spool.unapplied_events(10)] == [ids[2], again]


async def test_event_target_by_email_id_then_by_queue_id_and_address(spool):
    await delivered_message(spool)
    by_email_id = EventTarget("Q1", 0, "a@example.org", "billing", "acme_trigger", "trigger", 7)
    assert await spool.event_target(EMAIL_ID, None, None) == by_email_id
    assert await spool.event_target(None, "Q1", "b@example.ORG") == EventTarget(
        "Q1", 1, "B@Example.org", "billing", "acme_trigger", "trigger", 7
    )
    assert await spool.event_target("unknown$x@y", "Q1", "a@example.org") == by_email_id
    assert await spool.event_target("unknown$x@y", None, None) is None
    assert await spool.event_target(None, "Q2", "a@example.org") is None


async def test_applying_keeps_status_and_history_per_recipient(spool):
    await delivered_message(spool)
    target = await spool.event_target(EMAIL_ID, None, None)
    first = await spool.store_event(received(keys=("token:1",)))
    second = await spool.store_event(received(keys=("token:2",), event="open"))
    await spool.apply_event(Applied(first, target, "delivered", T0 + 5, RecipientEvent("deliver", T0 + 5)))
    await spool.apply_event(Applied(second, target, "delivered", T0 + 5, RecipientEvent("open", T0 + 9, ip="1.2.3.4")))
    assert await spool.fates("Q1") == {
        0: Fate("delivered", T0 + 5, (RecipientEvent("deliver", T0 + 5), RecipientEvent("open", T0 + 9, ip="1.2.3.4")))
    }
    assert await spool.fates("Q2") == {}
    await spool.delete("Q1")
    assert await spool.fates("Q1") == {}


async def test_applying_writes_suppression_stats_and_outbox_together(spool):
    event_id = await spool.store_event(received(event="invalid"))
    row = ("a@example.org", "invalid", ALL, None, T0, None, "acme_trigger")
    outbox = OutboxRow("billing", "https://x.example/hook", b'{"id":"1"}', T0, T0)
    stats = (("2023-11-14T22", "user", "billing", "invalid", 1),)
    await spool.apply_event(Applied(event_id, suppression=row, stats=stats, outbox=(outbox,)))
    assert await spool.suppressions() == [row]
    assert await spool.stats("2023-11-14T00") == list(stats)
    (due,) = await spool.due_fanout(T0, 10)
    assert (due.user, due.url, due.body, due.attempts) == ("billing", "https://x.example/hook", b'{"id":"1"}', 0)


async def test_suppression_list_replace_remove_and_version(spool):
    assert await spool.suppression_version() == 0
    relay_wide = ("a@example.org", "invalid", ALL, None, T0, None, "acme_trigger")
    one_account = ("a@example.org", "manual", BATCH, "acme_batch", T0, T0 + 3600, None)
    await spool.add_suppressions([relay_wide, one_account, ("b@example.org", "manual", ALL, None, T0, None, None)])
    version = await spool.suppression_version()
    assert version > 0
    newer = ("a@example.org", "report_spam", ALL, None, T0 + 1, None, "acme_batch")
    await spool.add_suppressions([newer])
    assert await spool.suppressions() == [newer, one_account, ("b@example.org", "manual", ALL, None, T0, None, None)]
    assert await spool.suppression_version() > version
    assert await spool.remove_suppression("a@example.org", "acme_batch") == 1
    assert await spool.remove_suppression("a@example.org", "acme_batch") == 0
    await spool.add_suppressions([one_account])
    assert await spool.remove_suppression("a@example.org") == 2
    assert [row[0] for row in await spool.suppressions()] == ["b@example.org"]


async def test_stats_add_up_per_hour_group_value_and_counter(spool):
    await spool.add_stats(
        [("2026-12-01T10", "user", "billing", "requested", 2), ("2026-12-01T11", "user", "billing", "requested", 1)]
    )
    await spool.add_stats([("2026-12-01T10", "user", "billing", "requested", 3)])
    assert await spool.stats("2026-12-01T10") == [
        ("2026-12-01T10", "user", "billing", "requested", 5),
        ("2026-12-01T11", "user", "billing", "requested", 1),
    ]
    assert await spool.stats("2026-12-01T00", "2026-12-01T10") == [("2026-12-01T10", "user", "billing", "requested", 5)]


async def test_fanout_rows_are_due_retried_and_done(spool):
    event_id = await spool.store_event(received())
    rows = tuple(
        OutboxRow("billing", "https://x.example/hook", f'{{"id":"{n}"}}'.encode(), T0, T0 + n) for n in range(2)
    )
    await spool.apply_event(Applied(event_id, outbox=rows))
    first, second = await spool.due_fanout(T0 + 5, 10)
    assert [r.body for r in (first, second)] == [b'{"id":"0"}', b'{"id":"1"}']
    await spool.fanout_retry(first.id, 1, T0 + 100)
    assert [r.id for r in await spool.due_fanout(T0 + 5, 10)] == [second.id]
    await spool.fanout_done(second.id)
    (again,) = await spool.due_fanout(T0 + 100, 10)
    assert (again.id, again.attempts) == (first.id, 1)


async def test_a_failed_write_changes_nothing_in_memory():
    spool = MemorySpool()
    spool.fail_writes = OSError("disk full")
    with pytest.raises(OSError):
        await spool.store_event(received())
    spool.fail_writes = None
    assert await spool.unapplied_events(10) == []


async def test_sqlite_keeps_events_across_a_reopen(tmp_path):
    spool = SqliteSpool(tmp_path / "spool.db")
    await spool.open()
    event_id = await spool.store_event(received())
    await spool.add_suppressions([("a@example.org", "manual", ALL, None, T0, None, None)])
    await spool.close()
    spool = SqliteSpool(tmp_path / "spool.db")
    await spool.open()
    try:
        assert [e.id for e in await spool.unapplied_events(10)] == [event_id]
        assert await spool.store_event(received()) is None
        assert len(await spool.suppressions()) == 1
    finally:
        await spool.close()


async def test_fates_of_one_recipient(spool):
    await delivered_message(spool)
    event_id = await spool.store_event(received())
    for idx in (0, 1):
        target = EventTarget("Q1", idx, "x", "billing", "acme_trigger", "trigger", 7)
        await spool.apply_event(Applied(event_id, target, "delivered", T0, RecipientEvent("deliver", T0 + idx)))
    assert await spool.fates("Q1", 1) == {1: Fate("delivered", T0, (RecipientEvent("deliver", T0 + 1),))}
    assert len(await spool.fates("Q1")) == 2


async def test_writes_about_one_recipient_land_in_the_order_they_were_made(spool):
    """The applier decides a batch in order and writes it concurrently: the last status wins."""
    await delivered_message(spool)
    target = await spool.event_target(EMAIL_ID, None, None)
    statuses = ["delivered", "soft_bounce", "invalid", "delivered", "invalid"] * 4
    ids = [await spool.store_event(received(keys=(f"token:{n}",))) for n in range(len(statuses))]
    await asyncio.gather(*(
        spool.apply_event(Applied(event_id, target, status, T0 + n, RecipientEvent(status, T0 + n)))
        for n, (event_id, status) in enumerate(zip(ids, statuses, strict=True))
    ))
    (fate,) = (await spool.fates("Q1")).values()
    assert (fate.status, fate.status_time) == (statuses[-1], T0 + len(statuses) - 1)
    assert [e.event for e in fate.events] == statuses
