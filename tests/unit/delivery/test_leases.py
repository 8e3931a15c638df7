"""LeaseKeeper: what the scheduler holds in memory is renewed in one call; a lost lease stops a start."""

from __future__ import annotations

import asyncio

import pytest

from relay.delivery.leases import LeaseKeeper, renew_interval
from relay.observe import metrics
from relay.spool import State
from relay.spool.memory import MemorySpool
from tests.unit.delivery.test_scheduler import CONFIG, FakeUpstream, Harness, new_message, start  # noqa: F401 - the fixture


@pytest.mark.parametrize("lease, interval", [(60.0, 20.0), (3.0, 1.0), (0.3, 0.1)])
def test_leases_are_renewed_three_times_per_lease(lease, interval):
    assert renew_interval(lease) == pytest.approx(interval)


async def until(condition, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_everything_held_is_renewed_in_one_call_every_third_of_the_lease():
    spool = MemorySpool()
    holding = {"A1", "B2"}
    keeper = LeaseKeeper(spool, lambda: holding, lambda: 0.3)
    started = asyncio.get_running_loop().time()
    keeper.start()
    await until(lambda: spool.renewed)
    assert asyncio.get_running_loop().time() - started >= 0.1
    holding.add("C3")
    await until(lambda: len(spool.renewed) >= 2)
    await keeper.stop(set())
    assert spool.renewed[:2] == [{"A1", "B2"}, {"A1", "B2", "C3"}]


async def test_a_message_whose_lease_was_lost_is_not_started_and_only_once():
    spool = MemorySpool()
    spool.lost = {"B2"}
    keeper = LeaseKeeper(spool, lambda: {"A1", "B2"}, lambda: 60.0)
    await keeper.renew_once()
    assert keeper.may_start("A1")
    assert not keeper.may_start("B2")
    assert keeper.may_start("B2")  # forgotten once refused: a new claim of it may start


async def test_a_lost_message_no_longer_held_is_forgotten():
    spool = MemorySpool()
    spool.lost = {"B2"}
    holding = {"A1", "B2"}
    keeper = LeaseKeeper(spool, lambda: holding, lambda: 60.0)
    await keeper.renew_once()
    holding.discard("B2")  # e.g. its account was removed and its queue emptied
    await keeper.renew_once()
    assert keeper.may_start("B2")


async def test_nothing_held_asks_nothing_and_stop_releases_what_it_is_given():
    spool = MemorySpool()
    keeper = LeaseKeeper(spool, set, lambda: 60.0)
    await keeper.renew_once()
    assert spool.renewed == []
    keeper.start()
    await keeper.stop({"A1"})
    assert spool.released == {"A1"}


async def test_a_failing_renewal_is_logged_and_the_next_one_runs(caplog):
    spool = MemorySpool()
    calls = []

    async def renew(ids):
        calls.append(set(ids))
        if len(calls) == 1:
            raise OSError("database restarting")
        return set()

    spool.renew = renew
    keeper = LeaseKeeper(spool, lambda: {"A1"}, lambda: 0.15)
    keeper.start()
    await until(lambda: len(calls) >= 2)
    await keeper.stop(set())
    assert "renewing 1 lease(s) failed (database restarting)" in caplog.text


# -- in the scheduler (a real Scheduler over a MemorySpool and the fake upstream of test_scheduler.py) ------


ONE_WORKER = CONFIG.replace("max_recipients_per_transaction: 2,",
                            "max_recipients_per_transaction: 2, connections_per_account: 1,").replace(
    "spool: {", "spool: {lease: 0.06, ")


async def claimed_elsewhere(now, limit, accounts):
    """``due`` while another node holds the lease: nothing to claim here (MemorySpool has no leases)."""
    return []


async def test_the_scheduler_does_not_start_a_message_another_node_took_over(start):  # noqa: F811
    hold = asyncio.Event()
    harness = await start(ONE_WORKER, FakeUpstream(hold=hold))
    first, second = new_message(), new_message()
    await harness.intake(first)  # the one worker is busy with it until hold is set
    await harness.intake(second)
    harness.spool.lost = {second.id}
    harness.spool.due = claimed_elsewhere
    renewals = len(harness.spool.renewed)
    await until(lambda: len(harness.spool.renewed) > renewals)
    assert {first.id, second.id} <= harness.spool.renewed[-1]
    hold.set()
    await until(lambda: any(s.transaction.queue_id == first.id for s in harness.upstream.sent))
    await asyncio.sleep(0.1)
    assert [s.transaction.queue_id for s in harness.upstream.sent] == [first.id]
    assert await harness.states(second.id) == [State.QUEUED, State.QUEUED]  # the other node's to deliver


async def test_a_fenced_outcome_stops_the_message_here_and_is_counted(start):  # noqa: F811
    harness = await start(ONE_WORKER)
    message = new_message(recipients=("a@example.org", "b@example.org", "c@example.org"))  # two transactions

    async def fenced(updates, new_messages=(), rows=None):
        return {message.id}  # nothing applied: another node holds the lease

    harness.spool.record = fenced
    harness.spool.due = claimed_elsewhere
    before = metrics.SPOOL_FENCED._value.get()
    await harness.intake(message)
    await until(lambda: metrics.SPOOL_FENCED._value.get() > before)
    await asyncio.sleep(0.1)
    assert len(harness.upstream.sent) == 1  # the second transaction is the other node's now


async def test_stopping_gives_back_the_leases_of_what_was_queued_or_in_flight():
    harness = Harness(ONE_WORKER, FakeUpstream(hold=asyncio.Event()))
    await harness.scheduler.start()
    first, second = new_message(), new_message()
    await harness.intake(first)
    await harness.intake(second)
    await until(lambda: harness.upstream.sending)
    await harness.scheduler.stop(0.05)
    assert harness.spool.released == {first.id, second.id}
