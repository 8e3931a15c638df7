"""`serve`: wires config, spool, delivery and listeners together, and shuts them down in order.

Shutdown order matters for "never lose mail": stop accepting, let sessions in a
transaction finish (bounded), then stop delivery workers, then close the spool. A SIGKILL at
any point instead loses nothing either: whatever got a ``250`` is committed, and on start
every recipient that is not final is picked up again by the scheduler's first poll.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from relay.auth import Authenticator, FailureDelay
from relay.config import Config
from relay.delivery import Scheduler
from relay.listener import ListenerGroup, Services
from relay.prepare import Preparer
from relay.spool.sqlite import SqliteSpool
from relay.tls import server_context

log = logging.getLogger("relay")


class Relay:
    def __init__(self, config: Config):
        self.config = config
        self.spool = SqliteSpool(config.spool.path)
        self.scheduler = Scheduler(lambda: self.config, self.spool)
        self.preparer = Preparer()
        services = Services(
            config=lambda: self.config,
            spool=self.spool,
            scheduler=self.scheduler,
            authenticator=Authenticator(
                lambda: {name: user.password_hash for name, user in self.config.users.items()}
            ),
            failures=FailureDelay(config.server.auth_failure_delay),
            preparer=self.preparer,
        )
        tls = server_context(config.server.tls, config.server.hostname) if config.server.tls else None
        self.listeners = ListenerGroup(services, tls)

    async def start(self) -> None:
        await self.spool.open()
        await self.scheduler.start()
        await self.listeners.start()
        pending = await self.spool.counts()
        log.info(
            "sendcloud-relay started: upstream=%s, spool=%s (%d queued, %d deferred)",
            self.config.upstream.kind, self.config.spool.path,
            pending.get("queued", 0), pending.get("deferred", 0),
        )

    async def stop(self) -> None:
        grace = self.config.server.shutdown_grace
        log.info("shutting down: no new connections, %d open sessions get %.0fs", len(self.listeners.connections), grace)
        await self.listeners.stop(grace)
        await self.scheduler.stop(grace)
        await asyncio.to_thread(self.preparer.close)
        await self.spool.close()
        log.info(
            "stopped; spool closed cleanly after %d writes in %d commits (fsyncs)",
            self.spool.operations, self.spool.commits,
        )


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT."""
    relay = Relay(config)
    await relay.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await relay.stop()
