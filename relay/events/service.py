"""The events stage as the process runs it: receiver, applier, fan-out and retention together."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from relay.config import Config
from relay.events.applier import Applier, failed_outbox, requested_rows
from relay.events.fanout_worker import FanoutWorker
from relay.events.receiver import Receiver
from relay.spool import OutcomeRows, QueuedMessage, RecipientUpdate, Spool, State

log = logging.getLogger("relay.events")

_PRUNE_EVERY = 3600.0
_PRUNE_BATCH = 1000  # events deleted per write: the spool writer is never held for long


class EventsService:
    def __init__(self, config: Callable[[], Config], spool: Spool):
        self._config = config
        self._spool = spool
        self.applier = Applier(config, spool)
        self.receiver = Receiver(config, spool, self.applier)
        self.fanout = FanoutWorker(config, spool)
        self._pruner: asyncio.Task | None = None

    async def start(self) -> None:
        """The applier and fan-out always run (outbox rows and unapplied events may wait from
        before); the receiver (bound and served with the other listeners) only when
        ``events.listen`` is set."""
        await self.applier.start()
        await self.fanout.start()
        self._pruner = asyncio.create_task(self._prune(), name="events-retention")

    async def stop(self) -> None:
        await self.receiver.stop()
        if self._pruner is not None:
            self._pruner.cancel()
            await asyncio.gather(self._pruner, return_exceptions=True)
        await self.applier.stop()
        await self.fanout.stop()

    def outcome_rows(self, message: QueuedMessage, updates: list[RecipientUpdate]) -> OutcomeRows:
        """What delivery records with these outcomes (in the same spool write): ``requested``
        for the recipients SendCloud accepted at the final dot, and the team's ``failed`` rows
        for those the relay failed."""
        now = time.time()
        by_idx = {recipient.idx: recipient.address for recipient in message.recipients}
        accepted = [by_idx[u.idx] for u in updates if u.state is State.DELIVERED and u.idx in by_idx]
        failed = [row for row in (failed_outbox(self._config(), message, u, now) for u in updates) if row is not None]
        stats = requested_rows(message.user, message.account, message.channel, message.label, accepted, now) if accepted else []
        return OutcomeRows(tuple(stats), tuple(failed))

    async def _prune(self) -> None:
        while True:
            try:
                older_than = time.time() - self._config().events.retention
                while await self._spool.prune_events(older_than, _PRUNE_BATCH) == _PRUNE_BATCH:
                    await asyncio.sleep(0.1)  # let mail and events through between batches
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - retried at the next sweep
                log.exception("pruning old events failed")
            await asyncio.sleep(_PRUNE_EVERY)
