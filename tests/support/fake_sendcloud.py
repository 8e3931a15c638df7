"""A fake smtp.sendcloud.net for end-to-end tests of the relay.

It speaks SendCloud's SMTP dialect as documented (see shared/notes/sendcloud.md), so the
relay under test, running as a separate process, can deliver to it exactly as it would to
the real service:

- EHLO advertises ``PIPELINING``, ``SIZE 16000000``, ``8BITMIME`` and ``STARTTLS``; after
  STARTTLS it advertises ``AUTH LOGIN`` only (no PLAIN), as SendCloud does (``fake.pipelining = False``
  leaves PIPELINING out). No SMTPUTF8 or HELP is advertised.
- MAIL, RCPT and DATA are refused with ``530 5.7.0 Authentication required`` until AUTH
  succeeded; AUTH itself is refused until STARTTLS.
- The AUTH LOGIN username is the API_USER, optionally followed by ``#<label id>``; the
  password is the API_USER's API_KEY, else ``535 5.7.8 Authentication failed``.
- An accepted DATA is answered ``250 #<messageId>#Queued`` with a SendCloud-shaped,
  unique messageId.

Tests steer failures through ``rcpt_replies`` and ``data_reply`` (or, for replies that change
from one attempt to the next, ``rcpt_hook`` and ``data_hook``), simulate an outage with
``stop()``/``restart()``, and inspect what arrived through ``messages``, ``logins`` and
``wait_for()``.

The server is aiosmtpd's threaded ``Controller``: its own event loop in its own thread, so
the (synchronous) tests using it need no asyncio. Each start() builds a fresh Controller,
because ``Controller.stop()`` closes its event loop for good.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

HOSTNAME = "fake-smtp.sendcloud.test"
"""Name the fake greets with; given explicitly so aiosmtpd does not call getfqdn()."""

SIZE_LIMIT = 16_000_000
"""SendCloud's advertised ``SIZE``."""

AUTH_FAILED = "535 5.7.8 Authentication failed"

QUEUED_REPLY = re.compile(r"^#(?P<message_id>\d+_\d+_\d+_\d+\.sc-[0-9_]+-inbound)#Queued$")
"""Matches the text of SendCloud's DATA reply (after the ``250 ``): ``#<messageId>#Queued``."""

_message_numbers = itertools.count(1)


def make_message_id() -> str:
    """Return a new messageId shaped like SendCloud's.

    Example of a real one: ``1426390015358_15_6484_8661.sc-10_10_127_51-inbound``
    (millisecond timestamp, then numbers, then the inbound host). The second field is a
    process-wide counter here, so ids are unique within a test run.
    """
    return (
        f"{time.time_ns() // 1_000_000}_{next(_message_numbers)}"
        f"_{random.randint(1000, 9999)}_{random.randint(1000, 9999)}"
        ".sc-10_10_127_51-inbound"
    )


@dataclass
class ReceivedMessage:
    """One message the fake accepted (answered ``250 #id#Queued``)."""

    login: str
    """The AUTH LOGIN username as sent, e.g. ``acme_trigger`` or ``acme_trigger#12345``."""
    mail_from: str
    rcpt_tos: list[str]
    """Accepted recipients only, in RCPT order."""
    data: bytes
    """Raw DATA bytes exactly as received, after dot-unstuffing (CRLF line ends kept)."""
    message_id: str
    """The SendCloud messageId the fake replied with."""
    tls: bool
    """True if STARTTLS was in effect."""

    @property
    def email_ids(self) -> list[str]:
        """SendCloud's per-recipient emailIds: messageId + RCPT index + ``$`` + address.

        Webhook events carry these, so tests can check the ids the relay derives.
        """
        return [f"{self.message_id}{i}${rcpt}" for i, rcpt in enumerate(self.rcpt_tos)]


class _TrackedSMTP(SMTP):
    """aiosmtpd's SMTP session, registering its TCP transport while it is open.

    ``Controller.stop()`` only closes the listening socket and cancels tasks; the accepted
    sockets are left to the garbage collector, so a connected client would not notice the
    "outage". A handler hook cannot see the transport, hence this subclass.
    """

    def __init__(self, *args, transports: set[asyncio.BaseTransport], **kwargs):
        super().__init__(*args, **kwargs)
        self._transports = transports
        self._tcp_transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called a second time after STARTTLS with the TLS transport; keep the TCP one,
        # whose abort() closes the socket whatever state TLS is in.
        if self._tcp_transport is None:
            self._tcp_transport = transport
            self._transports.add(transport)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._transports.discard(self._tcp_transport)
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        self.event_handler.fake.reads.append(bytes(data))  # what each read got: pipelining shows here
        super().data_received(data)


