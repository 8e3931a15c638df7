"""The dashboard's routes on the admin endpoint: sign-in, then pages over the same query layer as /api/*.

Every page reads through :mod:`relay.ops.queue_view` and :mod:`relay.ops.events_view` (what the
CLI and the JSON API use) and the spool's async calls, so a page never blocks the loop that
answers ``/healthz``. Pages take the session cookie only; ``admin.token`` is for the JSON API.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, quote_plus

from aiohttp import web
from multidict import MultiDictProxy

from relay.config import Config
from relay.events.stats import GROUPS, day_bucket
from relay.events.status import STATUSES
from relay.events.suppression import parse_csv
from relay.events.suppression import to_csv as suppression_csv
from relay.ops import events_view, queue_view
from relay.ops.dashboard import pages, session
from relay.ops.dashboard.render import Html, page
from relay.policy.auth import AuthGuard, GuardSettings, unknown_user_hash, verify_password
from relay.policy.suppression import REASONS, normalise_address
from relay.spool import Spool, State

log = logging.getLogger("relay.admin")

STATIC = Path(__file__).with_name("static")
_PAGE_SIZE = 50
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "same-origin",
}


@dataclass(frozen=True)
class Viewer:
    """Who is looking: the signed-in user, their role (from the config now) and the session's CSRF token."""

    name: str
    role: str
    csrf: str

    @property
    def operator(self) -> bool:
        return self.role == "operator"


class RelayView(Protocol):
    """The part of ``relay.ops.http.AdminBackend`` the dashboard reads (not imported: http mounts us)."""

    config: Callable[[], Config]
    spool: Spool
    failing_since: Callable[[], Mapping[str, float]]
    paused_for: Callable[[], Mapping[str, float]]
    unreachable_for: Callable[[], Mapping[str, float]]


Handler = Callable[[web.Request, Viewer], Awaitable[web.StreamResponse]]
ChangeHandler = Callable[[web.Request, Viewer, MultiDictProxy], Awaitable[web.StreamResponse]]


