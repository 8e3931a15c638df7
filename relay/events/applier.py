"""Applying a stored webhook event: what it changes, decided purely, then written at once.

The receiver stores an event and answers SendCloud before anything here runs; the
:class:`Applier` then works through stored events one at a time (so "the first open of this
recipient" is never decided twice concurrently) and, on start, through those a crash left
unapplied. :func:`decide` is the whole decision: status, history, suppression, counters and
the team's outbox row, from the event, its recipient and what the spool knew of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping

from relay.config import Config
from relay.events import fanout, stats
from relay.events.status import status_after
from relay.events.suppression import from_event
from relay.events.webhook import WebhookEvent, relay_ids, to_event
from relay.observe import metrics
from relay.spool import QueuedMessage, RecipientUpdate, Spool, State
from relay.spool.events_model import Applied, EventTarget, Fate, OutboxRow, RecipientEvent, StatRow

log = logging.getLogger("relay.events")

_BATCH = 500  # events decided and written together (also: unapplied ones read per step)
_RETRY_AFTER = 5.0  # seconds before events whose write failed are read back from the spool
# Seconds between looks at the spool for events stored but not applied by anyone: with several
# nodes, those a node received and died before applying (their claim lapses, then any node may).
_BACKLOG_EVERY = 60.0


def account_of(config: Config, api_user: str | None) -> str | None:
    """The configured account whose API_USER sent the event (``apiUser``), if any."""
    if api_user is None:
        return None
    return next((name for name, account in config.accounts.items() if account.api_user == api_user), None)


def stat_rows(counts: Mapping[str, int], dimensions: Mapping[str, str], hour: str) -> list[StatRow]:
    """One counter row per group and counter: every group partitions all the mail (see stats)."""
    return [
        (hour, group, value, counter, count) for group, value in dimensions.items() for counter, count in counts.items()
    ]


def requested_rows(
    user: str, account: str, channel: str, label: int | None, addresses: Iterable[str], at: float
) -> list[StatRow]:
    """The ``requested`` counters for recipients SendCloud accepted at the final dot."""
    hour = stats.hour_bucket(at)
    rows: list[StatRow] = []
    for address in addresses:
        rows += stat_rows(stats.accepted(1), stats.dimensions(user, account, channel, label, address), hour)
    return rows


def history_entry(event: WebhookEvent, at: float) -> RecipientEvent:
    details = event.details
    return RecipientEvent(
        event.event,
        at,
        ip=details.get("ip") or details.get("outIp") or None,
        url=details.get("url") or None,
        sub_stat=details.get("subStat") or None,
        sub_stat_desc=details.get("subStatDesc") or None,
    )


def decide(
    config: Config, event_id: int, event: WebhookEvent, target: EventTarget | None, fate: Fate | None, now: float
) -> Applied:
    """Everything one known event changes.

    ``target`` None (a message the relay does not know, or purged) still feeds the suppression
    list: SendCloud says the address is invalid or asked not to be mailed, whoever sent to
    it. The event's own time dates the history, the status, the counters and the entry; an
    event without a usable time never gets this far (it is stale).
    """
    at = event.time if event.time is not None else now
    account = target.account if target else account_of(config, event.api_user)
    address = target.address if target else event.recipient
    entry = from_event(address, event.event, account, at, config.events.suppress) if address else None
    suppression = None
    if entry is not None:
        suppression = (
            entry.address,
            entry.reason,
            entry.channels,
            entry.account,
            entry.added_at,
            entry.expires_at,
            entry.source,
        )
    if target is None:
        return Applied(event_id, suppression=suppression)
    fate = fate or Fate()
    status, status_time = status_after(fate.status, fate.status_time, event.event, at)
    first_of_kind = all(seen.event != event.event for seen in fate.events)
    counts = stats.increments(event.event, first_of_kind)
    dimensions = stats.dimensions(target.user, target.account, target.channel, target.label, target.address)
    return Applied(
        event_id,
        target,
        status,
        status_time,
        history_entry(event, at),
        suppression,
        tuple(stat_rows(counts, dimensions, stats.hour_bucket(at))),
        _outbox(config, event_id, event, target, now),
    )


def _outbox(
    config: Config, event_id: int, event: WebhookEvent, target: EventTarget, now: float
) -> tuple[OutboxRow, ...]:
    user = config.users.get(target.user)
    if user is None or user.events_url is None:
        return ()
    details = {key: value for key, value in event.details.items() if key not in ("raw_message", "html", "text")}
    body = fanout.payload(
        f"sc-{event_id}",
        event.event,
        target.message_id,
        target.address,
        target.user,
        target.account,
        target.channel,
        target.label,
        event.timestamp_raw,
        event.email_id,
        details,
    )
    return (OutboxRow(target.user, user.events_url, body, now, now),)


def failed_outbox(config: Config, message: QueuedMessage, update: RecipientUpdate, now: float) -> OutboxRow | None:
    """The ``failed`` event a team hears when the relay itself gives up on a recipient
    (suppressed, refused upstream, expired): SendCloud never saw it, so no webhook will say it."""
    user = config.users.get(message.user)
    if user is None or user.events_url is None or update.state is not State.FAILED:
        return None
    address = next((r.address for r in message.recipients if r.idx == update.idx), None)
    body = fanout.payload(
        f"failed-{message.id}-{update.idx}",
        "failed",
        message.id,
        address,
        message.user,
        message.account,
        message.channel,
        message.label,
        int(now * 1000),
        None,
        {"reply": update.last_reply, "status": update.dsn_status},
    )
    return OutboxRow(message.user, user.events_url, body, now, now)


class Applier:
    """Applies stored events in order, off the receiver's answer path.

    Whatever queued up while the last batch was written is decided next, one event after
    the other against a view of the recipients that already includes the batch's earlier
    events (so "the first open" stays exact), and written as concurrent writes that share
    one group commit: a burst costs one fsync per batch, not per event.
    """

    def __init__(self, config: Callable[[], Config], spool: Spool):
        self._config = config
        self._spool = spool
        self._queue: asyncio.Queue[tuple[int, WebhookEvent]] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        # Applied from the spool at start: the receiver may have queued some of them meanwhile.
        self._backlogged: set[int] = set()

    def submit(self, event_id: int, event: WebhookEvent) -> None:
        self._queue.put_nowait((event_id, event))

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="events-applier")

    async def stop(self) -> None:
        """Stop after the batch in hand; events still queued are stored and applied on next start."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def idle(self) -> None:
        """Wait until every submitted event is applied (for tests and an orderly stop)."""
        await self._queue.join()

    async def _run(self) -> None:
        await self._backlog()
        next_look = time.monotonic() + _BACKLOG_EVERY
        while True:
            try:
                first = await asyncio.wait_for(self._queue.get(), max(next_look - time.monotonic(), 0))
            except TimeoutError:
                next_look = time.monotonic() + _BACKLOG_EVERY
                try:
                    await self._backlog()
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - the next look reads them again
                    log.exception("stored events could not be applied; looking again in %.0fs", _BACKLOG_EVERY)
                continue
            batch = [first]
            while len(batch) < _BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self.apply([item for item in batch if item[0] not in self._backlogged])
                failed = False
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - they stay unapplied in the spool and are read back from it
                log.exception("%d event(s) could not be applied; trying again in %.0fs", len(batch), _RETRY_AFTER)
                failed = True
            finally:
                for _ in batch:
                    self._queue.task_done()
            if failed:
                await self._retry_from_spool()

    async def _retry_from_spool(self) -> None:
        """Until a pass over the spool's unapplied events succeeds (new ones are stored meanwhile)."""
        while True:
            await asyncio.sleep(_RETRY_AFTER)
            try:
                await self._backlog()
                return
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the spool still fails: wait and read again
                log.exception("stored events could not be applied; trying again in %.0fs", _RETRY_AFTER)

    async def _backlog(self) -> None:
        """Events stored but not applied (a crash, a failed write): applied from the spool."""
        seen: set[int] = set()
        while pending := [e for e in await self._spool.unapplied_events(_BATCH) if e.id not in seen]:
            seen.update(e.id for e in pending)
            self._backlogged.update(e.id for e in pending)  # some may be queued too: applied once
            await self.apply([(e.id, to_event(json.loads(e.fields))) for e in pending])
        if seen:
            log.info("applied %d stored event(s) from the spool", len(seen))

    async def apply(self, batch: list[tuple[int, WebhookEvent]]) -> None:
        """Decide and write a batch; raises (after writing the rest) if a write failed.

        An event whose decision fails (a bug, a spool read error) is left unapplied and logged,
        so one bad event never holds up the others; it is tried again from the spool later.
        """
        if not batch:
            return
        config = self._config()
        now = time.time()
        seen: dict[tuple[str, int], Fate] = {}  # the batch's own effects, ahead of the spool
        decided: list[tuple[WebhookEvent, Applied]] = []
        for event_id, event in batch:
            try:
                decided += [(event, applied) for applied in await self._decide(config, event_id, event, seen, now)]
            except Exception:  # noqa: BLE001 - see above
                log.exception("event %d (%s) could not be decided; it stays stored, unapplied", event_id, event.event)
        written = await asyncio.gather(
            *(self._spool.apply_event(applied) for _, applied in decided), return_exceptions=True
        )
        for (event, applied), outcome in zip(decided, written, strict=True):
            if not isinstance(outcome, BaseException):
                self._report(config, event, applied)
        failures = [outcome for outcome in written if isinstance(outcome, BaseException)]
        if failures:
            raise failures[0]

    async def _decide(
        self, config: Config, event_id: int, event: WebhookEvent, seen: dict[tuple[str, int], Fate], now: float
    ) -> list[Applied]:
        if not event.known:
            log.warning("event %d: SendCloud event %r is not documented; kept, not applied", event_id, event.event_raw)
            return [Applied(event_id)]
        queue_id, _ = relay_ids(event)
        decided = []
        for email_id in event.all_email_ids or (None,):  # a request event names every recipient of the message
            target = await self._spool.event_target(email_id, queue_id, event.recipient)
            fate = None
            if target is not None:
                key = (target.message_id, target.idx)
                fate = seen[key] if key in seen else (await self._spool.fates(*key)).get(target.idx)
            applied = decide(config, event_id, event, target, fate, now)
            if target is not None:
                seen[key] = Fate(applied.status, applied.status_time, (*(fate.events if fate else ()), applied.history))
            decided.append(applied)
        return decided

    def _report(self, config: Config, event: WebhookEvent, applied: Applied) -> None:
        target = applied.target
        if not event.known:
            return
        account = target.account if target else account_of(config, event.api_user)
        metrics.event_applied(event.event, account, target is not None)
        if target is None:
            log.info(
                "event %d: %s for %s matches no message the relay knows",
                applied.event_id,
                event.event,
                event.recipient or event.email_id or "-",
            )
            return
        suppressed = f", suppressed for {','.join(sorted(applied.suppression[2]))}" if applied.suppression else ""
        log.info("%s: to=<%s>, sendcloud=%s%s", target.message_id, target.address, event.event, suppressed)