class _Controller(Controller):
    """A Controller serving on a socket bound beforehand by FakeSendCloud.

    Binding in the caller's thread gives the real port at once when 0 was asked for (the
    stock Controller would then try to connect to port 0 to "trigger" the server) and sets
    SO_REUSEADDR so restart() can rebind the same port while old connections sit in
    TIME_WAIT.
    """

    def __init__(self, handler: _Handler, sock: socket.socket, **kwargs):
        host, port = sock.getsockname()
        super().__init__(handler, hostname=host, port=port, **kwargs)
        self._sock = sock
        self.transports: set[asyncio.BaseTransport] = set()

    def factory(self) -> SMTP:
        return _TrackedSMTP(self.handler, transports=self.transports, **self.SMTP_kwargs)

    def _create_server(self):
        return self.loop.create_server(self._factory_invoker, sock=self._sock)

    async def close_connections(self, timeout: float = 5.0) -> None:
        """Stop accepting, then abort every open connection and wait for their sockets to close."""
        assert self.server is not None
        self.server.close()
        aborted = list(self.transports)
        for transport in aborted:
            transport.abort()
        # abort() closes the socket in a callback on a later loop iteration.
        deadline = time.monotonic() + timeout
        while any(t.get_extra_info("socket").fileno() != -1 for t in aborted):
            if time.monotonic() > deadline:
                raise TimeoutError("fake SendCloud: connections did not close")
            await asyncio.sleep(0.01)


class _Handler:
    """aiosmtpd handler hooks implementing SendCloud's replies; state lives on the FakeSendCloud."""

    def __init__(self, fake: FakeSendCloud):
        self.fake = fake

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        # aiosmtpd always appends "250 HELP", which SendCloud does not advertise. With this
        # hook in place aiosmtpd leaves setting session.host_name to us.
        session.host_name = hostname
        lines = [line for line in responses if line[4:] != "HELP"]
        if self.fake.pipelining:
            lines.insert(1, "250-PIPELINING")
        lines[-1] = "250 " + lines[-1][4:]
        return lines

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        reply = self.fake.rcpt_hook(address) if self.fake.rcpt_hook else None
        reply = reply or self.fake.rcpt_replies.get(address, "250 OK")
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.fake.data_attempts += 1
        reply = self.fake.data_hook(list(envelope.rcpt_tos)) if self.fake.data_hook else None
        if reply or self.fake.data_reply is not None:
            return reply or self.fake.data_reply
        message_id = make_message_id()
        self.fake._record(
            ReceivedMessage(
                login=session.auth_data,
                mail_from=envelope.mail_from,
                rcpt_tos=list(envelope.rcpt_tos),
                data=envelope.original_content,
                message_id=message_id,
                tls=session.ssl is not None,
            )
        )
        if self.fake.data_delay:  # taken, not yet answered: the window where only the upstream knows
            self.fake.unanswered[session.host_name] += 1
            try:
                await asyncio.sleep(self.fake.data_delay)
            finally:
                self.fake.unanswered[session.host_name] -= 1
        return f"250 #{message_id}#Queued"


