"""Postfix's qmgr for the relay: decides what to try when, and runs the account workers.

New mail is handed over in memory right after it is spooled; everything else (deferred mail
coming due, mail left over from before a restart, `queue retry` and `queue flush` from the
CLI, new mail that found the active queue full) is found by polling the spool's index of
pending recipients (what an operator made due now goes first: relay/delivery/ahead.py). At
most ``spool.active_limit`` messages are held in memory (Postfix's active queue); the rest
waits in the spool. A message is in at most one worker at a time, and its recipients deferred
in one delivery come back together.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from relay.config import Account, Config, Upstream
from relay.delivery.ahead import PEEK, ahead_until, taken_ahead, walk_again
from relay.delivery.bounce import FailedRecipient, build_dsn
from relay.delivery.leases import LeaseKeeper
from relay.delivery.retry import RetryPolicy, after_attempt, is_account_throttle, message_retry_at, while_unconfigured
from relay.delivery.sendcloud import email_ids
from relay.delivery.throttle import Gate, GateClosed, destination, pause_length
from relay.delivery.transport import (
    AccountPool,
    CaptureConnection,
    Connection,
    Key,
    Result,
    TLSContexts,
    Transaction,
    open_connection,
)
from relay.errors import SMTPReply
from relay.lines import header_block, header_length
from relay.observe import metrics
from relay.observe.health import UpstreamHealth, attempt_failed
from relay.observe.logs import event
from relay.policy.suppression import SuppressionCache
from relay.rewrite.xsmtpapi import for_transaction
from relay.routing import tls_policy
from relay.spool import (
    NO_ROWS,
    Cursor,
    NewMessage,
    OutcomeRows,
    QueuedMessage,
    Recipient,
    RecipientUpdate,
    Spool,
    State,
    due_key,
    new_queue_id,
)
from relay.tls import unverified_upstream_context, upstream_context

log = logging.getLogger("relay.delivery")

_PAGE = 500  # messages read per due() page; the poller reads pages while the active queue has room
_REWALK_EVERY = 60.0  # seconds: during a drain, how often the poller's walk starts again from the earliest
_FRESH_SHARE = 4  # the poller fills the active queue only to 3/4 of spool.active_limit: the rest is new mail's
_PURGE_EVERY = 3600.0  # seconds between sweeps of records older than spool.keep_final
_MAX_RECORD_BACKOFF = 60.0  # seconds between retries of a record the spool refused, at most
_KEPT_BODY = 64 * 1024  # a new message up to this size keeps its body in memory for its first delivery...
_KEPT_BODIES = 4 * 2**20  # ...while the kept bodies together stay under this many bytes...
_KEPT_FOR = 1.0  # ...and it is taken within this many seconds (else it is read from the spool again)


def upstream_tls(config: Config) -> TLSContexts | None:
    """The upstream client contexts (blocking: they load the CA store)."""
    if config.upstream.kind == "capture":
        return None
    return TLSContexts(verify=upstream_context(config.upstream), encrypt=unverified_upstream_context())


# How a connection for one key of an account's pool is made: open_connection's signature.
Connect = Callable[[Upstream, Account, Key, str, TLSContexts | None], Connection | CaptureConnection]


class _Waiting:
    """One account's messages waiting for a worker: new mail (handed over by ``submit``) and
    the backlog (read from the spool by the poller), taken in turn, so a draining backlog
    never holds new mail up and new mail never starves the backlog (Postfix's qmgr alternates
    between its incoming and deferred queues in the same way)."""

    def __init__(self) -> None:
        self._fresh: deque[QueuedMessage] = deque()
        self._backlog: deque[QueuedMessage] = deque()
        self._fresh_next = True
        self._stops = 0  # workers told to stop
        self._ready = asyncio.Event()

    def put(self, message: QueuedMessage, fresh: bool) -> None:
        (self._fresh if fresh else self._backlog).append(message)
        self._ready.set()

    def stop(self, workers: int) -> None:
        self._stops += workers
        self._ready.set()

    def take_all(self) -> list[tuple[QueuedMessage, bool]]:
        """Every waiting message and whether it is new mail, leaving none."""
        taken = [(message, True) for message in self._fresh] + [(message, False) for message in self._backlog]
        self._fresh.clear()
        self._backlog.clear()
        return taken

    async def get(self) -> QueuedMessage | None:
        """The next message, or None: the worker is to stop."""
        while True:
            if self._stops:
                self._stops -= 1
                return None
            for queue in (self._fresh, self._backlog) if self._fresh_next else (self._backlog, self._fresh):
                if queue:
                    self._fresh_next = queue is not self._fresh
                    return queue.popleft()
            self._ready.clear()
            await self._ready.wait()


class _KeptBodies:
    """The bodies of new small messages, kept from their intake for their first delivery: a
    worker that takes one at once sends it without a spool read (a hand-off to the reader
    thread) of what the writer committed a moment ago. Bounded in bytes; a body that waited
    longer than ``_KEPT_FOR`` (or behind an account's pause) is read from the spool instead, so
    a message deleted meanwhile is seen as gone."""

    def __init__(self) -> None:
        self._bodies: dict[str, tuple[bytes, float]] = {}  # by queue ID: the body, time.monotonic() kept
        self._bytes = 0

    def keep(self, message: NewMessage) -> None:
        size = message.size
        pieces = message.pieces
        if size > _KEPT_BODY or self._bytes + size > _KEPT_BODIES:
            return
        if not all(isinstance(piece, (bytes, bytearray, memoryview)) for piece in pieces):
            return  # a piece waiting in a file: not worth reading here
        self._bodies[message.id] = (b"".join(pieces), time.monotonic())  # a copy: the pieces may be views
        self._bytes += size

    def take(self, message_id: str) -> tuple[bytes, int] | None:
        """The kept body as :meth:`Spool.start` gives it (here: whole), if kept and fresh; forgotten either way."""
        kept = self._bodies.pop(message_id, None)
        if kept is None:
            return None
        body, since = kept
        self._bytes -= len(body)
        return (body, len(body)) if time.monotonic() - since <= _KEPT_FOR else None


@dataclass
class _Account:
    """One account's waiting messages, its workers, the kept connections they share, and the
    reachability gate of the destination those connections go to (shared with other accounts)."""

    queue: _Waiting
    workers: list[asyncio.Task]
    connections: AccountPool
    settings: tuple  # what the connections are made from: a change means new workers
    reachability: Gate


@dataclass
class _Held:
    """A transaction's outcome the spool refused to record: kept until a retry gets it on disk."""

    message: QueuedMessage
    updates: list[RecipientUpdate]
    bounces: list[NewMessage]
    rows: OutcomeRows
    failures: int
    next_try: float  # time.monotonic()


class Scheduler:
    def __init__(
        self,
        config: Callable[[], Config],
        spool: Spool,
        connect: Connect = open_connection,
        suppressions: SuppressionCache | None = None,
        outcome_rows: Callable[[QueuedMessage, list[RecipientUpdate]], OutcomeRows] | None = None,
    ):
        self._config = config
        self._spool = spool
        self._connect = connect  # tests hand in a fake upstream
        self._suppressions = suppressions  # recipients suppressed for the routed channel fail at once
        self._outcome_rows = outcome_rows  # the events stage's rows for an outcome (statistics, the teams' fan-out)
        self._accounts: dict[str, _Account] = {}
        self._retiring: list[asyncio.Task] = []  # workers finishing their last transaction
        self.upstream_health = UpstreamHealth()
        self.throttles: dict[str, Gate] = {}  # SendCloud's limits, by account name: outlives a reconfigure
        self.reachability: dict[str, Gate] = {}  # the dead-destination gate, by throttle.destination()
        self._in_flight: set[str] = set()
        # Finished while a poll's read was under way: that read may show them stale.
        self._finished_during_poll: set[str] = set()
        self._held: dict[str, _Held] = {}  # by queue ID: outcomes known but not on disk
        self._kept = _KeptBodies()
        self._poller: asyncio.Task | None = None
        self._cursor: Cursor | None = None  # where the poller's walk of due mail resumes
        self._rewalk_at = 0.0  # time.monotonic() after which a walk that reached the end starts again
        self._ahead: set[str] = set()  # held messages a walk ahead took (relay/delivery/ahead.py)
        self._ahead_cursor: Cursor | None = None  # where the walk ahead under way resumes
        self._ahead_until: Cursor | None = None  # how far it reads; None: none under way
        self._ahead_again_at = 0.0  # time.monotonic() after which a finished walk ahead may start again
        self._stranded_at = 0.0  # time.monotonic() of the next look for mail of unconfigured accounts
        self._stopping = False
        # Several nodes on one spool: the messages in memory stay ours while their leases are renewed.
        self._leases = LeaseKeeper(spool, lambda: self._in_flight, lambda: self._config().spool.lease)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self.reconfigure(await asyncio.to_thread(upstream_tls, self._config()))
        self._poller = asyncio.create_task(self._poll(), name="queue-poller")
        self._leases.start()

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
        self._stranded_at = 0.0  # an account may have gone: look for its mail at the next poll
        for name, account in config.accounts.items():
            if name not in self.throttles:
                self.throttles[name] = Gate(f"account {name}", self._throttle_pauses)
            settings = (account, config.upstream, config.server.hostname)
            old = self._accounts.get(name)
            if old is not None and old.settings == settings:
                continue
            connections = AccountPool(
                config.upstream.connections_per_account,
                lambda key, account=account: self._connect(config.upstream, account, key, config.server.hostname, tls),
            )
            new = _Account(_Waiting(), [], connections, settings, self._reachability(config.upstream))
            new.workers = [
                asyncio.create_task(self._work(new), name=f"deliver-{name}-{number}")
                for number in range(config.upstream.connections_per_account)
            ]
            self._accounts[name] = new
            if old is not None:
                self._retire(old, new.queue)
                log.info("account %s: connection settings changed, new workers started", name)

    def _reachability(self, upstream: Upstream) -> Gate:
        """The gate of the destination ``upstream`` names, made at its first use: every account
        connecting there waits behind one probe (a dead upstream costs one connect per backoff,
        not one per account)."""
        where = destination(upstream)
        if where not in self.reachability:
            self.reachability[where] = Gate(f"upstream {where}", self._unreachable_backoffs,
                                            reason="is unreachable (connecting failed)", probe_first=True)
        return self.reachability[where]

    def _retire(self, account: _Account, successor: _Waiting | None) -> None:
        """Stop an account's workers after their current transaction, then close its
        connections; its waiting mail moves to ``successor`` or, with none, back to the spool."""
        for message, fresh in account.queue.take_all():
            if successor is not None:
                successor.put(message, fresh)
            else:
                self._let_go(message.id)
        account.queue.stop(len(account.workers))

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
        for gate in (*self.throttles.values(), *self.reachability.values()):
            gate.close()  # workers waiting out a paused account stop now, not after the grace
        if self._poller:
            self._poller.cancel()
        holding = set(self._in_flight)  # queued or in flight: given back once the workers are done
        for account in self._accounts.values():
            self._retire(account, None)
        if self._retiring:
            _, pending = await asyncio.wait(self._retiring, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._retiring, return_exceptions=True)
        for held in self._held.values():
            held.next_try = 0.0
        try:  # one last try, within the same grace: a stuck spool must not hold up the shutdown
            await asyncio.wait_for(self._record_held(), grace)
        except TimeoutError:
            pass
        if self._held:
            log.error("stopping with %d delivery outcome(s) not on disk: %s will be sent again after the restart",
                      len(self._held), ", ".join(self._held))
        await self._leases.stop(holding - set(self._held))

    # -- intake -----------------------------------------------------------------------------

    def submit(self, message: NewMessage) -> None:
        """Hand a just-spooled message to its account's workers without a poll; with the
        active queue full it stays in the spool, where the poller finds it when there is room."""
        if self.active() >= self._config().spool.active_limit:
            return
        recipients = [
            Recipient(message.id, idx, address, State.QUEUED, 0, message.received_at)
            for idx, address in enumerate(message.recipients)
        ]
        queued = QueuedMessage(
            message.id, message.received_at, message.user, message.listener, message.client,
            message.account, message.channel, message.sender, message.size, message.label,
            message.mail_from, message.eight_bit, recipients,
        )
        if self._enqueue(queued, fresh=True):
            self._kept.keep(message)

    def _enqueue(self, message: QueuedMessage, fresh: bool) -> bool:
        """Hold the message for its account's workers; False when it was held already or stays in the spool."""
        if self._stopping or message.id in self._in_flight or message.id in self._held:
            return False
        account = self._accounts.get(message.account)
        if account is None:  # removed meanwhile: the poller's stranded() finds it (_hold_stranded)
            return False
        self._in_flight.add(message.id)
        account.queue.put(message, fresh)  # carries only the recipients to try now
        return True

    def _let_go(self, message_id: str) -> None:
        """The message is no longer held in memory (delivered, given back to the spool); a body
        kept from its intake is forgotten too (not delivered: read again next time)."""
        self._in_flight.discard(message_id)
        self._ahead.discard(message_id)
        self._kept.take(message_id)

    async def _poll(self) -> None:
        last_purge = 0.0
        woken = False  # another process announced work at the last wait
        while True:
            try:
                if time.monotonic() - last_purge > _PURGE_EVERY:
                    last_purge = time.monotonic()
                    purged = await self._spool.purge_final(time.time() - self._config().spool.keep_final)
                    if purged:
                        log.info("forgot %d delivered or failed message(s) older than spool.keep_final", purged)
                await self._record_held()
                self._finished_during_poll.clear()
                await self._take_ahead(woken)
                await self._refill()
                if time.monotonic() >= self._stranded_at:  # a walk past all due mail: not at every poll
                    self._stranded_at = time.monotonic() + self._config().spool.retry[0]
                    await self._hold_stranded()
                self._report()
            except asyncio.CancelledError:
                raise
            except Exception:  # a spool hiccup must not stop scheduling
                log.exception("queue poll failed; trying again")
            woken = await self._spool.wait_for_work(self._config().spool.poll_interval)  # a release elsewhere wakes it

    async def _take_ahead(self, woken: bool) -> None:
        """Mail made due behind the walk's cursor, taken at this poll and handed to the workers
        with new mail (Postfix's ``postqueue -i``: to the incoming queue): `queue retry` and
        `queue flush` (at every poll, a page of :data:`PEEK` when there are none), and after a
        wake the messages another node gave back. It holds at most the quarter of the active
        queue that new mail keeps, so a flush of the whole backlog does not starve the walk."""
        config = self._config().spool
        until = ahead_until(self._cursor, woken)
        if self._ahead_until is None:  # none under way: start one, unless re-reading what it holds costs too much
            if not (woken or walk_again(len(self._ahead), _PAGE, time.monotonic(), self._ahead_again_at)):
                return
            self._ahead_cursor, self._ahead_until = None, until
        else:
            self._ahead_until = max(self._ahead_until, until)
        accounts = [name for name in self._accounts if not self._paused(name)]
        share = max(1, config.active_limit // _FRESH_SHARE)
        while (room := min(config.active_limit - self.active(), share - len(self._ahead))) > 0:
            asked = min(room, PEEK if self._ahead_cursor is None else _PAGE)
            page = await self._spool.due(time.time(), asked, accounts, after=self._ahead_cursor)
            keys = [due_key(message, self._ahead_cursor) for message in page]
            count, done = taken_ahead(keys, self._ahead_until, asked)
            for message in page[:count]:
                if message.id not in self._finished_during_poll and self._enqueue(message, fresh=True):
                    self._ahead.add(message.id)
            if done:
                self._ahead_until = None
                self._ahead_again_at = time.monotonic() + _REWALK_EVERY
                return
            self._ahead_cursor = keys[-1]

    async def _refill(self) -> None:
        """Read due mail into the active queue while it has room, a page at a time, each page
        resuming where the last one ended, so messages already in memory are walked past once
        rather than read again at every poll. Mail coming due later sorts after the end of the
        walk; what can sort before it (`queue retry`, a message whose delivery raised) is found
        by walking again from the earliest, which passes every message held in memory: at the
        end of a walk when few are held, else once per ``_REWALK_EVERY``. Accounts whose gate is
        paused (throttled, unreachable) are left out: their mail waits in the spool."""
        config = self._config().spool
        limit = config.active_limit - config.active_limit // _FRESH_SHARE
        accounts = [name for name in self._accounts if not self._paused(name)]
        while (room := limit - self.active()) > 0:
            wanted = min(room, _PAGE)
            page = await self._spool.due(time.time(), wanted, accounts, after=self._cursor)
            for message in page:
                if message.id not in self._finished_during_poll:
                    self._enqueue(message, fresh=False)
            if page:
                self._cursor = due_key(page[-1], self._cursor)
            if len(page) < wanted:  # the end of what is due now
                if walk_again(self.active(), _PAGE, time.monotonic(), self._rewalk_at):
                    self._cursor = None
                    self._rewalk_at = time.monotonic() + _REWALK_EVERY
                return

    def _paused(self, account: str) -> bool:
        return self.throttles[account].remaining() > 0 or self._accounts[account].reachability.remaining() > 0

    def _report(self) -> None:
        metrics.ACTIVE_MESSAGES.set(self.active())
        in_use = {id(account.reachability) for account in self._accounts.values()}
        for where, gate in self.reachability.items():  # one left behind by a reload reads 0, not its last state
            metrics.UPSTREAM_UNREACHABLE.labels(where).set(1 if gate.consecutive and id(gate) in in_use else 0)

    def active(self) -> int:
        """Messages held in memory: waiting for a worker of their account, or in one."""
        return len(self._in_flight)

    def unreachable_for(self) -> dict[str, float]:
        """Accounts whose upstream cannot be reached: seconds until the next probe (0: one is due or
        under way), the same for every account sending to that destination."""
        return {name: account.reachability.remaining() for name, account in self._accounts.items()
                if account.reachability.consecutive}

    async def _hold_stranded(self) -> None:
        """Mail of an account no longer configured: deferred with the reason (for `queue show`),
        retried on the schedule's first delay, failed with a DSN at ``max_lifetime``. Looked for
        after each reload and then once per that delay (the walk passes every due recipient of
        the configured accounts, about a second on a million of them)."""
        config = self._config()
        policy = _retry_policy(config)
        for message in await self._spool.stranded(time.time(), _PAGE, list(self._accounts)):
            if message.id in self._in_flight or message.id in self._held or message.id in self._finished_during_poll:
                continue  # a retiring worker has it, or its outcome is newer than this read
            now = time.time()
            updates = [
                while_unconfigured(recipient, message.account, message.received_at, now, policy)
                for recipient in message.recipients
            ]
            start = await self._spool.start(message.id) if any(u.state is State.FAILED for u in updates) else None
            bounces = self._bounces(message, updates, start[0] if start else b"", config)
            if self._fenced(message, await self._spool.record(updates, bounces, self._rows(message, updates))):
                continue
            log.warning("%s: account %s is not configured; %d recipient(s) %s", message.id, message.account,
                        len(updates), "failed at max_lifetime" if updates[0].state is State.FAILED else "wait")
            self._after_record(message, bounces)

    def _throttle_pauses(self) -> tuple[float, float]:
        upstream = self._config().upstream
        return upstream.throttle_pause, upstream.throttle_max_pause

    def _unreachable_backoffs(self) -> tuple[float, float]:
        upstream = self._config().upstream
        return upstream.unreachable_backoff, upstream.unreachable_max_backoff

    # -- workers ----------------------------------------------------------------------------

    async def _work(self, account: _Account) -> None:
        while True:
            message = await account.queue.get()
            if message is None:
                return
            try:
                if self._leases.may_start(message.id):
                    await self._deliver(message, account)
            except asyncio.CancelledError:
                raise
            except GateClosed:  # stopping while the account was paused: the message waits in the spool
                pass
            except Exception:  # the message stays pending and is retried
                log.exception("%s: delivery failed unexpectedly; will retry", message.id)
            finally:
                self._let_go(message.id)
                self._finished_during_poll.add(message.id)

    async def _deliver(self, message: QueuedMessage, account: _Account) -> None:
        """Each transaction streams the message from the spool in chunks; only its header
        section (which X-SMTPAPI splitting rewrites and a DSN quotes) is read whole.

        Each transaction's outcome is recorded before the next is sent, so a crash re-sends
        at most the transaction in flight; when recording fails, the rest of the message
        waits until the outcome is on disk (:meth:`_record`). Every recipient deferred in this
        delivery gets the same next attempt (:func:`message_retry_at`). When the account's
        gate closes on a transaction (SendCloud throttles it, the upstream cannot be reached),
        the message's other transactions are not sent: they get that answer, so the whole
        message comes back together.
        """
        kept = None if self._paused(message.account) else self._kept.take(message.id)  # a pause: read after it
        await self._gates_open(message.account, account.reachability)
        start = kept or await self._spool.start(message.id)
        if start is None:  # deleted with `queue delete`, or already final
            return
        first, size = start
        head_size = header_length(first) or len(first)
        head, rest = first[:head_size], first[head_size:]
        config = self._config()
        policy = _retry_policy(config)
        suppressed = self._suppressed(message)
        if suppressed:  # failed now with the reason, never sent upstream; their DSN as for any failure
            if not await self._record(message, suppressed, self._bounces_or_none(message, suppressed, head, config)):
                return
            failed_now = {update.idx for update in suppressed}
            message = dataclasses.replace(message, recipients=[r for r in message.recipients if r.idx not in failed_now])
        retry_at = message_retry_at([r.attempts + 1 for r in message.recipients], time.time(), message.received_at,
                                    policy, random.random())
        closed: SMTPReply | None = None  # the answer that closed the account's gate during this delivery
        held_until: float | None = None  # the account's pause, the same for every throttled recipient
        for chunk, key in _transactions(message, config, config.upstream.max_recipients_per_transaction):
            if closed is None:
                started = time.monotonic()
                result = await self._send(message, chunk, key, head, rest, len(first), size, account)
                metrics.UPSTREAM_SECONDS.labels(message.account).observe(time.monotonic() - started)
                log.debug("%s: transaction of %d took %.3fs", message.id, len(chunk), time.monotonic() - started)
                throttling = [reply for reply in result.replies if is_account_throttle(reply)]
                if throttling:
                    held_until = time.time() + self.throttles[message.account].remaining()
                    closed = throttling[0]
                elif result.unreachable:
                    closed = SMTPReply(None, None, f"delivery temporarily suspended: {result.replies[0]}")
            else:  # not sent: the gate closed on an earlier transaction of this message
                result = Result([closed] * len(chunk), None, result.relay)
            updates = self._outcomes(message, chunk, result, policy, retry_at, held_until)
            if not await self._record(message, updates, self._bounces_or_none(message, updates, head, config)):
                return

    async def _gates_open(self, account: str, reachability: Gate) -> None:
        """Wait out the pauses (the account throttled, its upstream unreachable) before reading a message, not
        after: a message deleted meanwhile (`queue delete`, on any node) is then seen as gone
        instead of being sent from a copy read before the wait. What remains is the wait for a
        probe under way, at most one connect (upstream.timeout). :class:`GateClosed` when the
        relay stops meanwhile (a pause of minutes must not hold up the shutdown)."""
        await self.throttles[account].paused_out()
        await reachability.paused_out()

    async def _send(self, message: QueuedMessage, chunk: list[Recipient], key: Key, head: bytes, rest: bytes,
                    offset: int, size: int, account: _Account) -> Result:
        """One transaction, through two gates: while the upstream is unreachable only one probe
        connects (the workers of every account sending there wait, no connect timeout each), and
        while SendCloud has asked the account to slow down only one probe of it sends."""
        addresses = [recipient.address for recipient in chunk]
        reachability, throttle, pool = account.reachability, self.throttles[message.account], account.connections
        connect_probe = await reachability.acquire()
        unreachable = False
        try:  # from here on each probe must be given back, whatever fails
            probe = await throttle.acquire()
            throttled = False
            try:
                sent_head = for_transaction(head, addresses)  # X-SMTPAPI "to" may name only these recipients
                text = self._text(message.id, sent_head, rest, offset, size)
                connection = await pool.acquire(key)
                try:
                    with metrics.UPSTREAM_IN_USE.labels(message.account).track_inprogress():
                        result = await connection.send(Transaction(
                            message.id, message.upstream_sender, addresses,
                            size - len(head) + len(sent_head), message.eight_bit, text,
                        ))
                finally:
                    pool.release(connection)
                throttled = any(is_account_throttle(reply) for reply in result.replies)
                unreachable = result.unreachable
            finally:
                throttle.release(probe, throttled)
        finally:
            reachability.release(connect_probe, unreachable)
        return result

    def _bounces_or_none(self, message: QueuedMessage, updates: list[RecipientUpdate], head: bytes,
                         config: Config) -> list[NewMessage]:
        """The DSNs for these outcomes; none, logged, if one cannot be made: the outcome is
        known and must be recorded all the same, or the message would be sent again."""
        try:
            return self._bounces(message, updates, head, config)
        except Exception:  # see above
            log.exception("%s: could not make the DSN; the failures are recorded without one", message.id)
            return []

    def _outcomes(self, message: QueuedMessage, chunk: list[Recipient], result: Result, policy: RetryPolicy,
                  retry_at: float, held_until: float | None) -> list[RecipientUpdate]:
        """Each recipient's next state after one transaction, logged and counted."""
        now = time.time()
        failing_since = self.upstream_health.record(message.account, attempt_failed(result.replies), now)
        metrics.UPSTREAM_FAILING_SINCE.labels(message.account).set(failing_since or 0)
        addresses = [recipient.address for recipient in chunk]
        ids = email_ids(result.upstream_id, addresses) if result.upstream_id else [None] * len(chunk)
        updates = []
        for recipient, reply, email_id in zip(chunk, result.replies, ids, strict=True):
            update = after_attempt(
                recipient, reply, message.received_at, now, policy, retry_at, email_id,
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
        return updates

    # -- recording outcomes ---------------------------------------------------------------------

    async def _record(self, message: QueuedMessage, updates: list[RecipientUpdate], bounces: list[NewMessage]) -> bool:
        """Record known outcomes; if the spool refuses (disk full, I/O error), hold them.

        A held message is never handed to a worker again (the upstream already has it): the
        poller retries the record with backoff (:meth:`_record_held`) and only then may the
        message's other recipients go. Returns whether the outcome is on disk and the message
        still this node's (not fenced: see :meth:`_fenced`), that is whether its delivery goes on.
        """
        rows = self._rows(message, updates)
        try:
            fenced = await self._spool.record(updates, bounces, rows)
        except Exception as error:  # noqa: BLE001 - whatever the spool says, the outcome is known
            self._held[message.id] = _Held(message, updates, bounces, rows, 1, time.monotonic() + self._record_backoff(1))
            log.error("%s: could not record the delivery outcome (%s); holding it in memory and retrying; "
                      "the message is not sent again", message.id, error)
            return False
        if self._fenced(message, fenced):
            return False
        self._after_record(message, bounces)
        return True

    def _rows(self, message: QueuedMessage, updates: list[RecipientUpdate]) -> OutcomeRows:
        """The events stage's rows for these outcomes, recorded with them; none, logged, if they
        cannot be made: a lost count must not keep a known outcome off the disk."""
        if self._outcome_rows is None:
            return NO_ROWS
        try:
            return self._outcome_rows(message, updates)
        except Exception:  # see above
            log.exception("%s: could not count or fan out %d outcome(s)", message.id, len(updates))
            return NO_ROWS

    @staticmethod
    def _fenced(message: QueuedMessage, fenced: set[str]) -> bool:
        """Whether the spool refused this message's outcome: another node took it over while it was
        sent here (this node stalled past spool.lease), and that node's outcome is the one kept."""
        if message.id not in fenced:
            return False
        metrics.SPOOL_FENCED.inc()
        log.warning("%s: outcome not recorded: another node holds this message's lease now (it may be sent twice)",
                    message.id)
        return True

    async def _record_held(self) -> None:
        """Retry the records of held outcomes whose backoff has passed."""
        for message_id, held in list(self._held.items()):
            if held.next_try > time.monotonic():
                continue
            try:
                # A record that timed out may have committed after all: its DSN is then there.
                landed = bool(held.bounces) and await self._spool.get(held.bounces[0].id) is not None
                fenced = set() if landed else await self._spool.record(held.updates, held.bounces, held.rows)
            except Exception as error:  # noqa: BLE001 - still not on disk: keep holding
                held.failures += 1
                held.next_try = time.monotonic() + self._record_backoff(held.failures)
                log.warning("%s: recording the delivery outcome failed again (%s); retry %d in %.1fs",
                            message_id, error, held.failures, held.next_try - time.monotonic())
                continue
            del self._held[message_id]
            if self._fenced(held.message, fenced):
                continue
            log.info("%s: delivery outcome recorded after %d failed attempt(s)", message_id, held.failures)
            self._after_record(held.message, [] if landed else held.bounces)

    def held_outcomes(self) -> list[str]:
        """Messages whose delivery outcome is known but not yet on disk."""
        return list(self._held)

    def _record_backoff(self, failures: int) -> float:
        return pause_length(failures, self._config().spool.poll_interval, _MAX_RECORD_BACKOFF)

    def _after_record(self, message: QueuedMessage, bounces: list[NewMessage]) -> None:
        """Outcomes on disk: their DSNs go to delivery (a DSN that landed with a record that
        timed out is found by the poller instead)."""
        for bounce in bounces:
            log.info("%s: sender non-delivery notification: %s", message.id, bounce.id)
            self.submit(bounce)

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
        via = _dsn_account(config, message)
        account = config.accounts.get(via)
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
                new_queue_id(now), now, message.user, "bounce", "local", via,
                config.accounts[via].type if account else message.channel, "", [message.sender], dsn,
            )
        ]


def _retry_policy(config: Config) -> RetryPolicy:
    return RetryPolicy(tuple(config.spool.retry), config.spool.retry_jitter, config.spool.max_lifetime)


def _dsn_account(config: Config, message: QueuedMessage) -> str:
    """The account a DSN goes through: the message's own, else (removed from the config) the
    account its user's channel maps to now, else any configured one."""
    if message.account in config.accounts or not config.accounts:
        return message.account
    user = config.users.get(message.user)
    channels = user.channels if user is not None else {}
    for name in (channels.get(message.channel), *channels.values()):
        if name in config.accounts:
            return name
    return next(iter(config.accounts))


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
