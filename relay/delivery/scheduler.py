"""Postfix's qmgr for the relay: decides what to try when, and runs the account workers.

New mail is handed over in memory right after it is spooled; everything else (deferred mail
coming due, mail left over from before a restart, `queue retry` and `queue flush` from the
CLI) is found by polling the spool's index of pending recipients. A message is in at most one
worker at a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from relay.config import Account, Config, Upstream
from relay.delivery.bounce import FailedRecipient, build_dsn
from relay.delivery.retry import RetryPolicy, after_attempt, is_account_throttle
from relay.delivery.sendcloud import email_ids
from relay.delivery.throttle import AccountThrottle
from relay.delivery.transport import (
    AccountPool,
    CaptureConnection,
    Connection,
    Key,
    TLSContexts,
    Transaction,
    open_connection,
)
from relay.lines import header_block, header_length
from relay.observe import metrics
from relay.observe.health import UpstreamHealth, attempt_failed
from relay.observe.logs import event
from relay.policy.suppression import SuppressionCache
from relay.rewrite.xsmtpapi import for_transaction
from relay.routing import tls_policy
from relay.spool import (
    NewMessage,
    QueuedMessage,
    Recipient,
    RecipientUpdate,
    Spool,
    State,
    new_queue_id,
)
from relay.tls import unverified_upstream_context, upstream_context

log = logging.getLogger("relay.delivery")

_POLL_BATCH = 500  # recipients fetched per poll; more come on the next poll
_PURGE_EVERY = 3600.0  # seconds between sweeps of records older than spool.keep_final


def upstream_tls(config: Config) -> TLSContexts | None:
    """The upstream client contexts (blocking: they load the CA store)."""
    if config.upstream.kind == "capture":
        return None
    return TLSContexts(verify=upstream_context(config.upstream), encrypt=unverified_upstream_context())


# How a connection for one key of an account's pool is made: open_connection's signature.
Connect = Callable[[Upstream, Account, Key, str, TLSContexts | None], Connection | CaptureConnection]


@dataclass
class _Account:
    """One account's queue, its workers, and the kept connections they share."""

    queue: asyncio.Queue[QueuedMessage | None]  # None: a worker's signal to stop
    workers: list[asyncio.Task]
    connections: AccountPool
    settings: tuple  # what the connections are made from: a change means new workers