class FakeSendCloud:
    """A fake SendCloud SMTP endpoint on ``host:port``, for synchronous tests.

    ``accounts`` maps API_USER to API_KEY. Use as a context manager (start/stop), or call
    start()/stop()/restart() to simulate outages. Attributes tests may read or set:

    - ``port``: the bound port (a free one is picked when 0 is given; kept across restarts).
    - ``messages``: ReceivedMessage list, appended from the server thread.
    - ``rcpt_replies``: recipient address (as in RCPT TO, without brackets) -> full reply
      line; recipients not listed get ``250 OK``. Only 2xx replies accept the recipient.
    - ``data_reply``: when set, every DATA is answered with this line and nothing is recorded.
    - ``rcpt_hook(address)`` / ``data_hook(rcpt_tos)``: when set, called for every RCPT / DATA;
      a reply line they return is given instead (DATA: nothing recorded), None goes on as usual.
    - ``data_attempts``: how many DATA commands reached the fake, whatever it answered.
    - ``data_delay``: seconds between taking a message (it is in ``messages``) and answering
      its DATA, without holding other sessions up: a client killed meanwhile never learns
      that its message arrived. ``unanswered`` counts those messages by the client's EHLO name.
    - ``logins``: every AUTH username attempted (successful or not), in order.
    """

    def __init__(
        self, ca: trustme.CA, accounts: dict[str, str], host: str = "127.0.0.1", port: int = 0, starttls: bool = True
    ):
        """``starttls=False`` makes a plaintext endpoint (no STARTTLS; AUTH offered in the clear),
        for testing that the relay never sends mail or credentials where TLS is required."""
        self.host = host
        self.starttls = starttls
        self.pipelining = True  # a test sets False for an upstream that answers each command before the next
        self.reads: list[bytes] = []  # every chunk a session's read got (after TLS: the plaintext)
        self.port = port
        self.accounts = dict(accounts)
        self.messages: list[ReceivedMessage] = []
        self.rcpt_replies: dict[str, str] = {}
        self.data_reply: str | None = None
        self.rcpt_hook: Callable[[str], str | None] | None = None
        self.data_hook: Callable[[list[str]], str | None] | None = None
        self.data_attempts = 0
        self.data_delay = 0.0
        self.unanswered: Counter[str] = Counter()
        self.logins: list[str] = []
        self._tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(self._tls_context)
        self._arrived = threading.Condition()
        self._controller: _Controller | None = None

    def start(self) -> None:
        """Listen on ``host:port`` (SO_REUSEADDR) and serve in a background thread."""
        if self._controller is not None:
            raise RuntimeError("fake SendCloud already running")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        controller = _Controller(
            _Handler(self),
            sock,
            ready_timeout=10.0,
            server_hostname=HOSTNAME,
            ident="ESMTP fake SendCloud (Haraka)",
            tls_context=self._tls_context if self.starttls else None,
            auth_required=True,
            auth_require_tls=self.starttls,
            auth_exclude_mechanism=["PLAIN"],
            authenticator=self._authenticate,
            data_size_limit=SIZE_LIMIT,
            enable_SMTPUTF8=False,
        )
        try:
            controller.start()
        except BaseException:
            sock.close()
            raise
        self._controller = controller

    def stop(self) -> None:
        """Close the listening socket and every open connection; new connections are refused."""
        controller, self._controller = self._controller, None
        if controller is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(controller.close_connections(), controller.loop).result(timeout=10)
        finally:
            controller.stop()

    def restart(self) -> None:
        """Listen again on the same port, as when an upstream outage ends (stops first if running)."""
        self.stop()
        self.start()

    def wait_for(self, count: int, timeout: float = 20.0) -> list[ReceivedMessage]:
        """Block until at least ``count`` messages arrived and return them all.

        Raises AssertionError listing what did arrive if ``timeout`` seconds pass first.
        """
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.messages) >= count, timeout):
                arrived = [(m.login, m.mail_from, m.rcpt_tos, m.message_id) for m in self.messages]
                raise AssertionError(
                    f"fake SendCloud: expected {count} message(s) within {timeout}s, "
                    f"got {len(arrived)}: {arrived}; logins attempted: {self.logins}"
                )
            return list(self.messages)

    def __enter__(self) -> FakeSendCloud:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _record(self, message: ReceivedMessage) -> None:
        with self._arrived:
            self.messages.append(message)
            self._arrived.notify_all()

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: LoginPassword
    ) -> AuthResult:
        """aiosmtpd authenticator: ``api_user[#label digits]`` / ``api_key``.

        The username is stored as ``session.auth_data`` so handle_DATA can record it.
        """
        login = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        self.logins.append(login)
        api_user, has_label, label = login.partition("#")
        label_ok = not has_label or (label.isascii() and label.isdigit())
        if label_ok and api_user in self.accounts and self.accounts[api_user] == password:
            return AuthResult(success=True, auth_data=login)
        return AuthResult(success=False, handled=False, message=AUTH_FAILED)
