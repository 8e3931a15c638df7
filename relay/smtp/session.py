"""The SMTP front end: a thin adapter from aiosmtpd's hooks to policy, routing and the spool.

One :class:`ListenerHandler` per configured listener; the decisions live in
:mod:`relay.policy` and :mod:`relay.routing`, and this module only asks them and answers.
``handle_DATA`` does no more than prepare (:mod:`relay.prepare`: route, rewrite, sign), spool
(waiting for the group commit's fsync) and reply, so the ``250`` is never sent for a message
that is not on disk.
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import ipaddress
import itertools
import logging
import re
import socket
import ssl
import time
import warnings
from base64 import b64decode
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiosmtpd.proxy_protocol import ProxyData
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session, TLSSetupException, syntax

from relay import metrics
from relay.anvil import LimitsUnavailable, SharedLimits
from relay.auth import Authenticator
from relay.config import Config, Listener
from relay.delivery import Scheduler
from relay.errors import SMTPReply, spool_unavailable
from relay.logs import event
from relay.limits import PersistentRates, Rate
from relay.policy import (
    auth_failed,
    auth_locked_out,
    auth_unavailable,
    check_auth_allowed,
    check_rate,
    check_recipient,
    check_relay,
    check_sender,
    identify,
    limits_unavailable,
    rate_budgets,
)
from relay.prepare import Preparer, Submission
from relay.spool import NewMessage, new_queue_id
from relay.spool.sqlite import SqliteSpool

log = logging.getLogger("relay.smtpd")

# aiosmtpd logs every command line at INFO, AUTH PLAIN's base64 credentials included: keep
# its logger at WARNING. Two of its warnings repeat on every session and say nothing: AUTH
# without STARTTLS (on our implicit-TLS listeners TLS is up; on `allow_plaintext_auth` ones it
# is the operator's explicit choice) and its own use of the deprecated Session.login_data.
_AIOSMTPD_NOISE = ("auth_require_tls == False", "Session.login_data is deprecated")
_aiosmtpd_log = logging.getLogger("mail.log")
_aiosmtpd_log.setLevel(logging.WARNING)
_aiosmtpd_log.addFilter(lambda record: not any(noise in record.getMessage() for noise in _AIOSMTPD_NOISE))
warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")


@dataclass
class Services:
    """What every listener shares; ``config`` is a callable so a reload is seen at once."""

    config: Callable[[], Config]
    spool: SqliteSpool
    scheduler: Scheduler
    authenticator: Authenticator
    limits: SharedLimits  # connection counts and AUTH failures: one table per relay (relay.anvil)
    rates: PersistentRates  # shared with other processes through the spool database
    preparer: Preparer


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"  # RFC 5322 atext
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"


_connection_keys = itertools.count()  # this process's names for its connections in the limits


@functools.cache
def _hook_names(cls: type) -> list[str]:
    """What aiosmtpd looks for in dir() of its protocol and of the handler, for every connection."""
    prefixes = ("smtp_", "auth_", "handle_")
    return sorted({name for klass in cls.__mro__ for name in vars(klass) if name.startswith(prefixes)})


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP with additions a hook cannot make.

    - aiosmtpd's built-in replies for size and STARTTLS problems lack the enhanced status
      codes (RFC 3463) that the spec promises and that smarthosts log; ``push`` adds them,
      and logs and counts those refusals, which no hook sees.
    - Open connections are tracked so shutdown can say ``421`` to idle clients and wait
      for the ones in a transaction, and counted so the connection limits can refuse one
      before aiosmtpd greets it (no hook runs that early, so ``_handle_client`` asks first;
      behind a PROXY header the per-address limit waits for the real address, in
      ``handle_PROXY``).
    - ``client_ip`` is the real client: the TCP peer, or the address a PROXY header named.
      It lives here, not on the session, because STARTTLS makes a new session (aiosmtpd
      #287) and would fall back to the load balancer's address.
    - DATA is read by :func:`read_message`: aiosmtpd cuts lines at CRLF only (a bare-LF
      message past 1,000 bytes became one line "too long") and keeps a list of lines.
    - Timeouts: aiosmtpd's idle timer restarts only when a command arrives and closes the
      connection without a word. Here it says ``421 4.4.2`` first, the DATA phase has its
      own total bound (``data_timeout``: a slow upload is not cut by the idle timer, and a
      trickling one cannot last for ever), and a whole session has ``session_timeout``.
    - STARTTLS runs on the event loop's TLS layer (``smtp_STARTTLS``), not aiosmtpd's own.
    """

    _WITH_ENHANCED_CODE = {
        "552 Error: Too much mail data": "552 5.3.4 Message size exceeds fixed maximum message size",
        "552 Error: message size exceeds fixed maximum message size": "552 5.3.4 Message size exceeds fixed maximum message size",
        "530 Must issue a STARTTLS command first": "530 5.7.0 Must issue a STARTTLS command first",
        "500 Line too long (see RFC5321 4.5.3.1.6)": "500 5.5.2 Line too long (see RFC 5321 4.5.3.1.6)",
        # No SMTPUTF8 (SendCloud does not offer it): say why a non-ASCII address is refused.
        "500 Error: strict ASCII mode": "553 5.6.7 Non-ASCII commands and addresses need SMTPUTF8, which SendCloud does not support",
        "501 Error: SMTPUTF8 disabled": "555 5.6.7 SMTPUTF8 is not supported (SendCloud does not offer it)",
    }

    # aiosmtpd's own refusals of a transaction, with the command they refuse.
    _BUILTIN_REFUSALS = {
        "552 Error: Too much mail data": "DATA",
        "552 Error: message size exceeds fixed maximum message size": "MAIL",
        "500 Line too long (see RFC5321 4.5.3.1.6)": "DATA",
        "530 5.7.0 Authentication required": "command",  # HELP, VRFY, MAIL, RCPT or DATA
    }

    def __init__(
        self, handler: ListenerHandler, connections: set[RelaySMTP], *, data_timeout: float, session_timeout: float, **kwargs
    ):
        super().__init__(handler, **kwargs)
        self._connections = connections
        self.client_ip = ""
        self.connection_key = next(_connection_keys)
        self._admitted = False
        self._data_timeout = data_timeout
        self._session_timeout = session_timeout
        self._session_timer: asyncio.TimerHandle | None = None

    def __dir__(self) -> list[str]:
        # aiosmtpd's __init__ looks for smtp_*, auth_* and handle_* methods in dir() of this
        # object and of the handler on every connection (inspect.getmembers); listing only
        # those names, once per class, cuts the ~120 µs it took per connection to ~35 µs.
        return _hook_names(type(self))

    _SIMPLE_PATH = re.compile(rf"<({_DOT_ATOM}@{_DOT_ATOM})>[ \t]*+(?!\()")

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd parses every MAIL/RCPT address with the email package's RFC 5322 header
        # parser (~35 µs, and it defines a class per call). The plain ``<dot-atom@dot-atom>``
        # of nearly every client gives the very same result from one regular expression.
        match = self._SIMPLE_PATH.match(arg)
        if match is None:
            return super()._getaddr(arg)
        address = match[1]
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, arg[match.end():]

    async def push(self, status):
        if isinstance(status, str):
            stage = self._BUILTIN_REFUSALS.get(status)
            status = self._WITH_ENHANCED_CODE.get(status, status)
            if stage is not None:
                self.event_handler.refused_by_aiosmtpd(self, stage, status)
        await super().push(status)

    def connection_made(self, transport) -> None:
        self.client_ip = (transport.get_extra_info("peername") or ("",))[0]
        super().connection_made(transport)

    async def _handle_client(self) -> None:
        """The connection limits first (asked of the main process when there are acceptor
        processes): a refused client sees its ``421`` and nothing else, never a greeting."""
        refusal = await self.event_handler.admit(self)
        if self.transport is None:  # the client went away meanwhile
            return
        if refusal is not None:
            self.transport.write(f"{refusal}\r\n".encode())
            self.transport.close()
            return
        self._admitted = True
        self._connections.add(self)
        self.event_handler.connected(self.transport)
        self._session_timer = self.loop.call_later(self._session_timeout, self._expire, "session time limit exceeded")
        await super()._handle_client()

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """aiosmtpd's STARTTLS on the event loop's own TLS layer (``loop.start_tls``).

        aiosmtpd builds asyncio's pure-Python ``SSLProtocol`` itself, even under uvloop, whose
        TLS layer is compiled (~0.1–0.2 ms of the relay's CPU less per STARTTLS connection,
        and less per record on kept connections: bench/README.md). What aiosmtpd's
        ``connection_made`` does after its handshake is done here: a new session (RFC 3207
        4.2), the TLS facts in ``session.ssl``, the STARTTLS hook. Whatever the client sent in
        plaintext after STARTTLS is discarded before the handshake (RFC 3207 5, the command
        injection of CVE-2011-0411); what it sends once TLS is up may already be buffered when
        the handshake completes, so nothing is cleared after it.
        """
        if arg:
            await self.push("501 Syntax: STARTTLS")
            return
        await self.push("220 Ready to start TLS")
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        plain = self.transport
        try:
            transport = await self.loop.start_tls(plain, self, self.tls_context, server_side=True)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - aiosmtpd closes the connection on this one
            raise TLSSetupException() from error
        self._original_transport = plain
        self._reader._transport = self._writer._transport = self.transport = transport  # type: ignore[attr-defined]
        self._set_rset_state()
        self.session = self._create_session()
        self.session.peer = transport.get_extra_info("peername")
        # aiosmtpd's own STARTTLS keeps its SSLProtocol here: it only asks whether there is one,
        # and hands its extra info (cipher, certificate, ssl_object) to the session.
        self._tls_protocol = _StartedTLS(transport)
        self.session.ssl = self._tls_protocol._extra
        self._reset_timeout()
        hook = self._handle_hooks.get("STARTTLS")
        self._tls_handshake_okay = True if hook is None else hook(self, self.session, self.envelope)

    def eof_received(self) -> bool:
        """The client closed its side: end the session here and now.

        aiosmtpd cancels the session but asks to keep the transport half-open; asyncio then
        closes it anyway, uvloop does not, and the connection (and its slot in the
        connection limits) would leak. Nothing more can be read, so close.
        """
        super().eof_received()
        return False

    def connection_lost(self, error) -> None:
        self.event_handler.release(self)  # admitted or not, or still being asked about
        if self._session_timer is not None:
            self._session_timer.cancel()
        if self in self._connections:
            self._connections.discard(self)
            metrics.SESSIONS.labels(self.event_handler.listener.name).dec()
        super().connection_lost(error)

    def _timeout_cb(self) -> None:
        """aiosmtpd's idle (and our DATA) timer: say why before closing, as Postfix does."""
        self._expire("timeout exceeded")

    def _expire(self, why: str) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        reply = f"421 4.4.2 {self.hostname} Error: {why}"
        self.event_handler.expired(self, reply)
        self.transport.write(f"{reply}\r\n".encode())
        self.transport.close()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, with :func:`read_message` instead of its CRLF-only line reader."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        self._reset_timeout(self._data_timeout)  # the whole DATA phase, spooling included
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            try:
                content = await read_message(self._reader, self.data_size_limit, self.line_length_limit)
            except asyncio.CancelledError:  # the client went away during DATA
                self._writer.close()
                raise
            if isinstance(content, str):  # the refusal of a message read to its end
                self._set_post_data_state()
                await self.push(content)
                return
            self.envelope.content = self.envelope.original_content = content
            status = await self._call_handler_hook("DATA")
            self._set_post_data_state()
            await self.push(status)
        finally:
            if self.transport is not None:
                self._reset_timeout()

    @property
    def in_transaction(self) -> bool:
        return bool(self.envelope is not None and self.envelope.mail_from)

    def close_idle(self) -> None:
        """Say goodbye to a client between transactions; one inside a transaction may finish."""
        if self.transport is None or self.transport.is_closing() or self.in_transaction:
            return
        self.transport.write(b"421 4.3.2 Service shutting down, try again later\r\n")
        self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _StartedTLS:
    """What aiosmtpd reads of its own ``SSLProtocol`` after STARTTLS: its ``_extra`` info."""

    def __init__(self, transport: asyncio.Transport):
        self._extra = {key: transport.get_extra_info(key) for key in ("sslcontext", "peercert", "cipher", "compression", "ssl_object")}