def _html(body: Html, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8", headers=_HEADERS)


class Dashboard:
    def __init__(self, relay: RelayView):
        self.relay = relay
        self._random_secret = secrets.token_bytes(32)
        self.guard = AuthGuard(lambda: GuardSettings.from_server(relay.config().server))

    def add_routes(self, app: web.Application) -> None:
        get, post = app.router.add_get, app.router.add_post
        get("/", self._page(self.overview))
        get("/signin", self.signin_form)
        post("/signin", self.signin)
        post("/signout", self._change(self.signout, operator=False))
        get("/messages", self._page(self.messages))
        get("/messages/{id}", self._page(self.message))
        post("/messages/{id}/retry", self._change(self.retry))
        post("/messages/{id}/delete", self._change(self.delete))
        get("/suppression", self._page(self.suppression))
        get("/suppression.csv", self._page(self.suppression_csv))
        post("/suppression/add", self._change(self.suppression_add))
        post("/suppression/remove", self._change(self.suppression_remove))
        post("/suppression/import", self._change(self.suppression_import))
        get("/stats", self._page(self.stats))
        get("/stats.csv", self._page(self.stats_csv))
        app.router.add_static("/static/", STATIC, show_index=False)

    # -- sessions ---------------------------------------------------------------------------

    def _secret(self) -> bytes:
        configured = self.relay.config().admin.session_secret
        return configured.get_secret_value().encode() if configured else self._random_secret

    def _viewer(self, request: web.Request) -> Viewer | None:
        found = session.verify(self._secret(), request.cookies.get(session.COOKIE), time.time())
        user = self.relay.config().admin.users.get(found.user) if found else None
        if user is None:  # signed out, expired, forged, or removed from the config since
            return None
        return Viewer(found.user, user.role, session.csrf_token(self._secret(), found))

    def _page(self, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def guarded(request: web.Request) -> web.StreamResponse:
            viewer = self._viewer(request)
            if viewer is None:
                raise web.HTTPSeeOther("/signin")
            return await handler(request, viewer)
        return guarded

    def _change(self, handler: ChangeHandler, operator: bool = True) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """A POST: a session, its CSRF token in the form, and (for anything but sign-out) the operator role."""
        async def guarded(request: web.Request) -> web.StreamResponse:
            viewer = self._viewer(request)
            if viewer is None:
                raise web.HTTPSeeOther("/signin")
            form = await request.post()
            if not session.csrf_ok(viewer.csrf, form.get("csrf")):
                return _html(page("Refused", Html("<p>The form's CSRF token is missing or wrong.</p>")), 403)
            if operator and not viewer.operator:
                return _html(page("Refused", Html("<p>Only operators change anything.</p>"), user=viewer.name,
                                  role=viewer.role, csrf=viewer.csrf), 403)
            return await handler(request, viewer, form)
        return guarded

    def _secure(self, request: web.Request) -> bool:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        return session.behind_tls(request.secure, peer[0] if peer else None, request.headers.get("X-Forwarded-Proto"),
                                  self.relay.config().admin.trusted_proxies)

    async def signin_form(self, request: web.Request) -> web.Response:
        return _html(page("Sign in", pages.signin(None, bool(self.relay.config().admin.users))))

    async def signin(self, request: web.Request) -> web.StreamResponse:
        """Check name and password off the loop; failures slow down and lock out as SMTP AUTH does."""
        form = await request.post()
        name, password = str(form.get("name", "")), str(form.get("password", ""))
        peer = request.remote or "?"
        users = self.relay.config().admin.users
        if self.guard.locked_for(peer, name) is not None:
            return _html(page("Sign in", pages.signin("Too many failed sign-ins: try again later.", bool(users))), 429)
        user = users.get(name)
        # The unknown name's dummy hash is made (once, ~50 ms of argon2) off the loop too.
        known = user.password_hash if user else await asyncio.to_thread(unknown_user_hash)
        ok = await asyncio.to_thread(verify_password, known, password) and user is not None
        if not ok:
            await asyncio.sleep(self.guard.failed(peer, name))
            log.warning("dashboard: failed sign-in from %s", peer)
            return _html(page("Sign in", pages.signin("Wrong name or password.", bool(users))), 401)
        self.guard.succeeded(peer, name)
        log.info("dashboard: %s signed in from %s", name, peer)
        response = _redirect("/")
        lifetime = self.relay.config().admin.session_lifetime
        response.set_cookie(session.COOKIE, session.issue(self._secret(), name, time.time(), lifetime),
                            max_age=int(lifetime), httponly=True, samesite="Strict", secure=self._secure(request), path="/")
        return response

    async def signout(self, request: web.Request, viewer: Viewer, form: MultiDictProxy) -> web.StreamResponse:
        response = _redirect("/signin")
        response.del_cookie(session.COOKIE, path="/")
        return response

    # -- pages ------------------------------------------------------------------------------

    def _show(self, title: str, body: Html, viewer: Viewer, notice: str | None = None, status: int = 200) -> web.Response:
        return _html(page(title, body, user=viewer.name, role=viewer.role, csrf=viewer.csrf, notice=notice), status)

    async def overview(self, request: web.Request, viewer: Viewer) -> web.Response:
        now = time.time()
        spool = self.relay.spool
        today = await events_view.stats_rows(spool, day_bucket(now), None, "day", None, now)
        recent = await events_view.stats_rows(spool, "48h", None, "hour", None, now)
        failing, paused, unreachable = self.relay.failing_since(), self.relay.paused_for(), self.relay.unreachable_for()
        accounts = [(name, account.api_user,
                     pages.account_state(failing.get(name), paused.get(name, 0.0), now, unreachable.get(name)))
                    for name, account in self.relay.config().accounts.items()]
        body = pages.overview(await spool.pending_summary(), today[-1] if today else {}, accounts, recent, now)
        return self._show("Overview", body, viewer)

    async def messages(self, request: web.Request, viewer: Viewer) -> web.StreamResponse:
        wanted = {k: v.strip() for k, v in request.query.items() if k in pages.MESSAGE_FILTERS and v.strip()}
        if "id" in wanted:
            raise web.HTTPSeeOther(f"/messages/{quote(wanted['id'], safe='')}")
        now = time.time()
        form = pages.search_form(wanted, [s.value for s in State], STATUSES)
        try:
            query = queue_view.list_query(include_final=True, user=wanted.get("user"), to=wanted.get("to"),
                                          state=wanted.get("state"), since=wanted.get("since"),
                                          before=wanted.get("before"), sender=wanted.get("sender"),
                                          status=wanted.get("status"), email_id=wanted.get("email_id"),
                                          after=wanted.get("after"), limit=_PAGE_SIZE, now=now)
        except ValueError as error:
            return self._show("Messages", form, viewer, notice=str(error), status=400)
        found, next_after = queue_view.page(await self.relay.spool.list(query), query)
        records = [queue_view.list_record(m, now) for m in found]
        return self._show("Messages", pages.messages(form, records, next_after, wanted), viewer)

    async def message(self, request: web.Request, viewer: Viewer) -> web.Response:
        spool = self.relay.spool
        found = await spool.get(request.match_info["id"])
        if found is None:
            return self._show("No such message", Html('<p><a href="/messages">Back to the search</a></p>'), viewer,
                              status=404)
        record = queue_view.show_record(found, time.time(), await spool.fates(found.id))
        start = await spool.start(found.id)
        headers = start[0].decode("utf-8", "replace") if start else None
        notice = request.query.get("done")
        return self._show(f"Message {found.id}", pages.message(record, headers, viewer.operator, viewer.csrf), viewer,
                          notice=notice)

    async def retry(self, request: web.Request, viewer: Viewer, form: MultiDictProxy) -> web.StreamResponse:
        queue_id = request.match_info["id"]
        count = await self.relay.spool.retry(queue_id)
        log.info("dashboard: %s retried %s (%d recipient(s))", viewer.name, queue_id, count)
        raise web.HTTPSeeOther(f"/messages/{queue_id}?done={count}+recipient(s)+made+due+now")

    async def delete(self, request: web.Request, viewer: Viewer, form: MultiDictProxy) -> web.StreamResponse:
        queue_id = request.match_info["id"]
        deleted = await self.relay.spool.delete(queue_id)
        log.info("dashboard: %s deleted %s (%s)", viewer.name, queue_id, "done" if deleted else "not found")
        raise web.HTTPSeeOther("/messages")

    async def _suppressions(self, search: str) -> list[dict]:
        found = await events_view.entries(self.relay.spool, time.time())
        return [events_view.entry_record(e) for e in found if search.lower() in e.address]

    async def suppression(self, request: web.Request, viewer: Viewer) -> web.Response:
        search = request.query.get("q", "").strip()
        body = pages.suppression(await self._suppressions(search), search, REASONS, viewer.operator, viewer.csrf)
        return self._show("Suppression", body, viewer, notice=request.query.get("done"))

    async def suppression_csv(self, request: web.Request, viewer: Viewer) -> web.Response:
        """`suppression export`'s CSV (what the import reads back), of the entries the search shows."""
        search = request.query.get("q", "").strip().lower()
        found = await events_view.entries(self.relay.spool, time.time())
        return _csv("suppressions.csv", suppression_csv([e for e in found if search in e.address]))

    async def suppression_import(self, request: web.Request, viewer: Viewer, form: MultiDictProxy) -> web.StreamResponse:
        """`suppression import` from an uploaded file: all or nothing, every bad line named."""
        upload = form.get("file")
        if not isinstance(upload, web.FileField):
            raise web.HTTPSeeOther("/suppression?done=choose+a+CSV+file+to+import")
        now = time.time()
        try:
            rows = parse_csv(upload.file.read().decode("utf-8", "replace"), now)
        except ValueError as error:  # SuppressionImportError lists every bad line
            raise web.HTTPSeeOther(f"/suppression?done={quote_plus(f'nothing imported: {error}')}") from None
        count = await self.relay.spool.add_suppressions([events_view.entry_row(row.to_entry(now)) for row in rows])
        log.info("suppression: %d entries imported by %s on the dashboard", count, viewer.name)
        raise web.HTTPSeeOther(f"/suppression?done={quote_plus(f'{count} entry(ies) imported')}")

    async def suppression_add(self, request: web.Request, viewer: Viewer, form: MultiDictProxy) -> web.StreamResponse:
        try:
            entry = events_view.manual_entry(str(form.get("address", "")), str(form.get("reason", "")) or None,
                                             str(form.get("account", "")) or None, str(form.get("expires", "")) or None,
                                             time.time())
        except ValueError as error:
            raise web.HTTPSeeOther(f"/suppression?done={quote_plus(str(error))}") from None
        await self.relay.spool.add_suppressions([events_view.entry_row(entry)])
        log.info("suppression: %s added by %s on the dashboard (%s)", entry.address, viewer.name, entry.reason)
        raise web.HTTPSeeOther(f"/suppression?done={quote_plus(entry.address + ' added')}")

    async def suppression_remove(self, request: web.Request, viewer: Viewer, form: MultiDictProxy) -> web.StreamResponse:
        address = normalise_address(str(form.get("address", "")))
        removed = await self.relay.spool.remove_suppression(address, str(form.get("account", "")) or None)
        log.info("suppression: %s removed by %s on the dashboard (%d entries)", address, viewer.name, removed)
        raise web.HTTPSeeOther(f"/suppression?done={quote_plus(f'{address}: {removed} entry(ies) removed')}")

    async def _stats(self, request: web.Request) -> tuple[list[dict], dict[str, str]]:
        query = {k: v for k, v in request.query.items() if k in ("since", "until", "by", "group", "chart") and v}
        if query.get("chart", "requested") not in pages.CHART_SERIES:
            raise ValueError(f"chart must be one of {', '.join(pages.CHART_SERIES)}")
        rows = await events_view.stats_rows(self.relay.spool, query.get("since", "7d"), query.get("until"),
                                            query.get("by", "day"), query.get("group"), time.time())
        return rows, query

    async def stats(self, request: web.Request, viewer: Viewer) -> web.Response:
        try:
            rows, query = await self._stats(request)
        except ValueError as error:
            return self._show("Statistics", pages.stats_page([], {}, GROUPS), viewer, notice=str(error), status=400)
        return self._show("Statistics", pages.stats_page(rows, query, GROUPS), viewer)

    async def stats_csv(self, request: web.Request, viewer: Viewer) -> web.Response:
        try:
            rows, query = await self._stats(request)
        except ValueError as error:
            raise web.HTTPBadRequest(text=str(error)) from None
        group = query.get("group")
        return _csv("stats.csv", pages.to_csv(("period", *((group,) if group else ()), *pages.STATS_COLUMNS), rows))


def _redirect(location: str) -> web.Response:
    """A 303 that can carry a cookie (raising ``HTTPSeeOther`` is for answers without one)."""
    return web.Response(status=303, headers={"Location": location})


def _csv(filename: str, text: str) -> web.Response:
    return web.Response(text=text, content_type="text/csv", charset="utf-8",
                        headers={**_HEADERS, "Content-Disposition": f'attachment; filename="{filename}"'})

