"""The SMTP front end: a thin adapter from aiosmtpd's hooks to policy, routing and the spool.

One :class:`ListenerHandler` per configured listener; the decisions live in
:mod:`relay.policy` and :mod:`relay.routing`, and this module only asks them and answers.
``handle_DATA`` turns the transaction into a :class:`~relay.rewrite.pipeline.Submission` and
hands it to :class:`relay.intake.Intake` (prepare, rate budgets, spool: the group commit's
fsync), the intake HTTP submission uses too; the ``250`` is never sent for a message that is
not on disk.
"""

from __future__ import annotations

import inspect
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiosmtpd.proxy_protocol import ProxyData
from aiosmtpd.smtp import (
    Envelope,
    Session,
    TLSSetupException,
)

from relay.config import Config, Listener
from relay.errors import SMTPReply
from relay.intake import Intake, Refused
from relay.observe import metrics
from relay.observe.logs import event
from relay.policy.anvil import LimitsUnavailable, SharedLimits
from relay.policy.auth import Authenticator
from relay.policy.checks import check_relay, check_sender, identify, limits_unavailable
from relay.policy.rates import PersistentRates
from relay.policy.suppression import SuppressionCache
from relay.rewrite.pipeline import Preparer, Submission
from relay.smtp.protocol import RelaySMTP, hook_names
from relay.smtp.sasl import SASLMechanisms
from relay.spool import NewMessage

log = logging.getLogger("relay.smtpd")


@dataclass
class Services:
    """What every listener shares; ``config`` is a callable so a reload is seen at once."""

    config: Callable[[], Config]
    # Makes an accepted message durable (the spool's group commit, fsynced) and hands it on
    # to delivery; returns only then. Raises when the message is not on disk.
    intake: Callable[[NewMessage], Awaitable[None]]
    authenticator: Authenticator
    limits: SharedLimits  # connection counts and AUTH failures: one table per relay (relay.policy.anvil)
    rates: PersistentRates  # shared with other processes through the spool database
    preparer: Preparer
    suppressions: SuppressionCache | None = None  # the suppression list, refreshed in the background



class ListenerHandler(SASLMechanisms):
    def __init__(self, listener: Listener, services: Services):
        self.listener = listener
        self.services = services
        self.intake = Intake(services.config, services.preparer, services.rates, services.intake, services.suppressions)

    def __dir__(self) -> list[str]:
        return hook_names(type(self))  # see RelaySMTP.__dir__

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
            metrics.rejected(self.listener.name, None, metrics.reason_for(refusal))
            event(log, "NOQUEUE", {"reject": "CONNECT", "client": server.client_ip, "listener": self.listener.name},
                  str(refusal), logging.WARNING)
        return refusal

    def release(self, server: RelaySMTP) -> None:
        self.services.limits.release(server.connection_key)

    def expired(self, server: RelaySMTP, reply: SMTPReply) -> None:
        metrics.rejected(self.listener.name, None, metrics.reason_for(reply))
        event(log, None, {"client": server.client_ip, "listener": self.listener.name}, str(reply))

    # -- identity ---------------------------------------------------------------------------

    def _user(self, server: RelaySMTP, session: Session) -> str | None:
        authenticated = session.auth_data if session.authenticated else None
        return identify(self.services.config(), self.listener, authenticated, server.client_ip)

    def _refused(self, server: RelaySMTP, stage: str, user: str | None, reply: SMTPReply, **fields) -> None:
        """One ``NOQUEUE`` line and one count per refused command: how a refused transaction ends."""
        reason = metrics.reason_for(reply)
        metrics.rejected(self.listener.name, user, reason)
        event(log, "NOQUEUE", {
            "reject": stage, "client": server.client_ip, "listener": self.listener.name, "user": user or "-",
            **fields, "reason": reason,
        }, str(reply))

    def refused_by_aiosmtpd(self, server: RelaySMTP, stage: str, reply: SMTPReply) -> None:
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
        return ehlo_reply(responses, offer_auth=self.listener.auth != "none")

    # aiosmtpd's __init__ asks inspect.signature() of this hook on every connection (to tell its
    # old 4-argument form from the 5-argument one): ~40 µs, ~12 µs with the signature kept here.
    handle_EHLO.__signature__ = inspect.signature(handle_EHLO)

    # -- the transaction --------------------------------------------------------------------

    async def handle_MAIL(self, server, session, envelope: Envelope, address: str, mail_options):
        user = self._user(server, session)
        if user is not None:
            refusal = check_sender(user, self.services.config().users[user], _reverse_path(address))
            if refusal:
                self._refused(server, "MAIL", user, refusal, **{"from": address})
                return str(refusal)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server, session, envelope: Envelope, address: str, rcpt_options):
        user = self._user(server, session)
        refusal = self.intake.recipient_refusal(self.services.config(), user, server.client_ip, address,
                                                len(envelope.rcpt_tos))
        if refusal:
            self._refused(server, "RCPT", user, refusal, **{"from": envelope.mail_from, "to": address})
            return str(refusal)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope: Envelope):
        started = time.monotonic()
        user = self._user(server, session)
        if user is None:  # the user was removed by a reload mid-session
            refusal = check_relay(None, envelope.rcpt_tos[0])
            self._refused(server, "DATA", None, refusal, **{"from": envelope.mail_from})
            return str(refusal)
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
            message = await self.intake.accept(submission, started)
        except Refused as refused:
            self._refused(server, "DATA", user, refused.reply, **refused.fields)
            return str(refused.reply)
        return f"250 2.0.0 Ok: queued as {message.id}"

    async def handle_exception(self, error: Exception) -> str:
        """A bug must cost the client a retry, never a 500 that reads as a permanent refusal."""
        if isinstance(error, TLSSetupException):  # logged in one line by RelaySMTP.smtp_STARTTLS; no reply
            return ""
        log.exception("SMTP session error on listener %s", self.listener.name)
        return "451 4.3.0 Internal error, try again later"


def ehlo_reply(lines: list[str], offer_auth: bool) -> list[str]:
    """aiosmtpd's EHLO lines with PIPELINING (RFC 2920: aiosmtpd reads commands line by line,
    so pipelined ones are answered in order) and ENHANCEDSTATUSCODES (RFC 2034: RelaySMTP.push
    completes aiosmtpd's replies), in Postfix's order; without HELP (not an extension: neither
    SendCloud nor Postfix lists it), and without AUTH where none is offered."""
    hostname, *keywords = (line[4:] for line in lines)
    kept = [word for word in keywords if word != "HELP" and (offer_auth or not word.startswith("AUTH"))]
    keywords = [hostname, "PIPELINING", *kept, "ENHANCEDSTATUSCODES"]
    return [f"250-{keyword}" for keyword in keywords[:-1]] + [f"250 {keywords[-1]}"]


def _reverse_path(address: str) -> str:
    """aiosmtpd keeps the null sender as ``<>`` (an empty string would read as "no MAIL yet")."""
    return "" if address == "<>" else address


