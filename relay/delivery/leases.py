"""Keeping the leases of the messages this node holds in memory, when several nodes share a spool.

A message queued for an account's workers or in flight is this node's only while its lease
lasts (``spool.lease``): :class:`LeaseKeeper` renews every one of them in one call every
``lease / 3`` seconds, so two renewals can fail before another node may take one over. A
message the spool says is lost (this node stalled past its lease and another claimed it) is
not started here; one already under way finishes, and its outcome is fenced by the spool.
On one node (SQLite) renewing is a no-op and nothing is ever lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection

from relay.spool import Spool

log = logging.getLogger("relay.delivery")


def renew_interval(lease: float) -> float:
    """Seconds between renewals: a third of the lease (two may fail before the lease runs out)."""
    return lease / 3


class LeaseKeeper:
    """Renews what ``holding()`` names, every ``renew_interval(lease())``; remembers what was lost."""

    def __init__(self, spool: Spool, holding: Callable[[], Collection[str]], lease: Callable[[], float]):
        self._spool = spool
        self._holding = holding
        self._lease = lease
        self._lost: set[str] = set()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lease-keeper")

    async def stop(self, release: Collection[str]) -> None:
        """Stop renewing and give ``release`` back, so other nodes may take them at once."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if release:
            try:
                await self._spool.release(release)
            except Exception as error:  # noqa: BLE001 - the leases then simply run out
                log.warning("could not release %d lease(s) (%s); they expire in spool.lease", len(release), error)

    def may_start(self, message_id: str) -> bool:
        """Whether a worker may start this message: False, once, for a message whose lease was lost."""
        if message_id in self._lost:
            self._lost.discard(message_id)
            log.warning("%s: another node took this message over (lease lost); not delivering it here", message_id)
            return False
        return True

    async def renew_once(self) -> None:
        holding = set(self._holding())
        lost = await self._spool.renew(holding) if holding else set()
        self._lost = (self._lost | lost) & holding  # forget ids no longer held here

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(renew_interval(self._lease()))
            try:
                await self.renew_once()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - a spool hiccup: the next renewal may land in time
                log.warning("renewing %d lease(s) failed (%s)", len(self._holding()), error)
