"""LeaseKeeper: what the scheduler holds in memory is renewed in one call; a lost lease stops a start."""

from __future__ import annotations

import asyncio

import pytest

from relay.delivery.leases import LeaseKeeper, renew_interval
from relay.spool.memory import MemorySpool


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