_END = b"\r\n.\r\n"  # the end of DATA, with the CRLF that ends the line before the dot
# How what was read may end while the end of DATA could still be starting there.
_END_STARTS = (b"\r", b"\r\n", b"\r\n.", b"\r\n.\r")


def _first_refusal(lengths: list[int], size: int, size_limit: int | None, line_limit: int) -> str | None:
    """Which limit the first offending line (lengths without the LF) breaks, checked line by line."""
    for length in lengths:
        size += length + 1
        if length + 1 > line_limit:
            return "500 Line too long (see RFC5321 4.5.3.1.6)"
        if size_limit and size > size_limit:
            return "552 Error: Too much mail data"
    return None


async def read_message(reader: asyncio.StreamReader, size_limit: int | None, line_limit: int) -> bytearray | str:
    """The message text of one DATA, dot-unstuffed; or aiosmtpd's reply refusing it.

    Only ``CRLF.CRLF`` ends the message (a ``\\n.\\n`` is content, so nothing can be smuggled),
    and only a dot that starts a line after a CRLF is unstuffed. Unlike aiosmtpd, which splits
    on CRLF alone, a line is cut at any LF for the length limit: a legacy application sending
    bare-LF text longer than 1,000 bytes has short lines, not one line "too long".

    The text is read in blocks, not lines: ``readuntil`` the end, or what has arrived so far,
    with bytes-level searches for the dots to unstuff and the lines too long (a loop per line
    cost ~0.1 s per 10 MB on the event loop). Nothing after the final dot is consumed: the
    client may have pipelined its next commands. ``readuntil`` stops at the end; where what
    was read could be the start of it (``_END_STARTS``; at the start of DATA, which follows a
    CRLF) the next bytes are read one by one and held back, so the end is never split between
    two searches. The text grows in one buffer, returned as it is: a message is held once
    while it arrives. A message over a limit is read to its end and discarded, then refused,
    as RFC 5321 4.2.5 implies.
    """
    content = bytearray()
    size = 0
    refusal = None
    line_length = 0  # of the line not yet ended
    read = b"\r\n"  # the last bytes read (up to 5): DATA starts as if after a CRLF
    before = read  # the two bytes before the next text: do they end a line?
    held = b""  # read, but perhaps the start of the end
    while True:
        if read.endswith(_END_STARTS):
            piece = await reader.readexactly(1)
        else:
            try:
                piece = await reader.readuntil(_END)
            except asyncio.LimitOverrunError as error:  # no end yet: what cannot hold its start
                piece = await reader.readexactly(error.consumed)
        read = (read + piece[-5:])[-5:]
        held = held + piece if held else piece
        ended = read == _END
        if not ended and read.endswith(_END_STARTS):
            continue
        text, held = (held[:-3] if ended else held), b""  # the final ".\r\n" is not content
        lengths = list(map(len, text.split(b"\n")))  # without their LF
        lengths[0] += line_length  # the first continues the line not yet ended ...
        line_length = lengths.pop()  # ... and the last is not ended yet
        added = sum(lengths) + len(lengths)
        if refusal is None and lengths and (max(lengths) >= line_limit or size_limit and size + added > size_limit):
            refusal = _first_refusal(lengths, size, size_limit, line_limit)
        if refusal is None and line_length >= line_limit:  # too long already: not kept until it ends
            refusal = "500 Line too long (see RFC5321 4.5.3.1.6)"
        size += added
        if refusal is not None:
            content.clear()
        elif b"\r\n." in text or b"\r\n." in before + text[:2]:  # dot-stuffed lines
            # Each match's dot is at index 2 or later: cutting the two bytes of context off
            # after the replacement leaves exactly the text, unstuffed.
            content += memoryview((before + text).replace(b"\r\n.", b"\r\n"))[2:]
        else:
            content += text
        if ended:
            return refusal or content
        before = (before + text[-2:])[-2:]


