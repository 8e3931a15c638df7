"""aiosmtpd's SMTP protocol with what a handler hook cannot do (see :class:`RelaySMTP`)."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import re
import warnings
from typing import Protocol

from aiosmtpd.smtp import (
    SMTP,
    Session,
    TLSSetupException,
    syntax,
)

from relay.config import Listener
from relay.errors import SMTPReply
from relay.observe import metrics
from relay.observe.logs import event
from relay.policy.checks import check_address_chars, check_helo
from relay.smtp.data import read_message

log = logging.getLogger("relay.smtpd")

_TOO_BIG = SMTPReply(552, "5.3.4", "Message size exceeds fixed maximum message size")
_TOO_MANY_ERRORS = SMTPReply(421, "4.7.0", "Too many errors")
_NOT_RECOGNISED = SMTPReply(502, "5.5.2", "Error: command not recognized")
_UNRECOGNISED_PREFIX = '500 Error: command "'  # aiosmtpd's reply, which echoes the line


class SessionEvents(Protocol):
    """What the protocol tells its handler (:class:`relay.smtp.session.ListenerHandler`) beyond aiosmtpd's hooks."""

    listener: Listener

    async def admit(self, server: RelaySMTP) -> SMTPReply | None: ...

    def connected(self, transport: asyncio.Transport) -> None: ...

    def release(self, server: RelaySMTP) -> None: ...

    def expired(self, server: RelaySMTP, reply: SMTPReply) -> None: ...

    def refused_by_aiosmtpd(self, server: RelaySMTP, stage: str, reply: SMTPReply) -> None: ...

# aiosmtpd logs every command line at INFO, AUTH PLAIN's base64 credentials included: keep
# its logger at WARNING. Two of its warnings repeat on every session and say nothing: AUTH
# without STARTTLS (on our implicit-TLS listeners TLS is up; on `allow_plaintext_auth` ones it
# is the operator's explicit choice) and its own use of the deprecated Session.login_data.
# Its "unrecognised: LINE" warning is dropped too: after a 538 the "command" is the client's
# base64 password line (RelaySMTP.push logs the verb instead, when it is a known one).
_AIOSMTPD_NOISE = ("auth_require_tls == False", "Session.login_data is deprecated", "unrecognised: ")
_aiosmtpd_log = logging.getLogger("mail.log")
_aiosmtpd_log.setLevel(logging.WARNING)
_aiosmtpd_log.addFilter(lambda record: not any(noise in record.getMessage() for noise in _AIOSMTPD_NOISE))
warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")



# SMTP verbs this relay does not implement but a real client or MTA may send (RFC 5321's
# obsolete ones, registered extensions, Postfix's and Exchange's): the only unrecognised
# commands whose verb is logged. Anything else may be a secret (a password line after 538).
KNOWN_VERBS = frozenset({
    "ATRN", "BDAT", "BURL", "ETRN", "LHLO", "ONEX", "SAML", "SEND", "SOML", "TURN", "VERB",
    "X-EXPS", "X-LINK2STATE", "XCLIENT", "XEXCH50", "XFORWARD", "XUSR",
})


def loggable_verb(command: str) -> str | None:
    """What of an unrecognised command may be logged: a known verb's first 16 characters, else nothing."""
    return command[:16] if command in KNOWN_VERBS else None


# Enhanced status codes (RFC 2034/3463) for aiosmtpd's replies that have none, by reply code;
# other codes take their class's ``X.0.0``. The greeting, EHLO/HELO replies (RFC 2034 3),
# 334 and 354 are 2xx/3xx and left alone: only errors and the few 2xx below are completed.
_ENHANCED_BY_CODE = {
    421: "4.3.0", 451: "4.3.0", 454: "4.7.0", 500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1",
    504: "5.5.4", 530: "5.7.0", 550: "5.0.0", 552: "5.3.4", 553: "5.1.3", 554: "5.7.0", 555: "5.5.4",
}
_PLAIN_SUCCESSES = {
    "250 OK": "250 2.0.0 OK",
    "221 Bye": "221 2.0.0 Bye",
    "220 Ready to start TLS": "220 2.0.0 Ready to start TLS",
    "252 Cannot VRFY user, but will accept message and attempt delivery":
        "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery",
}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")


def with_enhanced_code(status: str) -> str:
    """``status`` with an enhanced status code, when it is an error or a known plain success without one."""
    if status in _PLAIN_SUCCESSES:
        return _PLAIN_SUCCESSES[status]
    if status[:1] not in ("4", "5") or len(status) < 4 or status[3] not in " -" or _HAS_ENHANCED.match(status):
        return status
    enhanced = _ENHANCED_BY_CODE.get(int(status[:3]), f"{status[0]}.0.0")
    return f"{status[:4]}{enhanced} {status[4:]}"


def is_error(status: str) -> bool:
    """A 4xx or 5xx reply: what ``server.max_errors`` counts."""
    return status[:1] in ("4", "5")


# Replies after which the client waits (3xx: 334, 354; 220: the greeting, STARTTLS's go-ahead)
# or the connection ends (221, 421, aiosmtpd's 502 goodbye): never held back.
_SENT_AT_ONCE = ("3", "220", "221", "421", "502 5.5.1 Too many unrecognized")


