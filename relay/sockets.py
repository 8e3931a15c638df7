"""Listening sockets bound before anything serves, and the aiohttp sites served on them.

A leaf the admin endpoint, the webhook receiver and the Web API listener share: each binds
(and loads its TLS files) in ``bind``, serves in ``serve`` and closes in ``stop``, so
:func:`relay.process.startup.bind_all` can bind every socket before any serves.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

from aiohttp import web

from relay.config import TLSFiles, split_host_port
from relay.tls import server_context


def bind_listening(listen: str, key: str) -> socket.socket:
    """A TCP socket bound to ``listen`` (``HOST:PORT``), not yet listening; until it is served a
    connection is refused. An OSError names the address and the config ``key`` that set it."""
    host, port = split_host_port(listen)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(error.errno, error.strerror, f"{listen} ({key})") from None
    return sock


class Site:
    """One aiohttp app on ``<section>.listen`` with optional ``<section>.tls``: bound first, served later."""

    def __init__(self, section: str):
        self.section = section
        self._socket: socket.socket | None = None
        self._tls: ssl.SSLContext | None = None
        self._runner: web.AppRunner | None = None

    @property
    def scheme(self) -> str:
        return "https" if self._tls else "http"

    async def bind(self, listen: str | None, tls: TLSFiles | None, hostname: str) -> None:
        """Load the TLS files and bind ``listen`` (nothing when it is unset); an OSError names what failed."""
        if not listen:
            return
        if tls is not None:
            try:
                self._tls = await asyncio.to_thread(server_context, tls, hostname)
            except (OSError, ssl.SSLError) as error:
                raise OSError(getattr(error, "errno", None), getattr(error, "strerror", None) or str(error),
                              f"{tls.cert} and {tls.key} ({self.section}.tls)") from None
        self._socket = bind_listening(listen, f"{self.section}.listen")

    async def serve(self, app: web.Application, shutdown_timeout: float = 60.0) -> bool:
        """Serve ``app`` on the bound socket; False when there is none (the section is off)."""
        if self._socket is None:
            return False
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout)
        await self._runner.setup()
        await web.SockSite(self._runner, self._socket, ssl_context=self._tls).start()
        return True

    async def stop(self) -> None:
        """Stop listening; requests in flight get the runner's ``shutdown_timeout`` to finish."""
        if self._runner is not None:
            await self._runner.cleanup()  # closes the socket too
            self._runner = None
        elif self._socket is not None:
            self._socket.close()
        self._socket = None
