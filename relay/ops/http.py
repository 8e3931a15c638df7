"""The admin HTTP endpoint (``admin.listen``, loopback by default), served by aiohttp.

| path | what | token |
| --- | --- | --- |
| ``GET /healthz`` | 200 while the process and its event loop answer (liveness) | never |
| ``GET /readyz`` | 200, or 503 with the reasons: spool write, workers, upstream (readiness) | never |
| ``GET /metrics`` | Prometheus text format | if set |
| ``GET /api/queue[?all=1&user=&to=&sender=&state=&since=&before=&limit=&after=]`` | `queue list --json`, paged | if set |
| ``GET /api/queue/ID`` | `queue show ID` as JSON | if set |
| ``POST /api/reload`` | reload the config now; the answer says whether it was taken | if set |
| ``GET /api/stats[?since=7d&until=DATE&by=day&group=user]`` | `stats --json` | if set |
| ``GET /api/suppressions`` | `suppression list --json` | if set |
| ``POST /api/suppressions`` | add: ``{"address", "reason"?, "account"?, "expires"?}`` | if set |
| ``DELETE /api/suppressions/ADDRESS[?account=A]`` | remove (every entry of the address without account) | if set |

The dashboard (``relay/ops/dashboard``) is mounted at ``/`` beside these: its pages take a
signed-in session, never the token; the token guards ``/metrics`` and ``/api/*`` only.

It runs on the relay's own event loop, so a wedged loop fails ``/healthz`` as it should.
The probes never need the token, so Kubernetes and Docker can call them without a secret;
what they reveal is "ok" or which part is failing.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from relay.config import Config, split_host_port
from relay.observe import metrics
from relay.observe.health import readiness_problems
from relay.ops import events_view, queue_view
from relay.ops.dashboard import Dashboard
from relay.policy.suppression import normalise_address
from relay.sockets import Site
from relay.spool import Spool

log = logging.getLogger("relay.admin")

_PROBE_TIMEOUT = 5.0  # a spool write slower than this counts as failing
_PROBE_REUSE = 1.0  # seconds a spool probe's result answers further /readyz calls
_QUEUE_PAGE = 1000  # /api/queue without a limit: one page, and the cursor to the next


@dataclass(frozen=True)
class AdminBackend:
    """What the admin endpoint may see and do of the running relay, and nothing more."""

    config: Callable[[], Config]
    spool: Spool
    stopping: Callable[[], bool]  # shutting down: /readyz says so
    dead_workers: Callable[[], list[str]]  # delivery tasks that ended while they should run
    failing_since: Callable[[], Mapping[str, float]]  # per account: since when the upstream fails
    reload: Callable[[], Awaitable[tuple[str | None, list[str]]]]  # (why refused, or None; restart needed)
    config_path: Path | None = None  # the file reloads read (None: the embedded demo)
    paused_for: Callable[[], Mapping[str, float]] = dict  # per account: seconds SendCloud's throttle still holds it
    unreachable_for: Callable[[], Mapping[str, float]] = dict  # per account whose upstream is unreachable: seconds to its next probe


class AdminServer:
    def __init__(self, relay: AdminBackend):
        self.relay = relay
        self._site = Site("admin")
        self._probe: asyncio.Task | None = None
        self._probe_done_at = 0.0

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._token_check])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/api/queue", self.queue_list)
        app.router.add_get("/api/queue/{id}", self.queue_show)
        app.router.add_post("/api/reload", self.reload)
        app.router.add_get("/api/stats", self.stats)
        app.router.add_get("/api/suppressions", self.suppressions)
        app.router.add_post("/api/suppressions", self.suppression_add)
        app.router.add_delete("/api/suppressions/{address}", self.suppression_remove)
        Dashboard(self.relay).add_routes(app)
        return app

    async def bind(self) -> None:
        """Bind ``admin.listen`` (if on) without serving yet; OSError names the address that failed."""
        config = self.relay.config()
        await self._site.bind(config.admin.listen, None, config.server.hostname)

    async def serve(self) -> None:
        if not await self._site.serve(self._app()):
            return
        listen = self.relay.config().admin.listen
        log.info("admin endpoint on http://%s/ (/metrics, /healthz, /readyz, /api/queue, /api/reload)", listen)
        if self.relay.config().admin.token is None and split_host_port(listen)[0] not in ("127.0.0.1", "::1", "localhost"):
            log.warning("admin endpoint on %s has no admin.token: anyone who reaches it can read the queue", listen)

    async def stop(self, grace: float = 0) -> None:
        await self._site.stop()

    @web.middleware
    async def _token_check(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        token = self.relay.config().admin.token
        if token is not None and (request.path == "/metrics" or request.path.startswith("/api/")):
            expected = f"Bearer {token.get_secret_value()}".encode()
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return web.json_response({"error": "a valid bearer token is required"}, status=401,
                                         headers={"WWW-Authenticate": 'Bearer realm="sendcloud-relay"'})
        return await handler(request)

    # -- probes -----------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        relay = self.relay
        if relay.stopping():
            return web.Response(status=503, text="not ready\nshutting down\n")
        problems = readiness_problems(
            await self._spool_error(),
            relay.dead_workers(),
            relay.failing_since(),
            relay.config().admin.upstream_unready_after,
            time.time(),
        )
        if problems:
            return web.Response(status=503, text="not ready\n" + "".join(f"{p}\n" for p in problems))
        return web.Response(text="ready\n")

    async def _spool_error(self) -> str | None:
        """Whether a real spool write (committed and fsynced) works now.

        Concurrent or back-to-back probes share one write, so a load balancer polling from
        many nodes costs at most one fsync a second.
        """
        known = self.relay.spool.unavailable()
        if known is not None:
            return known
        if self._probe is None or (self._probe.done() and time.monotonic() - self._probe_done_at > _PROBE_REUSE):
            self._probe = asyncio.create_task(self._probe_spool())
        return await asyncio.shield(self._probe)

    async def _probe_spool(self) -> str | None:
        try:
            await asyncio.wait_for(self.relay.spool.probe(time.time()), _PROBE_TIMEOUT)
            return None
        except asyncio.TimeoutError:
            return f"a write did not complete within {_PROBE_TIMEOUT:.0f}s"
        except Exception as error:  # noqa: BLE001 - any failure is the answer
            return f"write failed: {error}"
        finally:
            self._probe_done_at = time.monotonic()

    # -- metrics and queue ------------------------------------------------------------------

    async def metrics(self, request: web.Request) -> web.Response:
        messages, by_state, oldest = await self.relay.spool.pending_summary()
        metrics.QUEUE_MESSAGES.set(messages)
        for state in ("queued", "deferred"):
            metrics.QUEUE_RECIPIENTS.labels(state).set(by_state.get(state, 0))
        metrics.QUEUE_OLDEST_SECONDS.set(max(0.0, time.time() - oldest) if oldest else 0)
        body = await asyncio.to_thread(metrics.exposition)  # with acceptors: reads their files
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def queue_list(self, request: web.Request) -> web.Response:
        """`queue list --json`: the same filters as query parameters, a page of at most ``limit``."""
        parameters = request.query
        now = time.time()
        try:
            query = queue_view.list_query(
                include_final=parameters.get("all", "") not in ("", "0", "false", "no"),
                user=parameters.get("user"), to=parameters.get("to"), state=parameters.get("state"),
                since=parameters.get("since"), before=parameters.get("before"), sender=parameters.get("sender"),
                status=parameters.get("status"), email_id=parameters.get("email_id"), after=parameters.get("after"),
                limit=parameters.get("limit", _QUEUE_PAGE), now=now,
            )
        except ValueError as error:
            return web.json_response({"error": str(error)}, status=400)
        messages, more_after = queue_view.page(await self.relay.spool.list(query), query)
        return web.json_response({"messages": [queue_view.list_record(m, now) for m in messages],
                                  "count": len(messages), "next_after": more_after})

    async def queue_show(self, request: web.Request) -> web.Response:
        message = await self.relay.spool.get(request.match_info["id"])
        if message is None:
            return web.json_response({"error": "no such message"}, status=404)
        fates = await self.relay.spool.fates(message.id)
        return web.json_response(queue_view.show_record(message, time.time(), fates))

    async def reload(self, request: web.Request) -> web.Response:
        error, restart_needed = await self.relay.reload()
        # Which relay this is, so `sendcloud-relay reload` can say whether it reached the one meant.
        identity = {"hostname": socket.gethostname(), "pid": os.getpid(),
                    "config": str(self.relay.config_path) if self.relay.config_path else None}
        if error is not None:
            return web.json_response({"reloaded": False, "error": error} | identity, status=422)
        return web.json_response({"reloaded": True, "restart_needed": restart_needed} | identity)

    # -- statistics and the suppression list (the same queries as `stats` and `suppression`) --

    async def stats(self, request: web.Request) -> web.Response:
        query = request.query
        try:
            rows = await events_view.stats_rows(self.relay.spool, query.get("since", "7d"), query.get("until"),
                                                query.get("by", "day"), query.get("group"), time.time())
        except ValueError as error:
            return web.json_response({"error": str(error)}, status=400)
        return web.json_response({"rows": rows})

    async def suppressions(self, request: web.Request) -> web.Response:
        found = await events_view.entries(self.relay.spool, time.time())
        return web.json_response([events_view.entry_record(entry) for entry in found])

    async def suppression_add(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("address"), str):
            return web.json_response({"error": 'a JSON object with "address" is required'}, status=400)
        try:
            entry = events_view.manual_entry(body["address"], body.get("reason"), body.get("account"),
                                             body.get("expires"), time.time())
        except ValueError as error:
            return web.json_response({"error": str(error)}, status=400)
        await self.relay.spool.add_suppressions([events_view.entry_row(entry)])
        log.info("suppression: %s added by the admin API (%s)", entry.address, entry.reason)
        return web.json_response(events_view.entry_record(entry), status=201)

    async def suppression_remove(self, request: web.Request) -> web.Response:
        address = normalise_address(request.match_info["address"])
        removed = await self.relay.spool.remove_suppression(address, request.query.get("account") or None)
        if not removed:
            return web.json_response({"error": "no such entry"}, status=404)
        log.info("suppression: %s removed by the admin API (%d entries)", address, removed)
        return web.json_response({"removed": removed})
