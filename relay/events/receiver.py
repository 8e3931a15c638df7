"""The webhook receiver: ``/webhooks/sendcloud`` on ``events.listen`` (aiohttp).

SendCloud gives up on an answer after 3 s and retries, so the answer path is short: read,
check (signature with the account's APP KEY, age), store durably in one group-committed
write (which also recognises a redelivery by its dedupe keys), answer 200; the
:class:`~relay.events.applier.Applier` applies afterwards. Nothing unsigned or stale is ever
stored, and no answer says more than the status: a caller without the key learns nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from aiohttp import web

from relay.config import Config
from relay.events.applier import Applier, account_of
from relay.events.webhook import (
    WebhookEvent,
    dedupe_keys,
    is_probe,
    is_stale,
    parse_webhook,
    signature_ok,
    to_event,
)
from relay.observe import metrics
from relay.sockets import Site
from relay.spool import Spool
from relay.spool.events_model import ReceivedEvent

log = logging.getLogger("relay.events")

PATH = "/webhooks/sendcloud"
_MAX_BODY = (
    32 * 1024 * 1024
)  # a route event carries the whole reply (raw_message); SendCloud's limit is 16 MB + encoding


def app_key_for(config: Config, api_user: str | None) -> str | None:
    """The APP KEY that must have signed an event of ``api_user``: its account's, else events.app_key."""
    name = account_of(config, api_user)
    account = config.accounts.get(name) if name else None
    key = (account.app_key if account and account.app_key else None) or config.events.app_key
    return key.get_secret_value() if key is not None else None


def refusal(config: Config, event: WebhookEvent, now: float) -> str | None:
    """Why a (non-probe) event is refused with 403, or None: bad or missing signature, stale."""
    key = app_key_for(config, event.api_user)
    if key is None or not signature_ok(key, event.timestamp_raw, event.token, event.signature):
        return "signature"
    if is_stale(event.time, now, config.events.max_age):
        return "stale"
    return None


class Receiver:
    def __init__(self, config: Callable[[], Config], spool: Spool, applier: Applier):
        self._config = config
        self._spool = spool
        self._applier = applier
        self._site = Site("events")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=_MAX_BODY)
        app.router.add_get(PATH, self.probe)
        app.router.add_post(PATH, self.webhook)
        return app

    async def bind(self) -> None:
        """Bind ``events.listen`` (if set) and load ``events.tls`` before anything serves: a port in
        use or a certificate that does not load stops the start (an OSError naming it)."""
        config = self._config()
        await self._site.bind(config.events.listen, config.events.tls, config.server.hostname)

    async def serve(self) -> None:
        if await self._site.serve(self.app()):
            log.info("SendCloud webhook receiver on %s://%s%s", self._site.scheme, self._config().events.listen, PATH)

    async def stop(self, grace: float = 0) -> None:
        await self._site.stop()

    async def probe(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def webhook(self, request: web.Request) -> web.Response:
        fields = parse_webhook(await request.read(), request.headers.get("Content-Type", ""))
        if fields is None:
            metrics.EVENTS_REFUSED.labels("unreadable").inc()
            return web.Response(status=400, text="not a webhook body\n")
        if is_probe(fields):
            return web.Response(text="ok\n")
        now = time.time()
        config = self._config()
        event = to_event(fields)
        why = refusal(config, event, now)
        if why is not None:
            metrics.EVENTS_REFUSED.labels(why).inc()
            log.warning(
                "webhook from %s refused (%s): event=%s apiUser=%s timestamp=%s",
                request.remote,
                why,
                event.event or "-",
                event.api_user or "-",
                event.timestamp_raw or "-",
            )
            return web.Response(status=403, text="forbidden\n")
        kept = {key: value for key, value in fields.items() if key != "signature"}
        stored = ReceivedEvent(now, event.event, json.dumps(kept, ensure_ascii=False), dedupe_keys(event))
        try:
            event_id = await self._spool.store_event(stored)
        except Exception:  # noqa: BLE001 - not stored: a 5xx makes SendCloud send it again
            log.exception("could not store a %s event; SendCloud will retry it", event.event)
            return web.Response(status=503, text="try again\n")
        if event_id is None:
            metrics.EVENTS_DUPLICATE.inc()
            return web.Response(text="duplicate\n")
        self._applier.submit(event_id, event)
        return web.Response(text="ok\n")