class Scheduler:
    def __init__(
        self,
        config: Callable[[], Config],
        spool: Spool,
        connect: Connect = open_connection,
        suppressions: SuppressionCache | None = None,
        recorded: Callable[[QueuedMessage, list[RecipientUpdate]], Awaitable[None]] | None = None,
    ):
        self._config = config
        self._spool = spool
        self._connect = connect  # tests hand in a fake upstream
        self._suppressions = suppressions  # recipients suppressed for the routed channel fail at once
        self._recorded = recorded  # told every recorded outcome (statistics, the teams' fan-out)
        self._accounts: dict[str, _Account] = {}
        self._retiring: list[asyncio.Task] = []  # workers finishing their last transaction
        self.upstream_health = UpstreamHealth()
        self.throttles: dict[str, AccountThrottle] = {}  # by account name: outlives a reconfigure
        self._in_flight: set[str] = set()
        # Finished while a poll's read was under way: that read may show them stale.
        self._finished_during_poll: set[str] = set()
        self._unroutable: set[str] = set()
        self._poller: asyncio.Task | None = None
        self._stopping = False

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self.reconfigure(await asyncio.to_thread(upstream_tls, self._config()))
        self._poller = asyncio.create_task(self._poll(), name="queue-poller")

    def reconfigure(self, tls: TLSContexts | None) -> None:
        """Match the workers to the current config (at start and after a reload).

        A new account gets workers; a removed account's workers stop and its mail waits in
        the spool; an account whose connection settings changed (API key, upstream, ...)
        gets new workers and the old ones stop after their current transaction. ``tls`` is
        :func:`upstream_tls` of the current config, made beforehand off the event loop.
        """
        config = self._config()
        self._retiring = [task for task in self._retiring if not task.done()]
        for name in [name for name in self._accounts if name not in config.accounts]:
            self._retire(self._accounts.pop(name), None)
            log.warning("account %s was removed: its workers stop, its mail waits in the spool", name)
        for name, account in config.accounts.items():
            if name not in self.throttles:
                self.throttles[name] = AccountThrottle(name, self._throttle_pauses)
            settings = (account, config.upstream, config.server.hostname)
            old = self._accounts.get(name)
            if old is not None and old.settings == settings:
                continue
            connections = AccountPool(
                config.upstream.connections_per_account,
                lambda key, account=account: self._connect(config.upstream, account, key, config.server.hostname, tls),
            )
            new = _Account(asyncio.Queue(), [], connections, settings)
            new.workers = [
                asyncio.create_task(self._work(new), name=f"deliver-{name}-{number}")
                for number in range(config.upstream.connections_per_account)
            ]
            self._accounts[name] = new
            if old is not None:
                self._retire(old, new.queue)
                log.info("account %s: connection settings changed, new workers started", name)

    def _retire(self, account: _Account, successor: asyncio.Queue | None) -> None:
        """Stop an account's workers after their current transaction, then close its
        connections; its waiting mail moves to ``successor`` or, with none, back to the spool."""
        while not account.queue.empty():
            message = account.queue.get_nowait()
            if successor is not None:
                successor.put_nowait(message)
            else:
                self._in_flight.discard(message.id)
        for _ in account.workers:
            account.queue.put_nowait(None)

        async def close_when_done() -> None:
            await asyncio.gather(*account.workers, return_exceptions=True)
            await account.connections.close()

        self._retiring.extend([*account.workers, asyncio.create_task(close_when_done())])

    def dead_workers(self) -> list[str]:
        """Accounts with a worker that ended while it should run (for /readyz)."""
        if self._stopping:
            return []
        dead = [name for name, account in self._accounts.items() if any(task.done() for task in account.workers)]
        if self._poller is not None and self._poller.done():
            dead.append("queue poller")
        return dead

    async def stop(self, grace: float) -> None:
        """Let workers finish the transaction they are in (bounded), then stop them."""
        self._stopping = True
        if self._poller:
            self._poller.cancel()
        for account in self._accounts.values():
            self._retire(account, None)
        if self._retiring:
            _, pending = await asyncio.wait(self._retiring, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._retiring, return_exceptions=True)

    # -- intake -----------------------------------------------------------------------------

    def submit(self, message: NewMessage) -> None:
        """Hand a just-spooled message to its account's workers without a poll."""
        recipients = [
            Recipient(message.id, idx, address, State.QUEUED, 0, message.received_at)
            for idx, address in enumerate(message.recipients)
        ]
        queued = QueuedMessage(
            message.id, message.received_at, message.user, message.listener, message.client,
            message.account, message.channel, message.sender, message.size, message.label,
            message.mail_from, message.eight_bit, recipients,
        )
        self._enqueue(queued)

    def _enqueue(self, message: QueuedMessage) -> None:
        if self._stopping or message.id in self._in_flight:
            return
        account = self._accounts.get(message.account)
        if account is None:
            if message.id not in self._unroutable:
                self._unroutable.add(message.id)
                log.warning("%s: account %s is not configured; message waits", message.id, message.account)
            return
        self._in_flight.add(message.id)
        account.queue.put_nowait(message)  # carries only the recipients to try now

    async def _poll(self) -> None:
        last_purge = 0.0
        while True:
            try:
                if time.monotonic() - last_purge > _PURGE_EVERY:
                    last_purge = time.monotonic()
                    purged = await self._spool.purge_final(time.time() - self._config().spool.keep_final)
                    if purged:
                        log.info("forgot %d delivered or failed message(s) older than spool.keep_final", purged)
                backlog = sum(account.queue.qsize() for account in self._accounts.values())
                if backlog < _POLL_BATCH:
                    self._finished_during_poll.clear()
                    for message in await self._spool.due(time.time(), _POLL_BATCH):
                        if message.id not in self._finished_during_poll:
                            self._enqueue(message)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a spool hiccup must not stop scheduling
                log.exception("queue poll failed; trying again")
            await asyncio.sleep(self._config().spool.poll_interval)

    def _throttle_pauses(self) -> tuple[float, float]:
        upstream = self._config().upstream
        return upstream.throttle_pause, upstream.throttle_max_pause

    # -- workers ----------------------------------------------------------------------------

    async def _work(self, account: _Account) -> None:
        while True:
            message = await account.queue.get()
            if message is None:
                return
            try:
                await self._deliver(message, account.connections)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the message stays pending and is retried
                log.exception("%s: delivery failed unexpectedly; will retry", message.id)
            finally:
                self._in_flight.discard(message.id)
                self._finished_during_poll.add(message.id)

    async def _deliver(self, message: QueuedMessage, pool: AccountPool) -> None:
        """Each transaction streams the message from the spool in chunks; only its header
        section (which X-SMTPAPI splitting rewrites and a DSN quotes) is read whole."""
        start = await self._spool.start(message.id)
        if start is None:  # deleted with `queue delete`, or already final
            return
        first, size = start
        head_size = header_length(first) or len(first)
        head, rest = first[:head_size], first[head_size:]
        config = self._config()
        policy = RetryPolicy(tuple(config.spool.retry), config.spool.retry_jitter, config.spool.max_lifetime)
        per_transaction = config.upstream.max_recipients_per_transaction
        throttle = self.throttles[message.account]
        updates = self._suppressed(message)
        failed_now = {update.idx for update in updates}
        sending = dataclasses.replace(message, recipients=[r for r in message.recipients if r.idx not in failed_now])
        for chunk, key in _transactions(sending, config, per_transaction):
            addresses = [recipient.address for recipient in chunk]
            probe = await throttle.acquire()  # waits while SendCloud has asked the account to slow down
            started = time.monotonic()
            sent_head = for_transaction(head, addresses)  # X-SMTPAPI "to" may name only these recipients
            text = self._text(message.id, sent_head, rest, len(first), size)
            throttled = False
            try:
                connection = await pool.acquire(key)
                try:
                    with metrics.UPSTREAM_IN_USE.labels(message.account).track_inprogress():
                        result = await connection.send(Transaction(
                            message.id, message.upstream_sender, addresses,
                            size - head_size + len(sent_head), message.eight_bit, text,
                        ))
                finally:
                    pool.release(connection)
                throttled = any(is_account_throttle(reply) for reply in result.replies)
            finally:
                throttle.release(probe, throttled)
            metrics.UPSTREAM_SECONDS.labels(message.account).observe(time.monotonic() - started)
            now = time.time()
            failing_since = self.upstream_health.record(message.account, attempt_failed(result.replies), now)
            metrics.UPSTREAM_FAILING_SINCE.labels(message.account).set(failing_since or 0)
            held_until = now + throttle.remaining() if throttled else None
            ids = email_ids(result.upstream_id, addresses) if result.upstream_id else [None] * len(chunk)
            for recipient, reply, email_id in zip(chunk, result.replies, ids, strict=True):
                update = after_attempt(
                    recipient, reply, message.received_at, now, policy, random.random(), email_id,
                    held_until if is_account_throttle(reply) else None,
                )
                updates.append(update)
                delivered = update.state is State.DELIVERED
                metrics.delivery_result(message.user, message.account, message.channel, update.state.value,
                                        now - message.received_at if delivered else None)
                event(log, message.id, {
                    "to": recipient.address, "relay": result.relay, "delay": now - message.received_at,
                    "attempts": update.attempts, "email_id": email_id if delivered else None,
                    "status": _status_word(update.state),
                }, update.last_reply)
            log.debug("%s: transaction of %d took %.3fs", message.id, len(chunk), time.monotonic() - started)
        bounces = self._bounces(message, updates, head, config)
        await self._spool.record(updates, bounces)
        for bounce in bounces:
            log.info("%s: sender non-delivery notification: %s", message.id, bounce.id)
            self.submit(bounce)
        if self._recorded is not None:
            await self._recorded(message, updates)

    def _suppressed(self, message: QueuedMessage) -> list[RecipientUpdate]:
        """Recipients suppressed for the channel and account the message was routed to: failed
        now with the reason (their DSN follows as for any failure), never sent upstream."""
        if self._suppressions is None:
            return []
        now = time.time()
        updates = []
        for recipient in message.recipients:
            reply = self._suppressions.routed_refusal(recipient.address, message.channel, message.account, now)
            if reply is None:
                continue
            updates.append(RecipientUpdate(message.id, recipient.idx, State.FAILED, recipient.attempts, now, str(reply),
                                           dsn_status=reply.enhanced))
            metrics.delivery_result(message.user, message.account, message.channel, State.FAILED.value)
            event(log, message.id, {"to": recipient.address, "status": "suppressed"}, str(reply))
        return updates

    async def _text(self, message_id: str, head: bytes, rest: bytes, offset: int, size: int) -> AsyncIterator[bytes]:
        """The message for one transaction: its header section, then the body as spooled."""
        yield head
        if rest:
            yield rest
        async for chunk in self._spool.chunks(message_id, offset, size):
            yield chunk

    def _bounces(self, message: QueuedMessage, updates: list[RecipientUpdate], head: bytes, config: Config) -> list[NewMessage]:
        addresses = {recipient.idx: recipient.address for recipient in message.recipients}
        failed = [
            FailedRecipient(addresses[update.idx], update.last_reply, update.dsn_status or "5.0.0")
            for update in updates
            if update.state is State.FAILED
        ]
        if not failed or not message.sender:  # never bounce a bounce
            return []
        now = time.time()
        account = config.accounts.get(message.account)
        dsn = build_dsn(
            queue_id=message.id,
            original_sender=message.sender,
            recipients=failed,
            original_headers=header_block(head),
            reporting_mta=config.server.hostname,
            from_domain=account.domain if account else config.server.hostname,
            arrival=message.received_at,
            now=now,
        )
        return [
            NewMessage(
                new_queue_id(now), now, message.user, "bounce", "local", message.account,
                message.channel, "", [message.sender], dsn,
            )
        ]


def _transactions(message: QueuedMessage, config: Config, size: int) -> list[tuple[list[Recipient], Key]]:
    """Recipients grouped by upstream TLS policy, in RCPT order, then in chunks of ``size``.

    Recipients whose rules ask for different TLS never share a transaction: one that needs
    ``verify`` must not ride on a connection opened under ``may``.
    """
    groups: dict[str, list[Recipient]] = {}
    for recipient in message.recipients:
        groups.setdefault(tls_policy(config, message.account, recipient.address), []).append(recipient)
    return [
        (recipients[start : start + size], Key(message.label, policy))
        for policy, recipients in groups.items()
        for start in range(0, len(recipients), size)
    ]


def _status_word(state: State) -> str:
    return {State.DELIVERED: "sent", State.FAILED: "bounced", State.DEFERRED: "deferred"}.get(state, state.value)
