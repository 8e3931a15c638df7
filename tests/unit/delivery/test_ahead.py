"""relay.delivery.ahead: which mail the poller takes ahead of its walk (tables); a real Scheduler
taking an operator's `queue retry` (SQLite) and a message another node gave back (PostgreSQL)
next during a drain."""

from __future__ import annotations

import time

import pytest

from relay.delivery.ahead import RETRIED, ahead_until, taken_ahead, walk_again
from relay.delivery.scheduler import Scheduler
from relay.spool import RecipientUpdate, State, open_spool
from tests.support.postgres import migrated_postgres_spool
from tests.unit.delivery.test_scheduler import CONFIG, QUEUED, FakeUpstream, new_message, until
from tests.unit.helpers import config_from

WALK = (1_700_000_000.0, "M5")  # the walk's cursor during a drain: a real next_attempt


@pytest.mark.parametrize("walk, woken, expected", [
    (None, False, RETRIED),  # the walk at its start: only the operator's retries
    (None, True, RETRIED),  # woken, but the walk will meet the released mail itself
    (WALK, False, RETRIED),  # SQLite: nobody announces a release; `queue retry` sorts first anyway
    (WALK, True, WALK),  # a node gave its messages back: everything the walk has passed
    ((0.0, "M1"), True, RETRIED),  # the walk inside the retried mail: never less than all of it
])
def test_how_far_a_walk_ahead_reads(walk, woken, expected):
    assert ahead_until(walk, woken) == expected


@pytest.mark.parametrize("keys, until, asked, expected", [
    ([], RETRIED, 16, (0, True)),  # nothing due at all
    ([(0.0, "M1")], RETRIED, 16, (1, True)),  # one `queue retry`, then the end of what is due
    ([(0.0, "M1"), (0.0, "M2"), (5.0, "M0")], RETRIED, 16, (2, True)),  # then the walk's own mail: stop there
    ([(5.0, "M0"), (6.0, "M1")], RETRIED, 2, (0, True)),  # a drain without retries: one peek, nothing taken
    ([(0.0, "M1"), (0.0, "M2")], RETRIED, 2, (2, False)),  # a full page of retries (a flush): read on
    ([(0.0, "M1"), (9.0, "M2"), WALK], WALK, 3, (3, False)),  # after a wake: up to the walk's cursor, inclusive
    ([(9.0, "M2"), (WALK[0], "M6")], WALK, 2, (1, True)),  # past the cursor: the walk's own
])
def test_what_a_page_gives_the_walk_ahead(keys, until, asked, expected):
    assert taken_ahead(keys, until, asked) == expected


@pytest.mark.parametrize("held, now, again_at, expected", [
    (0, 10.0, 70.0, True),  # nothing held: start again at once
    (499, 10.0, 70.0, True),  # what it holds fits in one page
    (500, 10.0, 70.0, False),  # a drain holding thousands: not at every poll
    (15_000, 70.0, 70.0, True),  # ... but once its time has come
])
def test_when_a_walk_starts_again(held, now, again_at, expected):
    assert walk_again(held, 500, now, again_at) == expected


def _draining(tmp_path):
    """A config holding 8 messages in memory, one connection, and an upstream slow enough that
    300 messages take a while; and the scheduler for it."""
    text = CONFIG.replace("poll_interval", f"path: {tmp_path / 'spool.db'}, active_limit: 8, poll_interval").replace(
        "max_recipients_per_transaction: 2", "max_recipients_per_transaction: 2, connections_per_account: 1")

    def slow(sent):
        time.sleep(0.003)  # the fake upstream's time per transaction
        return [QUEUED] * len(sent.transaction.recipients)
    return config_from(text), FakeUpstream(answer=slow)


async def _goes_next(spool, upstream: FakeUpstream, message_id: str, make_due, backlog: list) -> None:
    """Once ``make_due`` ran (30 transactions into the drain), the message goes within what was
    held in memory, long before the walk would wrap; then everything is delivered once."""
    await until(lambda: len(upstream.sent) >= 30)
    await make_due()
    sent_before = len(upstream.sent)
    await until(lambda: any(s.transaction.queue_id == message_id for s in upstream.sent), timeout=10)
    behind = [s.transaction.queue_id for s in upstream.sent].index(message_id) - sent_before
    assert behind <= 8, f"{behind} backlog transactions went first"  # at most what was held, not the walk's 270
    assert len(upstream.sent) < 150  # the drain is far from done: taken next, not at the walk's wrap
    for message in backlog:
        await until(lambda message=message: _final(spool, message.id), timeout=20)
    assert sorted(s.transaction.queue_id for s in upstream.sent) == sorted([message_id] + [m.id for m in backlog])


async def test_an_operators_retry_during_a_drain_goes_next_not_after_the_walk(tmp_path):
    """A message deferred for an hour is made due by another process (as `queue retry ID` does)
    while 300 drain: its key sorts behind the walk's cursor, and it must go next all the same."""
    config, upstream = _draining(tmp_path)
    spool, operator = open_spool(config.spool), open_spool(config.spool, create=False)
    scheduler = Scheduler(lambda: config, spool, connect=upstream)
    await spool.open()
    await operator.open()
    try:
        retried = new_message(recipients=("later@example.org",))
        await spool.store(retried)
        await spool.record([RecipientUpdate(retried.id, 0, State.DEFERRED, 1, time.time() + 3600, "451 4.3.0 later")])
        backlog = [new_message(recipients=("a@example.org",)) for _ in range(300)]
        for message in backlog:  # as after an outage: in the spool only, found by the poller's walk
            await spool.store(message)
        await scheduler.start()

        async def retry() -> None:
            assert await operator.retry(retried.id) == 1
        await _goes_next(spool, upstream, retried.id, retry, backlog)
    finally:
        await scheduler.stop(1.0)
        await operator.close()
        await spool.close()


async def test_a_message_another_node_gives_back_during_a_drain_goes_next(postgres_dsn, tmp_path):
    """On PostgreSQL: node a holds the earliest message while node b drains 300 past it; when a
    gives it back (its NOTIFY wakes b's poller), b takes it next instead of at its walk's wrap."""
    config, upstream = _draining(tmp_path)
    other = await migrated_postgres_spool(postgres_dsn, tmp_path, node="a", lease=30.0)
    spool = await migrated_postgres_spool(postgres_dsn, tmp_path, node="b", lease=30.0)
    scheduler = Scheduler(lambda: config, spool, connect=upstream)
    await other.open()
    await spool.open()
    try:
        released = new_message(recipients=("held@example.org",))
        await other.store(released)
        assert [m.id for m in await other.due(time.time(), 1, ["acme_trigger"])] == [released.id]  # a's lease now
        backlog = [new_message(recipients=("a@example.org",)) for _ in range(300)]
        for message in backlog:
            await spool.store(message)
        await scheduler.start()
        await _goes_next(spool, upstream, released.id, lambda: other.release([released.id]), backlog)
    finally:
        await scheduler.stop(1.0)
        await other.close()
        await spool.close()


async def _final(spool, message_id: str) -> bool:
    message = await spool.get(message_id)
    return all(recipient.state.final for recipient in message.recipients)
