"""relay.delivery.throttle: an account told to slow down pauses, then resumes with one probe."""

from __future__ import annotations

import asyncio

import pytest

from relay.config import Upstream
from relay.delivery.throttle import Gate, destination, pause_length


@pytest.mark.parametrize(
    "consecutive, expected", [(1, 30.0), (2, 60.0), (3, 120.0), (5, 480.0), (6, 900.0), (20, 900.0)]
)
def test_pause_doubles_up_to_the_cap(consecutive, expected):
    assert pause_length(consecutive, 30.0, 900.0) == expected


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_throttling_reply_pauses_every_worker_then_one_probes():
    clock = Clock()
    throttle = Gate("acme", lambda: (0.05, 1.0), clock=clock)
    assert await throttle.acquire() is False  # running normally: nobody is a probe
    throttle.release(probe=False, throttled=True)
    assert throttle.remaining() == pytest.approx(0.05)
    assert throttle.pauses == 1

    # A reply to a transaction sent before the pause does not extend it or count twice.
    throttle.release(probe=False, throttled=True)
    assert throttle.consecutive == 1 and throttle.pauses == 1

    waiters = [asyncio.create_task(throttle.acquire()) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert not any(task.done() for task in waiters)  # paused
    clock.now += 0.05
    await asyncio.sleep(0.1)
    done = [task for task in waiters if task.done()]
    assert [task.result() for task in done] == [True]  # exactly one probe goes

    throttle.release(probe=True, throttled=False)  # the probe got through: everyone resumes
    await asyncio.sleep(0.01)
    assert all(task.done() for task in waiters)
    assert throttle.consecutive == 0


async def test_a_probe_throttled_again_doubles_the_pause():
    clock = Clock()
    throttle = Gate("acme", lambda: (10.0, 100.0), clock=clock)
    throttle.release(probe=False, throttled=True)
    clock.now += 10
    assert await throttle.acquire() is True
    throttle.release(probe=True, throttled=True)
    assert throttle.remaining() == 20.0
    assert throttle.consecutive == 2


async def test_with_probe_first_the_first_transaction_goes_alone_and_the_others_follow_once_it_got_through():
    throttle = Gate("acme", lambda: (10.0, 100.0), clock=Clock(), probe_first=True)
    assert await throttle.acquire() is True
    others = [asyncio.create_task(throttle.acquire()) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert not any(task.done() for task in others)  # nobody else connects before the first one is known to work
    throttle.release(probe=True, throttled=False)
    await asyncio.sleep(0.01)
    assert [task.result() for task in others] == [False, False, False]


async def test_with_probe_first_a_failed_first_probe_pauses_and_the_next_one_probes_again():
    clock = Clock()
    throttle = Gate("acme", lambda: (1.0, 300.0), clock=clock, probe_first=True)
    assert await throttle.acquire() is True
    throttle.release(probe=True, throttled=True)
    assert (throttle.remaining(), throttle.consecutive) == (1.0, 1)
    clock.now += 1
    assert await throttle.acquire() is True
    throttle.release(probe=True, throttled=True)
    assert throttle.remaining() == 2.0


@pytest.mark.parametrize("upstream, expected", [
    ({}, "smtp.sendcloud.net:587 (starttls)"),  # the default: every account shares it
    ({"kind": "smtp", "host": "10.0.0.5", "port": 25, "tls": "none"}, "10.0.0.5:25 (none)"),
    ({"host": "smtp.sendcloud.net", "port": 465, "tls": "implicit"}, "smtp.sendcloud.net:465 (implicit)"),
    ({"kind": "capture", "path": "var/capture"}, "capture:var/capture"),
])
def test_reachability_belongs_to_the_destination(upstream, expected):
    assert destination(Upstream(**upstream)) == expected
