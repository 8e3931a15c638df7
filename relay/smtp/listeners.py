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
