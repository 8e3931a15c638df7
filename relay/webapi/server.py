"""The Web API listener: SendCloud's ``POST /apiv2/mail/send`` on ``http_api.listen`` (aiohttp).

A thin adapter, as :mod:`relay.smtp.session` is for SMTP: the form becomes a
:class:`~relay.webapi.request.SendRequest` (pure), the key is checked off the loop by the
same :class:`~relay.policy.auth.Authenticator` and lockout (:class:`~relay.policy.anvil.SharedLimits`,
per user and per address) as SMTP AUTH, every recipient is judged as at RCPT, and the built
message enters the one :class:`~relay.intake.Intake` SMTP DATA enters. The JSON answer comes
only after the spool commit. Nothing of ``apiKey`` reaches a log line: only the user, the
client address and the refusal are logged, and aiohttp's access log is off.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections.abc import Callable

from aiohttp import web
from multidict import MultiDictProxy

from relay.config import Config, split_host_port
from relay.errors import SMTPReply
from relay.intake import Intake, Refused
from relay.observe import metrics
from relay.observe.logs import event
from relay.policy.anvil import LimitsUnavailable, SharedLimits
from relay.policy.auth import Authenticator
from relay.policy.checks import auth_failed, auth_locked_out, auth_unavailable, check_auth_identity, check_sender
from relay.rewrite.pipeline import Submission
from relay.sockets import Site
from relay.webapi.answer import email_ids, failure, refusal, success, templates_unavailable
from relay.webapi.mime import build_message, envelope
from relay.webapi.request import Attachment, RequestError, SendRequest, parse_send_request

log = logging.getLogger("relay.webapi")

LISTENER = "http_api"  # the listener name in log lines, metrics and the spool's records
SEND_PATHS = ("/apiv2/mail/send", "/apiv2/send")  # the second: SendCloud's older path
TEMPLATE_PATH = "/apiv2/mail/sendtemplate"


def too_big(size: int, limit: int) -> SMTPReply | None:
    """The 552 SMTP gives at DATA for a message over ``server.max_message_size`` (413 here)."""
    if size <= limit:
        return None
    return SMTPReply(552, "5.3.4", f"Message size exceeds fixed maximum message size ({limit} bytes)")


def plaintext_off_host(listen: str, tls: bool) -> bool:
    """Whether keys could cross a network in plaintext: no TLS on an address other than loopback."""
    if tls:
        return False
    host = split_host_port(listen)[0]
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve anywhere
        return host != "localhost"


def form_parts(form: MultiDictProxy) -> tuple[dict[str, list[str]], list[web.FileField]]:
    """Text fields by name (every value kept, so a repeat is seen) and the uploaded ``attachments``.

    A file under any other name is ignored, as other unknown parameters are; (non-blank) text
    under ``attachments`` is a 400 (a client sending file names instead of files would otherwise
    get its mail out without them).
    """
    fields: dict[str, list[str]] = {}
    files = []
    for name, value in form.items():
        if isinstance(value, web.FileField):
            if name == "attachments":
                files.append(value)
        elif name == "attachments":
            if not value.strip():
                continue  # an empty field some form libraries send when no file was chosen
            raise RequestError(400, "attachments must be uploaded files (multipart/form-data)")
        else:
            fields.setdefault(name, []).append(value)
    return fields, files


def _read_files(files: list[web.FileField]) -> list[Attachment]:
    """aiohttp keeps uploads in temporary files; read them (in a thread: they may be megabytes)."""
    return [Attachment(item.filename, item.content_type, item.file.read()) for item in files]


class WebAPIServer:
    def __init__(self, config: Callable[[], Config], intake: Intake, authenticator: Authenticator,
                 limits: SharedLimits):
        self._config = config
        self._intake = intake
        self._authenticator = authenticator
        self._limits = limits
        self._site = Site("http_api")

    def app(self) -> web.Application:
        app = web.Application()
        for path in SEND_PATHS:
            app.router.add_post(path, self.send)
        app.router.add_route("*", TEMPLATE_PATH, self.template)
        return app

    # -- bind before serve, like the other listeners (relay.process.startup) ------------------

    async def bind(self) -> None:
        """Bind ``http_api.listen`` (if set) and load ``http_api.tls``; an OSError names what failed."""
        config = self._config()
        await self._site.bind(config.http_api.listen, config.http_api.tls, config.server.hostname)

    async def serve(self) -> None:
        config = self._config()
        if await self._site.serve(self.app(), shutdown_timeout=config.server.shutdown_grace):
            log.info("HTTP submission on %s://%s%s", self._site.scheme, config.http_api.listen, SEND_PATHS[0])
            if plaintext_off_host(config.http_api.listen, config.http_api.tls is not None):
                log.warning("http_api.listen %s has no TLS: apiKeys cross the network in plaintext unless a "
                            "proxy in front terminates TLS (or set http_api.tls)", config.http_api.listen)

    async def stop(self, grace: float = 0) -> None:
        """Stop listening; requests in flight finish within the shutdown grace (their mail is spooled)."""
        await self._site.stop()

    # -- requests ----------------------------------------------------------------------------

    async def template(self, request: web.Request) -> web.Response:
        answer = templates_unavailable()
        return web.json_response(answer, status=answer["statusCode"])

    async def send(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        client = request.remote or "-"
        try:
            status, answer = await self._send(request, client, started)
        except Exception:  # a bug costs the client a retry (503), never a lost or doubled message
            log.exception("HTTP submission from client=[%s] failed", client)
            status, answer = 503, failure(503, "Internal error, try again later")
        return web.json_response(answer, status=status, dumps=_dumps)

    async def _send(self, request: web.Request, client: str, started: float) -> tuple[int, dict]:
        config = self._config()
        limit = config.server.max_message_size
        try:
            form = await request.clone(client_max_size=limit).post()
        except web.HTTPRequestEntityTooLarge:
            return self._refused(client, "REQUEST", None, too_big(limit + 1, limit))
        except ValueError as error:  # a form aiohttp cannot read
            return self._bad(client, None, 400, f"the request body is not a readable form: {error}")
        try:
            fields, uploads = form_parts(form)
            files = await asyncio.to_thread(_read_files, uploads) if uploads else []
            send = parse_send_request(fields, files, config.server.max_recipients)
        except RequestError as error:
            return self._bad(client, None, error.status, error.message)
        user = send.api_user
        reply = await self._authenticate(config, client, user, send.api_key)
        if reply is not None:
            return self._refused(client, "AUTH", None, reply)
        reply = check_sender(user, config.users[user], send.sender)
        if reply is not None:
            return self._refused(client, "MAIL", user, reply, **{"from": send.sender})
        sender, recipients = envelope(send)
        for index, address in enumerate(recipients):
            reply = self._intake.recipient_refusal(config, user, client, address, index)
            if reply is not None:
                return self._refused(client, "RCPT", user, reply, **{"from": sender, "to": address})
        data = await self._build(send, config)
        reply = too_big(len(data), limit)
        if reply is not None:
            return self._refused(client, "DATA", user, reply, **{"from": sender, "size": len(data)})
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        submission = Submission(
            user=user, listener=LISTENER, sender=sender, recipients=recipients, data=data, helo="",
            client_ip=client, esmtp=True,
            tls=(ssl_object.version(), *ssl_object.cipher()[::2]) if ssl_object else None,
            authenticated_user=user,
        )
        try:
            message = await self._intake.accept(submission, started, label=send.label_id)
        except Refused as refused:
            return self._refused(client, "DATA", user, refused.reply, **refused.fields)
        ids = email_ids(message.id, recipients) if send.resp_email_id else None
        return 200, success(message.id, ids)

    async def _build(self, send: SendRequest, config: Config) -> bytes:
        """The MIME message; with attachments (base64 of megabytes) built in a thread, off the loop."""
        now = time.time()
        if send.attachments:
            return await asyncio.to_thread(build_message, send, config.server.hostname, now)
        return build_message(send, config.server.hostname, now)

    async def _authenticate(self, config: Config, client: str, user: str, key: str) -> SMTPReply | None:
        """None when ``key`` is one of ``user``'s api_keys; else the refusal SMTP AUTH would give.

        Failures count in the same guard as SMTP AUTH (per user and per address), and a
        locked-out user or address is refused before its key is even checked.
        """
        reply = check_auth_identity(user)
        if reply is not None:
            return reply
        try:
            locked = await self._limits.auth_locked_for(client, user)
        except LimitsUnavailable:
            return auth_unavailable()
        if locked is not None:
            metrics.AUTH.labels(LISTENER, "locked_out").inc()
            return auth_locked_out(locked)
        if await self._authenticator.check(user, key):
            self._limits.auth_succeeded(client, user)
            metrics.auth(LISTENER, True)
            return None
        metrics.auth(LISTENER, False)
        try:
            delay = await self._limits.auth_failed(client, user)
        except LimitsUnavailable:
            delay = config.server.auth_failure_delay
        event(log, None, {"client": client, "listener": LISTENER, "sasl_username": user},
              f"authentication failed, reply delayed {delay:.1f}s", logging.WARNING)
        await asyncio.sleep(delay)
        return auth_failed()

    def _refused(self, client: str, stage: str, user: str | None, reply: SMTPReply, **fields) -> tuple[int, dict]:
        """One NOQUEUE line and one count, as the SMTP side logs a refusal; then SendCloud's answer."""
        reason = metrics.reason_for(reply)
        metrics.rejected(LISTENER, user, reason)
        event(log, "NOQUEUE", {"reject": stage, "client": client, "listener": LISTENER, "user": user or "-",
                               **fields, "reason": reason}, str(reply))
        return refusal(reply)

    def _bad(self, client: str, user: str | None, status: int, message: str) -> tuple[int, dict]:
        metrics.rejected(LISTENER, user, "bad_request")
        event(log, "NOQUEUE", {"reject": "REQUEST", "client": client, "listener": LISTENER, "user": user or "-"},
              f"{status} {message}", logging.INFO)
        return status, failure(status, message)


def _dumps(answer: dict) -> str:
    return json.dumps(answer, ensure_ascii=False)  # 请求成功 as SendCloud writes it, not as \u escapes