class ListenerHandler:
    def __init__(self, listener: Listener, services: Services):
        self.listener = listener
        self.services = services

    def __dir__(self) -> list[str]:
        return _hook_names(type(self))  # see RelaySMTP.__dir__

    # -- connection limits -------------------------------------------------------------------

    async def admit(self, server: RelaySMTP) -> SMTPReply | None:
        """Count a new connection, or say why it may not open. Behind a PROXY header the
        per-address limit waits for the real address (``handle_PROXY``)."""
        address = None if self.listener.proxy_protocol else server.client_ip
        return await self._admission(server, self.services.limits.admit(server.connection_key, address))

    async def _admit_proxied(self, server: RelaySMTP) -> SMTPReply | None:
        return await self._admission(server, self.services.limits.admit_address(server.connection_key, server.client_ip))

    async def _admission(self, server: RelaySMTP, answer: Awaitable[SMTPReply | None]) -> SMTPReply | None:
        try:
            refusal = await answer
        except LimitsUnavailable as error:
            log.error("client=[%s], listener=%s: cannot check the connection limits: %s", server.client_ip, self.listener.name, error)
            refusal = limits_unavailable()
        if refusal is not None:
            metrics.rejected(self.listener.name, None, metrics.reason_for(str(refusal)))
            event(log, "NOQUEUE", {"reject": "CONNECT", "client": server.client_ip, "listener": self.listener.name},
                  str(refusal), logging.WARNING)
        return refusal

    def release(self, server: RelaySMTP) -> None:
        self.services.limits.release(server.connection_key)

    def expired(self, server: RelaySMTP, reply: str) -> None:
        metrics.rejected(self.listener.name, None, metrics.reason_for(reply))
        event(log, None, {"client": server.client_ip, "listener": self.listener.name}, reply)

    # -- identity ---------------------------------------------------------------------------

    def _user(self, server: RelaySMTP, session: Session) -> str | None:
        authenticated = session.auth_data if session.authenticated else None
        return identify(self.services.config(), self.listener, authenticated, server.client_ip)

    def _refused(self, server: RelaySMTP, stage: str, user: str | None, reply: str, **fields) -> None:
        """One ``NOQUEUE`` line and one count per refused command: how a refused transaction ends."""
        reason = metrics.reason_for(reply)
        metrics.rejected(self.listener.name, user, reason)
        event(log, "NOQUEUE", {
            "reject": stage, "client": server.client_ip, "listener": self.listener.name, "user": user or "-",
            **fields, "reason": reason,
        }, reply)

    def refused_by_aiosmtpd(self, server: RelaySMTP, stage: str, reply: str) -> None:
        user = self._user(server, server.session) if server.session else None
        self._refused(server, stage, user, reply, **{"from": server.envelope.mail_from if server.envelope else None})

    # -- connection: the real client address, TLS -------------------------------------------

    def connected(self, transport) -> None:
        metrics.SESSIONS.labels(self.listener.name).inc()
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:  # implicit TLS: the handshake is done before this
            metrics.tls_session(self.listener.name, ssl_object.version())

    async def handle_PROXY(self, server: RelaySMTP, session: Session, envelope: Envelope, proxy: ProxyData) -> bool:
        """Take the client address from a PROXY header, but only from a configured proxy."""
        try:
            peer = ipaddress.ip_address(server.client_ip)
        except ValueError:
            return False
        if not any(peer.version == net.version and peer in net for net in self.listener.proxy_protocol.proxies):
            log.warning("client=[%s], listener=%s: PROXY header from outside proxy_protocol.proxies; closed",
                        server.client_ip, self.listener.name)
            return False
        if proxy.src_addr is not None:  # v1 UNKNOWN and v2 LOCAL (a balancer's health check) name nobody
            server.client_ip = str(proxy.src_addr)
        refusal = await self._admit_proxied(server)
        if refusal is not None:
            await server.push(str(refusal))
            return False
        return True

    def handle_STARTTLS(self, server: RelaySMTP, session: Session, envelope: Envelope) -> bool:
        ssl_object = server.transport.get_extra_info("ssl_object") if server.transport else None
        metrics.tls_session(self.listener.name, ssl_object.version() if ssl_object else None)
        return True

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.listener.auth == "none":
            responses = [line for line in responses if not line[4:].startswith("AUTH")]
        return responses

    # -- AUTH: our own PLAIN and LOGIN, so the hash check runs off the event loop ----------

    async def handle_AUTH(self, server, session, envelope: Envelope, args):
        refusal = check_auth_allowed(bool(envelope.mail_from))
        return MISSING if refusal is None else str(refusal)

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            blob = await self._decode(server, args[1])
            if blob is None:
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await server.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        return await self._check(server, parts[1], parts[2])

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await server.challenge_auth(SMTP.AuthLoginUsernameChallenge)
            if login is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            login = await self._decode(server, args[1])
            if login is None:
                return AuthResult(success=False, handled=True)
        password = await server.challenge_auth(SMTP.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._check(server, login, password)

    @staticmethod
    async def _decode(server: SMTP, text: str) -> bytes | None:
        try:
            return b64decode(text.encode(), validate=True)
        except binascii.Error:
            await server.push("501 5.5.2 Can't decode base64")
            return None

    async def _check(self, server: SMTP, login: bytes, password: bytes) -> AuthResult:
        username = login.decode("utf-8", "replace")
        client = server.client_ip
        fields = {"client": client, "listener": self.listener.name, "sasl_username": username}
        limits = self.services.limits
        try:
            locked = await limits.auth_locked_for(client, username)
        except LimitsUnavailable as error:  # a lockout elsewhere cannot be ruled out: not now
            metrics.AUTH.labels(self.listener.name, "unavailable").inc()
            event(log, None, fields, f"AUTH refused: cannot check the failure counts: {error}", logging.ERROR)
            return AuthResult(success=False, handled=False, message=str(auth_unavailable()))
        if locked is not None:  # refused unheard: guesses during a lockout teach nothing
            metrics.AUTH.labels(self.listener.name, "locked_out").inc()
            event(log, None, fields, f"AUTH refused, locked out for {locked:.0f}s more", logging.WARNING)
            return AuthResult(success=False, handled=False, message=str(auth_locked_out(locked)))
        if await self.services.authenticator.check(username, password.decode("utf-8", "replace")):
            limits.auth_succeeded(client, username)
            metrics.auth(self.listener.name, True)
            event(log, None, fields, "authenticated")
            return AuthResult(success=True, auth_data=username)
        metrics.auth(self.listener.name, False)
        try:
            delay = await limits.auth_failed(client, username)
        except LimitsUnavailable:
            delay = self.services.config().server.auth_failure_delay
        event(log, None, fields, f"authentication failed, reply delayed {delay:.1f}s", logging.WARNING)
        await asyncio.sleep(delay)
        return AuthResult(success=False, handled=False, message=str(auth_failed()))

    # -- the transaction --------------------------------------------------------------------

    async def handle_MAIL(self, server, session, envelope: Envelope, address: str, mail_options):
        user = self._user(server, session)
        if user is not None:
            refusal = check_sender(user, self.services.config().users[user], _reverse_path(address))
            if refusal:
                self._refused(server, "MAIL", user, str(refusal), **{"from": address})
                return str(refusal)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server, session, envelope: Envelope, address: str, rcpt_options):
        user = self._user(server, session)
        config = self.services.config()
        refusal = (
            check_relay(user, address)
            or check_recipient(address, len(envelope.rcpt_tos), config.server.max_recipients)
            or self._over_rate(rate_budgets(config, user, server.client_ip), len(envelope.rcpt_tos) + 1)
        )
        if refusal:
            self._refused(server, "RCPT", user, str(refusal), **{"from": envelope.mail_from, "to": address})
            return str(refusal)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope: Envelope):
        started = time.monotonic()
        user = self._user(server, session)
        if user is None:  # the user was removed by a reload mid-session
            refusal = str(check_relay(None, envelope.rcpt_tos[0]))
            self._refused(server, "DATA", None, refusal, **{"from": envelope.mail_from})
            return refusal
        config = self.services.config()
        now = time.time()
        queue_id = new_queue_id(now)
        ssl_object = server.transport.get_extra_info("ssl_object") if server.transport else None
        submission = Submission(
            user=user,
            listener=self.listener.name,
            sender=_reverse_path(envelope.mail_from),
            recipients=list(envelope.rcpt_tos),
            data=envelope.original_content,
            helo=session.host_name or "",
            client_ip=server.client_ip,
            esmtp=session.extended_smtp,
            tls=(ssl_object.version(), *ssl_object.cipher()[::2]) if ssl_object else None,
            authenticated_user=session.auth_data if session.authenticated else None,
        )
        try:
            prepared = await self.services.preparer.prepare(config, submission, queue_id, now)
        except SMTPReply as refusal:
            self._refused(server, "DATA", user, str(refusal), **{"from": submission.sender})
            return str(refusal)
        # The spooled pieces are views of the text as received, so it is held once while the
        # spool writes it; if prepare made a new text (bare LFs normalised) it is spent: free it.
        if not prepared.holds(envelope.original_content):
            envelope.original_content.clear()
        route = prepared.route
        message = NewMessage(
            id=queue_id,
            received_at=now,
            user=user,
            listener=self.listener.name,
            client=server.client_ip,
            account=route.account,
            channel=route.channel,
            sender=submission.sender,
            recipients=submission.recipients,
            body=prepared.body,
            label=route.options.label,
            mail_from=prepared.mail_from if prepared.mail_from != submission.sender else None,
        )
        budgets = rate_budgets(config, user, server.client_ip)
        over = self._over_rate(budgets, len(message.recipients))
        if over:  # checked at RCPT, but concurrent sessions of the same user may have spent it since
            self._refused(server, "DATA", user, str(over), **{"from": submission.sender})
            return str(over)
        self._charge(budgets, len(message.recipients))  # no await since the check: no session slips in
        try:
            await self.services.spool.store(message)
        except Exception:  # noqa: BLE001 - whatever went wrong, the message is not on disk
            log.exception("could not spool a message from client=[%s]", server.client_ip)
            self._charge(budgets, -len(message.recipients))
            refusal = str(spool_unavailable())
            self._refused(server, "DATA", user, refusal, **{"from": submission.sender, "nrcpt": len(message.recipients)})
            return refusal
        metrics.accepted(user, route.account, route.channel, self.listener.name, time.monotonic() - started)
        event(log, message.id, {
            "client": message.client, "listener": message.listener, "user": user, "from": message.sender,
            "size": message.size, "nrcpt": len(message.recipients), "channel": route.channel,
            "account": route.account, "rule": route.rule, "label": message.label, "status": "queued",
        })
        self.services.scheduler.submit(message)
        return f"250 2.0.0 Ok: queued as {message.id}"

    # -- rate limits: checked at RCPT, charged at DATA before spooling, given back if that fails

    def _over_rate(self, budgets: list[tuple[str, str, Rate]], adding: int) -> SMTPReply | None:
        counter = self.services.rates.counter
        for who, key, rate in budgets:
            refusal = check_rate(who, counter.used(key, rate.period), adding, rate)
            if refusal is not None:
                return refusal
        return None

    def _charge(self, budgets: list[tuple[str, str, Rate]], recipients: int) -> None:
        for _, key, rate in budgets:
            self.services.rates.counter.add(key, rate.period, recipients)

    async def handle_exception(self, error: Exception) -> str:
        """A bug must cost the client a retry, never a 500 that reads as a permanent refusal."""
        log.exception("SMTP session error on listener %s", self.listener.name)
        return "451 4.3.0 Internal error, try again later"


