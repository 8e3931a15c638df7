"""Rate budgets: recipients accepted per user and per client address over sliding windows.

The budget behind ``users.*.rate_limit: 600/hour`` and ``server.client_rate_limit``. Rates use
a sliding-window counter (the current window's count plus the previous window's, weighted by
how much of it still overlaps the last ``period``): two integers per key, close to an exact
"at most N in any period", and small enough to persist. :class:`PersistentRates` saves the
counts through the spool's rate store (:class:`relay.spool.RateStore`), so an hourly budget
survives a restart, and reads the totals back, so several processes sharing one spool also
share one budget.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

from relay.config import Rate
from relay.spool import RateStore, WindowKey

log = logging.getLogger("relay.limits")


def sliding_count(previous: int, current: int, elapsed_fraction: float) -> float:
    """Events in the last period, estimated from two fixed windows.

    ``elapsed_fraction`` is how far ``now`` is into the current window; the part of the
    previous window still inside the last period is ``1 - elapsed_fraction``.
    """
    return previous * (1.0 - elapsed_fraction) + current


def would_exceed(used: float, adding: int, rate: Rate) -> bool:
    """True when ``adding`` more would take the count past the limit."""
    return used + adding > rate.count



class RateCounter:
    """Counts per key over sliding windows; ``key`` is e.g. ``user:billing`` or ``client:192.0.2.7``."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock  # wall time: windows must line up across restarts
        self._counts: dict[WindowKey, int] = {}
        self._unsaved: Counter[WindowKey] = Counter()
        self.generation = 0  # bumped whenever stored totals are adopted: what others saw is new

    def now(self) -> float:
        """The counter's wall clock, which every process and node shares."""
        return self._clock()

    def used(self, key: str, period: float) -> float:
        now = self._clock()
        window, offset = divmod(now, period)
        window = int(window)
        return max(0.0, sliding_count(
            self._counts.get((key, period, window - 1), 0),
            self._counts.get((key, period, window), 0),
            offset / period,
        ))

    def add(self, key: str, period: float, amount: int) -> None:
        """Count ``amount`` now; a negative amount gives back what a failed attempt took."""
        self.add_slot((key, period, int(self._clock() // period)), amount)

    def add_slot(self, slot: WindowKey, amount: int) -> None:
        """Count ``amount`` in a given window (a mark for a time ahead: see relay.policy.auth)."""
        self._counts[slot] = self._counts.get(slot, 0) + amount
        self._unsaved[slot] += amount

    def slots(self, prefix: str) -> list[tuple[WindowKey, int]]:
        """Every window held of the keys that start with ``prefix``."""
        return [(slot, count) for slot, count in self._counts.items() if slot[0].startswith(prefix)]

    def take_unsaved(self) -> Counter[WindowKey]:
        unsaved, self._unsaved = self._unsaved, Counter()
        return unsaved

    def replace(self, stored: dict[WindowKey, int]) -> None:
        """Adopt stored totals (plus the increments made since they were read); drop old windows."""
        now = self._clock()
        counts = {slot: count for slot, count in stored.items() if slot[2] >= int(now // slot[1]) - 1}
        for slot, amount in self._unsaved.items():
            counts[slot] = counts.get(slot, 0) + amount
        self._counts = counts
        self.generation += 1

    def give_back(self, unsaved: Counter[WindowKey]) -> None:
        """A save failed: keep its increments for the next one."""
        self._unsaved.update(unsaved)



class PersistentRates:
    """A :class:`RateCounter` saved to a :class:`RateStore` every ``interval`` seconds and on stop."""

    def __init__(self, store: RateStore, interval: float = 1.0):
        self.counter = RateCounter()
        self._store = store
        self._interval = interval
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.save()  # with nothing to add: loads what the last run left
        self._task = asyncio.create_task(self._save_periodically(), name="rate-budgets")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.save()
        await self._store.close()

    async def save(self) -> None:
        unsaved = self.counter.take_unsaved()
        try:
            stored = await self._store.save(unsaved, time.time())
        except Exception as error:  # noqa: BLE001 - a full disk or a lost database: keep counting
            self.counter.give_back(unsaved)
            log.warning("could not save rate budgets (will try again): %s", error)
            return
        self.counter.replace(stored)

    async def _save_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.save()
