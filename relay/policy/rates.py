"""Postfix's anvil for the relay: it counts, and small pure functions decide.

Three kinds of count live here:

- **open connections**, in total and per client address (:class:`Connections`);
- **rates**: recipients accepted per user and per client address over a sliding window
  (:class:`RateCounter`), the budget behind ``users.*.rate_limit: 600/hour``;
- **recent events** such as failed logins, per key, within a window (:class:`RecentEvents`),
  which :mod:`relay.auth` turns into delays and lockouts.

Rates use a sliding-window counter (the current window's count plus the previous window's,
weighted by how much of it still overlaps the last ``period``): two integers per key, close to
an exact "at most N in any period", and small enough to persist. :class:`RateStore` keeps the
counts in a table of the spool's database so an hourly budget survives a restart; it adds
this process's increments to the stored counts and reads the totals back, so several
processes sharing one spool also share one budget.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("relay.limits")

_PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\S.*?)\s*$")


@dataclass(frozen=True)
class Rate:
    """At most ``count`` in any ``period`` seconds."""

    count: int
    period: float

    def __str__(self) -> str:
        for name, seconds in reversed(_PERIODS.items()):
            if self.period == seconds:
                return f"{self.count}/{name}"
        for suffix, seconds in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
            if self.period % seconds == 0:
                return f"{self.count}/{self.period / seconds:g}{suffix}"
        return f"{self.count}/{self.period:g}s"


def parse_rate(value: object) -> Rate:
    """``"600/hour"``, ``"20/minute"``, ``"1000/day"``, or a duration: ``"50/10m"``."""
    from relay.config import parse_duration  # config owns the duration syntax

    match = _RATE.match(value) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"{value!r} is not a rate: use e.g. 600/hour, 20/minute or 50/10m")
    count, unit = int(match.group(1)), match.group(2).lower()
    period = _PERIODS.get(unit) or _PERIODS.get(unit.removesuffix("s"))
    if period is None:
        try:
            period = parse_duration(unit if unit[0].isdigit() else f"1{unit}")
        except ValueError:
            raise ValueError(f"{value!r}: the period must be second, minute, hour, day or a duration like 10m") from None
    if count < 1 or period <= 0:
        raise ValueError(f"{value!r}: the count and the period must be greater than zero")
    return Rate(count, period)


def sliding_count(previous: int, current: int, elapsed_fraction: float) -> float:
    """Events in the last period, estimated from two fixed windows.

    ``elapsed_fraction`` is how far ``now`` is into the current window; the part of the
    previous window still inside the last period is ``1 - elapsed_fraction``.
    """
    return previous * (1.0 - elapsed_fraction) + current


def would_exceed(used: float, adding: int, rate: Rate) -> bool:
    """True when ``adding`` more would take the count past the limit."""
    return used + adding > rate.count


# -- rates --------------------------------------------------------------------------------------


_WindowKey = tuple[str, float, int]  # (key, period, window number)


class RateCounter:
    """Counts per key over sliding windows; ``key`` is e.g. ``user:billing`` or ``client:192.0.2.7``."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock  # wall time: windows must line up across restarts
        self._counts: dict[_WindowKey, int] = {}
        self._unsaved: Counter[_WindowKey] = Counter()

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
        slot = (key, period, int(self._clock() // period))
        self._counts[slot] = self._counts.get(slot, 0) + amount
        self._unsaved[slot] += amount

    def take_unsaved(self) -> Counter[_WindowKey]:
        unsaved, self._unsaved = self._unsaved, Counter()
        return unsaved

    def replace(self, stored: dict[_WindowKey, int]) -> None:
        """Adopt stored totals (plus the increments made since they were read); drop old windows."""
        now = self._clock()
        counts = {slot: count for slot, count in stored.items() if slot[2] >= int(now // slot[1]) - 1}
        for slot, amount in self._unsaved.items():
            counts[slot] = counts.get(slot, 0) + amount
        self._counts = counts

    def give_back(self, unsaved: Counter[_WindowKey]) -> None:
        """A save failed: keep its increments for the next one."""
        self._unsaved.update(unsaved)


_RATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS rate_windows (
    key    TEXT NOT NULL,
    period REAL NOT NULL,
    window INTEGER NOT NULL,
    count  INTEGER NOT NULL,
    PRIMARY KEY (key, period, window)
) WITHOUT ROWID;
"""


class RateStore:
    """The ``rate_windows`` table in the spool's database, written from a worker thread."""

    def __init__(self, path: Path):
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=10000")
            # Survives a crash of the process (the spool's own commits fsync the shared WAL);
            # a budget is worth less than an fsync per save.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_RATE_SCHEMA)
            self._conn = conn
        return self._conn

    def save(self, increments: Counter[_WindowKey], now: float) -> dict[_WindowKey, int]:
        """Add ``increments`` to the stored counts, forget windows no rate can still see, read all back."""
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT INTO rate_windows (key, period, window, count) VALUES (?,?,?,?) "
                "ON CONFLICT (key, period, window) DO UPDATE SET count = count + excluded.count",
                [(key, period, window, amount) for (key, period, window), amount in increments.items()],
            )
            conn.execute("DELETE FROM rate_windows WHERE (window + 2) * period < ?", (now,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        rows = conn.execute("SELECT key, period, window, count FROM rate_windows").fetchall()
        return {(key, period, window): count for key, period, window, count in rows}

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


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
        await asyncio.to_thread(self._store.close)

    async def save(self) -> None:
        unsaved = self.counter.take_unsaved()
        try:
            stored = await asyncio.to_thread(self._store.save, unsaved, time.time())
        except (sqlite3.Error, OSError) as error:
            self.counter.give_back(unsaved)
            log.warning("could not save rate budgets (will try again): %s", error)
            return
        self.counter.replace(stored)

    async def _save_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.save()


# -- connections and recent events ---------------------------------------------------------------


class Connections:
    """Open SMTP sessions, in total and per client address (None: not known yet, or never)."""

    def __init__(self) -> None:
        self.total = 0
        self.by_address: Counter[str] = Counter()

    def opened(self, address: str | None) -> None:
        self.total += 1
        self.also_from(address)

    def also_from(self, address: str | None) -> None:
        """The session's address became known (a PROXY header named it)."""
        if address is not None:
            self.by_address[address] += 1

    def closed(self, address: str | None) -> None:
        self.total -= 1
        if address is not None:
            self.by_address[address] -= 1
            if self.by_address[address] <= 0:
                del self.by_address[address]


class RecentEvents:
    """Timestamps of recent events per key (failed logins); ``window`` is given per call so a
    reloaded setting applies at once."""

    def __init__(self, keep: int = 64, max_keys: int = 50_000, clock: Callable[[], float] = time.monotonic):
        self._keep = keep
        self._max_keys = max_keys
        self._clock = clock
        self._events: dict[str, list[float]] = {}

    def record(self, key: str, window: float) -> int:
        """Note one event; return how many happened within ``window`` seconds, this one included."""
        now = self._clock()
        recent = [t for t in self._events.get(key, ()) if now - t < window]
        recent.append(now)
        if len(self._events) >= self._max_keys and key not in self._events:
            self._forget_older_than(now - window)
        self._events[key] = recent[-self._keep :]
        return len(recent)

    def _forget_older_than(self, cutoff: float) -> None:
        self._events = {key: times for key, times in self._events.items() if times[-1] > cutoff}
        if len(self._events) >= self._max_keys:  # a flood of fresh keys: start over rather than grow
            self._events.clear()