def _reverse_path(address: str) -> str:
    """aiosmtpd keeps the null sender as ``<>`` (an empty string would read as "no MAIL yet")."""
    return "" if address == "<>" else address


class ListenerGroup:
    """All listening sockets, and the sessions they opened, for start and orderly shutdown."""

    def __init__(self, services: Services, tls_context: ssl.SSLContext | None):
        self.services = services
        self.tls_context = tls_context
        self.connections: set[RelaySMTP] = set()
        self._servers: list[asyncio.AbstractServer] = []

    def _factory(self, listener: Listener) -> Callable[[], RelaySMTP]:
        """Sockets keep their listener's settings until a restart; each new connection takes
        the server-wide ones (hostname, size limit, timeout) from the current config."""
        handler = ListenerHandler(listener, self.services)
        starttls = self.tls_context if listener.tls == "starttls" else None
        # On an implicit-TLS socket aiosmtpd cannot tell TLS is up and would hide AUTH (#274);
        # with `auth: none` there is no mechanism, and AUTH should say so (504), not ask for TLS.
        auth_require_tls = not (
            listener.allow_plaintext_auth or listener.tls == "implicit" or listener.auth == "none"
        )
        excluded = ["PLAIN", "LOGIN"] if listener.auth == "none" else []

        proxy_timeout = listener.proxy_protocol.timeout if listener.proxy_protocol else None

        def factory() -> RelaySMTP:
            config = self.services.config()
            return RelaySMTP(
                handler,
                self.connections,
                proxy_protocol_timeout=proxy_timeout,
                hostname=config.server.hostname,  # else aiosmtpd calls getfqdn() per connection
                data_size_limit=config.server.max_message_size,
                tls_context=starttls,
                timeout=config.server.idle_timeout,
                data_timeout=config.server.data_timeout,
                session_timeout=config.server.session_timeout,
                auth_required=listener.auth == "required",
                auth_require_tls=auth_require_tls,
                auth_exclude_mechanism=excluded,
            )

        return factory

    async def start(self, bound: dict[str, list[socket.socket]] | None = None) -> None:
        """Listen as configured, or on the sockets already ``bound`` per listener name (acceptor processes)."""
        loop = asyncio.get_running_loop()
        for listener in self.services.config().server.listeners:
            tls = self.tls_context if listener.tls == "implicit" else None
            if bound is not None:
                for sock in bound[listener.name]:
                    self._servers.append(await loop.create_server(self._factory(listener), sock=sock, ssl=tls))
                continue
            server = await loop.create_server(
                self._factory(listener), host=listener.bind, port=listener.port, ssl=tls, reuse_address=True
            )
            self._servers.append(server)
            log.info("listening on %s:%d (%s, tls=%s, auth=%s%s)", listener.bind, listener.port, listener.name,
                     listener.tls, listener.auth, ", PROXY protocol" if listener.proxy_protocol else "")

    async def stop(self, grace: float) -> None:
        """Stop accepting; close idle sessions; give busy ones ``grace`` seconds to finish."""
        for server in self._servers:
            server.close()
        deadline = time.monotonic() + grace
        while self.connections and time.monotonic() < deadline:
            for connection in list(self.connections):
                connection.close_idle()
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            connection.abort()
        self._servers.clear()
