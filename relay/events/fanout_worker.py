"""The teams' fan-out: POSTs outbox rows to each user's ``events_url``, retried across restarts.

Rows are written by the applier in the same durable write as the event's other effects, so
an event is fanned out at least once whatever crashes; the receiver never waits for this.
A row is retried with :func:`relay.events.fanout.next_retry` (seconds growing to 10 minutes)
until it is answered 2xx or :func:`~relay.events.fanout.gives_up` says it is too old.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

import aiohttp

from relay.config import Config
from relay.events import fanout
from relay.observe import metrics
from relay.spool import Spool
from relay.spool.events_model import OutboxRow

log = logging.getLogger("relay.events")

_BATCH = 100  # rows read per poll
_PARALLEL = 8  # POSTs in flight at once
_TIMEOUT = 10.0  # seconds a team's endpoint has to answer


class FanoutWorker:
    def __init__(self, config: Callable[[], Config], spool: Spool, interval: float = 1.0):
        self._config = config
        self._spool = spool
        self._interval = interval
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None
        self._slots = asyncio.Semaphore(_PARALLEL)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_TIMEOUT))
        self._task = asyncio.create_task(self._run(), name="events-fanout")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            try:
                rows = await self._spool.due_fanout(time.time(), _BATCH)
                await asyncio.gather(*(self._send(row) for row in rows))
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - rows stay in the outbox; the next poll retries them
                log.exception("fan-out poll failed; trying again")
                rows = []
            if len(rows) < _BATCH:
                await asyncio.sleep(self._interval)

    async def _send(self, row: OutboxRow) -> None:
        async with self._slots:
            user = self._config().users.get(row.user)
            if user is None or user.events_url is None or user.events_secret is None:
                log.warning("fan-out %d: user %s no longer has events_url; dropped", row.id, row.user)
                await self._spool.fanout_done(row.id)
                return
            now = time.time()
            secret = user.events_secret.get_secret_value().encode()
            headers = {
                "Content-Type": "application/json",
                "X-Relay-Signature": fanout.signature_header(secret, row.body, int(now)),
            }
            try:
                async with self._session.post(user.events_url, data=row.body, headers=headers) as response:
                    delivered = 200 <= response.status < 300
                    outcome = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as error:
                delivered, outcome = False, type(error).__name__
            if delivered:
                metrics.FANOUT.labels(row.user, "delivered").inc()
                await self._spool.fanout_done(row.id)
                return
            attempts = row.attempts + 1
            if fanout.gives_up(row.created_at, now):
                metrics.FANOUT.labels(row.user, "dropped").inc()
                log.error("fan-out %d to %s: gave up after %d tries (%s)", row.id, row.user, attempts, outcome)
                await self._spool.fanout_done(row.id)
                return
            metrics.FANOUT.labels(row.user, "retry").inc()
            wait = fanout.next_retry(attempts, random.random())
            log.info("fan-out %d to %s: %s; try %d again in %.0fs", row.id, row.user, outcome, attempts + 1, wait)
            await self._spool.fanout_retry(row.id, attempts, now + wait)