def may_hold(status: str, command_waiting: bool) -> bool:
    """Whether a reply may wait to go out with the next one (RFC 2920 3.1: replies to a
    pipelined group may be sent together). Only while the client's next command is already
    read, so a client never waits for a reply that is held: the next reply sends both."""
    return command_waiting and not status.startswith(_SENT_AT_ONCE)


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"  # RFC 5322 atext
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"


_connection_keys = itertools.count()  # this process's names for its connections in the limits


@functools.cache
def hook_names(cls: type) -> list[str]:
    """What aiosmtpd looks for in dir() of its protocol and of the handler, for every connection."""
    prefixes = ("smtp_", "auth_", "handle_")
    return sorted({name for klass in cls.__mro__ for name in vars(klass) if name.startswith(prefixes)})


class RelaySession(Session):
    """aiosmtpd's Session with ``login_data`` a plain attribute: its deprecated property logs a
    warning (a record made, then dropped by our filter) on every successful AUTH."""

    login_data = None


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
    - STARTTLS runs on the event loop's TLS layer (``smtp_STARTTLS``), not aiosmtpd's own;
      a failed handshake is one log line, not a traceback.
    - Control characters in a HELO/EHLO argument or a MAIL/RCPT argument are refused before
      aiosmtpd parses them (its address parser turns some into something else, and its HELO
      keeps a bare CR that would reach the Received header): ``smtp_HELO`` ... ``smtp_RCPT``.
    - ``push`` sees every reply: it adds the enhanced status codes aiosmtpd's lack, replaces
      the "unrecognised" reply that echoes the line (and logs the verb only when it is a
      known one: the line may be a password), and counts errors for ``server.max_errors``
      (``421 4.7.0`` and the connection closed once they are spent, as Postfix's
      ``smtpd_hard_error_limit``).
    """

    # aiosmtpd's own replies, as we send them instead (its lack the enhanced status codes of
    # RFC 3463), with the command they refuse when they end a transaction (None: they don't).
    _OWN_REPLIES: dict[str, tuple[SMTPReply, str | None]] = {
        "552 Error: message size exceeds fixed maximum message size": (_TOO_BIG, "MAIL"),
        "530 Must issue a STARTTLS command first": (SMTPReply(530, "5.7.0", "Must issue a STARTTLS command first"), None),
        # No SMTPUTF8 (SendCloud does not offer it): say why a non-ASCII address is refused.
        "500 Error: strict ASCII mode": (
            SMTPReply(553, "5.6.7", "Non-ASCII commands and addresses need SMTPUTF8, which SendCloud does not support"), None
        ),
        "501 Error: SMTPUTF8 disabled": (SMTPReply(555, "5.6.7", "SMTPUTF8 is not supported (SendCloud does not offer it)"), None),
        # HELP, VRFY, MAIL, RCPT or DATA before AUTH on a listener that requires it
        "530 5.7.0 Authentication required": (SMTPReply(530, "5.7.0", "Authentication required"), "command"),
    }

    def __init__(
        self,
        handler: SessionEvents,
        connections: set[RelaySMTP],
        *,
        data_timeout: float,
        session_timeout: float,
        max_errors: int,
        max_line_length: int,
        **kwargs,
    ):
        super().__init__(handler, **kwargs)
        self._connections = connections
        self.client_ip = ""
        self.connection_key = next(_connection_keys)
        self._admitted = False
        self._released = False  # the limits were told this connection is gone
        self._data_timeout = data_timeout
        self._session_timeout = session_timeout
        self._session_timer: asyncio.TimerHandle | None = None
        self._max_errors = max_errors
        self._errors = 0  # error replies so far in this connection (STARTTLS does not reset it)
        self._max_line_length = max_line_length  # of a DATA line, without its CRLF
        self._idle_deadline = 0.0  # when the idle (or DATA) timer closes the connection (``_reset_timeout``)
        self._unsent: list[bytes] = []  # replies held back to go out in one write (``push``)
        self._corked = False  # a multi-line reply is being pushed line by line

    def _create_session(self) -> RelaySession:
        return RelaySession(self.loop)

    def __dir__(self) -> list[str]:
        # aiosmtpd's __init__ looks for smtp_*, auth_* and handle_* methods in dir() of this
        # object and of the handler on every connection (inspect.getmembers); listing only
        # those names, once per class, cuts the ~120 µs it took per connection to ~35 µs.
        return hook_names(type(self))

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
        if self.transport is None or self.transport.is_closing():
            return  # closed after a 421: nothing more goes out
        if not isinstance(status, str):  # a 334 challenge: the client waits for it
            self._unsent.append(status + b"\r\n")
            self._flush()
            await self._writer.drain()
            return
        if status.startswith(_UNRECOGNISED_PREFIX):
            verb = loggable_verb(status[len(_UNRECOGNISED_PREFIX):].partition('"')[0])
            event(log, None, {"client": self.client_ip, "listener": self.event_handler.listener.name,
                              "command": verb or "-"}, "unrecognised command", logging.WARNING)
            status = str(_NOT_RECOGNISED)
        own = self._OWN_REPLIES.get(status)
        if own is not None:
            reply, stage = own
            status = str(reply)
            if stage is not None:
                self.event_handler.refused_by_aiosmtpd(self, stage, reply)
        status = with_enhanced_code(status)
        if is_error(status):
            if self._errors >= self._max_errors:
                await self._too_many_errors()
                return
            self._errors += 1
        self._unsent.append(status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii") + b"\r\n")
        if self._corked or may_hold(status, b"\n" in self._reader._buffer):  # type: ignore[attr-defined]
            return
        self._flush()
        await self._writer.drain()

    def _flush(self) -> None:
        """Write the replies held back, in one write: one TLS record and one system call."""
        if self._unsent and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._unsent))
        self._unsent.clear()

    async def _too_many_errors(self) -> None:
        """``421`` and close, and stop: a command the client pipelined after it is never run.

        The commands already read are dropped with the connection: a cancelled task runs on
        until it waits, and a buffered pipelined transaction would need no wait to be spooled.
        """
        self.event_handler.expired(self, _TOO_MANY_ERRORS)
        self._unsent.append(f"{_TOO_MANY_ERRORS}\r\n".encode())
        self._flush()
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()
        self.transport.close()

    async def _refuse(self, stage: str, refusal: SMTPReply | None) -> bool:
        """Say ``refusal``, if there is one, and log it as a refusal of ``stage``."""
        if refusal is None:
            return False
        self.event_handler.refused_by_aiosmtpd(self, stage, refusal)
        await self.push(str(refusal))
        return True

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        if not await self._refuse("HELO", check_helo(hostname or "")):
            await super().smtp_HELO(hostname)

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        """aiosmtpd's EHLO pushes each of its ~7 lines on its own: here they go out in one write."""
        if await self._refuse("EHLO", check_helo(hostname or "")):
            return
        self._corked = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._corked = False
        if not may_hold("250", b"\n" in self._reader._buffer):  # type: ignore[attr-defined]
            self._flush()
            await self._writer.drain()

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if not await self._refuse("MAIL", check_address_chars(arg or "", "MAIL")):
            await super().smtp_MAIL(arg)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if not await self._refuse("RCPT", check_address_chars(arg or "", "RCPT")):
            await super().smtp_RCPT(arg)

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
            event(log, None, {"client": self.client_ip, "listener": self.event_handler.listener.name},
                  f"STARTTLS handshake failed: {error.__class__.__name__}: {error}", logging.WARNING)
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

    @syntax("QUIT")
    async def smtp_QUIT(self, arg: str) -> None:
        """The connection's slot in the limits is given back before the ``221``: a client that
        reconnects at once, through another acceptor, finds it free."""
        if not arg:
            self._release()
        await super().smtp_QUIT(arg)

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self.event_handler.release(self)

    def connection_lost(self, error) -> None:
        self._release()  # admitted or not, or still being asked about
        if self._session_timer is not None:
            self._session_timer.cancel()
        if self in self._connections:
            self._connections.discard(self)
            metrics.SESSIONS.labels(self.event_handler.listener.name).dec()
        super().connection_lost(error)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd's idle timer, restarted by every command, without a new timer each time.

        aiosmtpd cancels its timer and makes a new one per command (under uvloop a libuv timer
        made and closed each time); here a command only moves the deadline, and the one timer,
        when it fires early, waits again for the rest. A shorter deadline (DATA's bound back
        to the idle one) takes a new timer.
        """
        self._idle_deadline = self.loop.time() + (duration or self._timeout_duration)
        timer = self._timeout_handle
        if timer is None or timer.cancelled() or timer.when() > self._idle_deadline:
            if timer is not None:
                timer.cancel()
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._timeout_cb)

    def _timeout_cb(self) -> None:
        """aiosmtpd's idle (and our DATA) timer: say why before closing, as Postfix does."""
        if self.loop.time() < self._idle_deadline:  # a command came since this timer was set
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._timeout_cb)
            return
        self._expire("timeout exceeded")

    def _expire(self, why: str) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        reply = SMTPReply(421, "4.4.2", f"{self.hostname} Error: {why}")
        self.event_handler.expired(self, reply)
        self._unsent.append(f"{reply}\r\n".encode())
        self._flush()
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
                content = await read_message(self._reader, self.data_size_limit, self._max_line_length + 2)
            except asyncio.CancelledError:  # the client went away during DATA
                self._writer.close()
                raise
            if isinstance(content, SMTPReply):  # the refusal of a message read to its end
                self.event_handler.refused_by_aiosmtpd(self, "DATA", content)
                self._set_post_data_state()
                await self.push(str(content))
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
        self._unsent.append(b"421 4.3.2 Service shutting down, try again later\r\n")
        self._flush()
        self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _StartedTLS:
    """What aiosmtpd reads of its own ``SSLProtocol`` after STARTTLS: its ``_extra`` info."""

    def __init__(self, transport: asyncio.Transport):
        self._extra = {key: transport.get_extra_info(key) for key in ("sslcontext", "peercert", "cipher", "compression", "ssl_object")}
