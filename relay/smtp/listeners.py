"""The listening sockets of one process, and the sessions they opened, for start and orderly shutdown."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Callable

from relay.config import Listener
from relay.smtp.protocol import RelaySMTP
from relay.smtp.session import ListenerHandler, Services

log = logging.getLogger("relay.smtpd")

_GOODBYE = 0.5  # seconds a session told 421 at shutdown has to hang up before it is cut


def bind_error(error: OSError, listener: Listener) -> OSError:
    """``error`` with the listener's address as its ``filename``, which the start-up message names."""
    return OSError(error.errno, error.strerror, f"{listener.bind}:{listener.port} (listener {listener.name})")


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
        # Mail needs AUTH there and AUTH needs TLS: every command but EHLO, NOOP, STARTTLS and
        # QUIT gets "530 5.7.0 Must issue a STARTTLS command first" until TLS is up (RFC 3207 4).
        require_starttls = listener.tls == "starttls" and listener.auth == "required" and not listener.allow_plaintext_auth

        proxy_timeout = listener.proxy_protocol.timeout if listener.proxy_protocol else None

        def factory() -> RelaySMTP:
            config = self.services.config()
            return RelaySMTP(
                handler,
                self.connections,
                proxy_protocol_timeout=proxy_timeout,
                hostname=config.server.hostname,  # else aiosmtpd calls getfqdn() per connection
                ident="ESMTP",  # the greeting names no software or version: "220 <hostname> ESMTP"
                data_size_limit=config.server.max_message_size,
                tls_context=starttls,
                timeout=config.server.idle_timeout,
                data_timeout=config.server.data_timeout,
                session_timeout=config.server.session_timeout,
                max_errors=config.server.max_errors,
                max_line_length=config.server.max_line_length,
                require_starttls=require_starttls,
                auth_required=listener.auth == "required",
                auth_require_tls=auth_require_tls,
                auth_exclude_mechanism=excluded,
            )

        return factory

    async def bind(self) -> None:
        """Bind every configured listener without serving yet; OSError names the address that failed."""
        loop = asyncio.get_running_loop()
        for listener in self.services.config().server.listeners:
            tls = self.tls_context if listener.tls == "implicit" else None
            try:
                server = await loop.create_server(
                    self._factory(listener), host=listener.bind, port=listener.port, ssl=tls,
                    reuse_address=True, start_serving=False,
                )
            except OSError as error:
                raise bind_error(error, listener) from None
            self._servers.append(server)

    async def serve(self) -> None:
        """Serve on the sockets :meth:`bind` made."""
        for server, listener in zip(self._servers, self.services.config().server.listeners, strict=True):
            await server.start_serving()
            log.info("listening on %s:%d (%s, tls=%s, auth=%s%s)", listener.bind, listener.port, listener.name,
                     listener.tls, listener.auth, ", PROXY protocol" if listener.proxy_protocol else "")

    async def start(self, bound: dict[str, list[socket.socket]]) -> None:
        """Serve on the sockets already ``bound`` per listener name (acceptor processes)."""
        loop = asyncio.get_running_loop()
        for listener in self.services.config().server.listeners:
            tls = self.tls_context if listener.tls == "implicit" else None
            for sock in bound[listener.name]:
                self._servers.append(await loop.create_server(self._factory(listener), sock=sock, ssl=tls))

    async def stop(self, grace: float) -> None:
        """Stop accepting; close idle sessions; give busy ones ``grace`` seconds to finish.

        Returns as soon as no session is in a transaction: a session told ``421`` gets
        ``_GOODBYE`` seconds to hang up, then is cut, since closing a TLS connection otherwise
        waits for the client's close_notify (asyncio's 30 s SSL shutdown timeout).
        """
        for server in self._servers:
            server.close()
        self._servers.clear()
        now = time.monotonic()
        deadline = now + grace
        told: dict[RelaySMTP, float] = {}  # sessions told 421, and when
        while self.connections and now < deadline:
            for connection in list(self.connections):
                if not connection.in_transaction:
                    connection.close_idle()
                    told.setdefault(connection, now)
            if all(connection in told and now - told[connection] >= _GOODBYE for connection in self.connections):
                break
            await asyncio.sleep(0.05)
            now = time.monotonic()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
