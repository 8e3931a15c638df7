"""`serve`: wires config, spool, delivery, listeners and the admin endpoint; reloads; stops in order.

Shutdown order matters for "never lose mail": stop accepting, let sessions in a
transaction and deliveries in flight finish (side by side, within one ``shutdown_grace``),
then close the spool, which mail accepted meanwhile still reached. A SIGKILL at
any point instead loses nothing either: whatever got a ``250`` is committed, and on start
every recipient that is not final is picked up again by the scheduler's first poll.

Reload (SIGHUP, or ``POST /api/reload`` from `sendcloud-relay reload`): the new config is read
and everything fallible about it — validation, TLS files, the upstream CA — is done first, off
the event loop; only then is it swapped in, in one step, so a session sees either the old
config or the new one. Listeners and the scheduler read the config through a callable, so
open sessions and queued mail carry on; a config that fails is refused and the old one kept.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from collections.abc import Callable
from pathlib import Path

from relay.config import (
    Config,
    ConfigError,
    acceptor_count,
    load_config,
    load_demo_config,
)
from relay.config.diff import restart_needed
from relay.delivery.scheduler import Scheduler, upstream_tls
from relay.events.service import EventsService
from relay.intake import Intake
from relay.observe import logs, metrics
from relay.ops.http import AdminBackend, AdminServer
from relay.policy.anvil import LocalLimits
from relay.policy.auth import Authenticator
from relay.policy.rates import PersistentRates
from relay.policy.suppression import SuppressionCache
from relay.process.startup import StartupError, bind_all, open_spool_or_refuse, serve_all, server_tls
from relay.process.supervisor import AcceptorPool
from relay.rewrite.pipeline import Preparer
from relay.smtp.listeners import ListenerGroup
from relay.smtp.session import Services
from relay.spool import NewMessage, open_spool, rate_store
from relay.tls import server_context
from relay.webapi.server import WebAPIServer

log = logging.getLogger("relay")


class Relay:
    def __init__(self, config: Config, load: Callable[[], Config] = load_demo_config, verbose: bool = False,
                 config_path: Path | None = None):
        self.tls = server_tls(config)  # first: a certificate that cannot load stops the start here
        self.config = config
        self._load = load
        self._verbose = verbose
        self.stopping = False
        self.spool = open_spool(config.spool)
        self.suppressions = SuppressionCache(self.spool.suppression_version, self.spool.suppressions)
        self.events = EventsService(lambda: self.config, self.spool)
        self.scheduler = Scheduler(lambda: self.config, self.spool, suppressions=self.suppressions,
                                   outcome_rows=self.events.outcome_rows)
        self.preparer = Preparer()
        self.rates = PersistentRates(rate_store(config.spool))
        # The one table, asked by acceptors too; with several nodes (postgres) AUTH failures and
        # lockouts also go through the shared rate windows, connection counts stay this node's.
        self.limits = LocalLimits(
            lambda: self.config, shared=self.rates.counter if config.spool.backend == "postgres" else None
        )
        metrics.LAST_RELOAD_OK.set(1)  # here, not at import: acceptor processes import it too
        services = Services(
            config=lambda: self.config,
            intake=self.intake,
            authenticator=Authenticator(
                lambda: {name: user.password_hash for name, user in self.config.users.items()}
            ),
            preparer=self.preparer,
            limits=self.limits,
            rates=self.rates,
            suppressions=self.suppressions,
        )
        acceptors = acceptor_count(config)
        self.acceptors = (
            AcceptorPool(config, self.intake, self.spool.spill_directory, self.limits, acceptors) if acceptors > 1 else None
        )
        self.listeners = self.acceptors or ListenerGroup(services, self.tls.context if self.tls else None)
        # HTTP submission runs here, not in the acceptors: its requests are few and large next
        # to SMTP's sessions, and here the keys, the lockout table and the spool are at hand.
        self.http_api = WebAPIServer(
            lambda: self.config,
            Intake(lambda: self.config, self.preparer, self.rates, self.intake, self.suppressions),
            Authenticator(lambda: {name: user.api_keys for name, user in self.config.users.items()}),
            self.limits,
        )
        self.admin = AdminServer(AdminBackend(
            config=lambda: self.config,
            spool=self.spool,
            stopping=lambda: self.stopping,
            dead_workers=self.scheduler.dead_workers,
            failing_since=lambda: self.scheduler.upstream_health.failing_since,
            reload=self.reload,
            config_path=config_path.resolve() if config_path else None,
            paused_for=lambda: {name: t.remaining() for name, t in self.scheduler.throttles.items() if t.remaining()},
            unreachable_for=self.scheduler.unreachable_for,
        ))
        self._reload_lock = asyncio.Lock()

    async def intake(self, message: NewMessage) -> None:
        """Where accepted mail enters: durable first (the group commit's fsync), then to delivery."""
        await self.spool.store(message)
        self.scheduler.submit(message)

    async def start(self) -> None:
        async with self._reload_lock:  # a SIGHUP while starting reloads once everything runs
            await open_spool_or_refuse(self.spool)
            await self.suppressions.refresh()  # the list as it is before the first RCPT
            self.suppressions.start()
            await self.rates.start()
            listening = [self.listeners, self.http_api, self.admin, self.events.receiver]
            try:
                await bind_all(listening)  # every socket bound before any serves
            except StartupError:
                await self.rates.stop()
                await self.spool.close()
                raise
            await self.scheduler.start()
            await self.events.start()  # applier, fan-out and retention; the receiver serves with the listeners
            await serve_all(listening)
        _, pending, _ = await self.spool.pending_summary()  # counts() would count every recipient ever kept
        loop_module = type(asyncio.get_running_loop()).__module__
        log.info(
            "sendcloud-relay started: upstream=%s, spool=%s %s (%d queued, %d deferred), event loop: %s",
            self.config.upstream.kind, self.config.spool.backend, self.config.spool.path,
            pending.get("queued", 0), pending.get("deferred", 0),
            "uvloop" if loop_module.startswith("uvloop") else "asyncio",
        )

    async def reload(self) -> tuple[str | None, list[str]]:
        """Re-read the config; returns (why it was refused, or None; settings needing a restart)."""
        async with self._reload_lock:
            try:
                new = await asyncio.to_thread(self._load)
                tls = None
                if self.tls is not None and new.server.tls is not None:
                    files = new.server.tls
                    tls = await asyncio.to_thread(_loading, "server.tls", f"{files.cert} and {files.key}",
                                                  server_context, files, new.server.hostname)
                client_tls = await asyncio.to_thread(_loading, "upstream.ca_file", str(new.upstream.ca_file),
                                                     upstream_tls, new)
            except ConfigError as error:
                metrics.reload(False)
                log.error("config reload refused, the running config stays:\n%s", error)
                return str(error), []
            old, self.config = self.config, new
            if tls is not None:
                self.tls.install(tls)
            logs.configure(new.logging, logs.secrets_of(new), self._verbose)
            self.scheduler.reconfigure(client_tls)
            if self.acceptors:
                self.acceptors.reconfigure(new)
            waiting = restart_needed(old, new)
            metrics.reload(True)
            log.info("config reloaded%s", f"; these changes need a restart: {', '.join(waiting)}" if waiting else "")
            return None, waiting

    async def stop(self) -> None:
        """One ``server.shutdown_grace`` for everything: sessions and deliveries finish side by side."""
        self.stopping = True
        grace = self.config.server.shutdown_grace
        log.info("shutting down: no new connections; sessions in a transaction and deliveries get %.0fs", grace)
        await asyncio.gather(self.listeners.stop(grace), self.http_api.stop(grace), self.scheduler.stop(grace))
        await self.events.stop()
        await self.suppressions.stop()
        await asyncio.to_thread(self.preparer.close)
        await self.rates.stop()
        await self.spool.close()
        await self.admin.stop()
        log.info(
            "stopped; spool closed cleanly after %d writes in %d commits (fsyncs)",
            self.spool.operations, self.spool.commits,
        )


def _loading(key: str, what: str, make: Callable, *args):
    """Make a TLS context, turning a file problem into a config error that names the key."""
    try:
        return make(*args)
    except (OSError, ssl.SSLError, ValueError) as error:
        raise ConfigError(f"{key}: cannot load {what}: {getattr(error, 'strerror', None) or error}") from None


async def serve(config: Config, config_path: Path | None = None, verbose: bool = False) -> None:
    """Run until SIGTERM or SIGINT; SIGHUP reloads the config."""
    load = (lambda: load_config(config_path)) if config_path else load_demo_config
    relay = Relay(config, load, verbose, config_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task] = set()

    def reload() -> None:
        task = asyncio.create_task(relay.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for signum in (signal.SIGTERM, signal.SIGINT):  # before start: clients may connect (and a
        loop.add_signal_handler(signum, stop.set)   # supervisor signal) as soon as one listens
    loop.add_signal_handler(signal.SIGHUP, reload)  # (SIGHUP's default action would kill it)
    await relay.start()
    await stop.wait()
    await relay.stop()
