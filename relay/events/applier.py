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

_BACKLOG_BATCH = 500  # unapplied events read per step on start


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
    """Applies stored events in order, one at a time, off the receiver's answer path."""

    def __init__(self, config: Callable[[], Config], spool: Spool):
        self._config = config
        self._spool = spool
        self._queue: asyncio.Queue[tuple[int, WebhookEvent]] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def submit(self, event_id: int, event: WebhookEvent) -> None:
        self._queue.put_nowait((event_id, event))

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="events-applier")

    async def stop(self) -> None:
        """Stop after the event in hand; the ones still queued are stored and applied on next start."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def idle(self) -> None:
        """Wait until every submitted event is applied (for tests and an orderly stop)."""
        await self._queue.join()

    async def _run(self) -> None:
        await self._backlog()
        while True:
            event_id, event = await self._queue.get()
            try:
                await self.apply(event_id, event)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - stays unapplied in the spool: retried on the next start
                log.exception(
                    "event %d (%s) could not be applied; it is retried at the next start", event_id, event.event
                )
            finally:
                self._queue.task_done()

    async def _backlog(self) -> None:
        """Events a crash left stored but unapplied: queued before anything new."""
        pending = await self._spool.unapplied_events(_BACKLOG_BATCH)
        seen: set[int] = set()
        while pending:
            for stored in pending:
                if stored.id not in seen:
                    seen.add(stored.id)
                    await self.apply(stored.id, to_event(json.loads(stored.fields)))
            pending = [e for e in await self._spool.unapplied_events(_BACKLOG_BATCH) if e.id not in seen]
        if seen:
            log.info("applied %d event(s) stored before the last stop", len(seen))

    async def apply(self, event_id: int, event: WebhookEvent) -> None:
        config = self._config()
        if not event.known:
            log.warning("event %d: SendCloud event %r is not documented; kept, not applied", event_id, event.event_raw)
            await self._spool.apply_event(Applied(event_id))
            return
        queue_id, _ = relay_ids(event)
        email_ids = event.all_email_ids or (None,)
        for email_id in email_ids:  # a request event names every recipient of the message
            target = await self._spool.event_target(email_id, queue_id, event.recipient)
            fate = (await self._spool.fates(target.message_id)).get(target.idx) if target else None
            applied = decide(config, event_id, event, target, fate, time.time())
            await self._spool.apply_event(applied)
            account = target.account if target else account_of(config, event.api_user)
            metrics.event_applied(event.event, account, target is not None)
            if target is None:
                log.info(
                    "event %d: %s for %s (emailId %s) matches no message the relay knows",
                    event_id,
                    event.event,
                    event.recipient or "-",
                    email_id or "-",
                )
            else:
                log.info(
                    "%s: to=<%s>, sendcloud=%s%s",
                    target.message_id,
                    target.address,
                    event.event,
                    f", suppressed for {','.join(sorted(applied.suppression[2]))}" if applied.suppression else "",
                )
