"""What must hold before the relay serves anything: TLS files that load, and every socket bound.

A port in use or a certificate that cannot be read stops the start with one line naming the
address or the file (:class:`StartupError`, printed as ``fatal: ...`` by `serve`), before any
port has accepted a connection: a smarthost must never see a relay that half started.
"""

from __future__ import annotations

import ssl
from typing import Protocol

from relay.config import Config
from relay.spool import SchemaMismatch, Spool
from relay.tls import ServerTLS, server_context


class StartupError(Exception):
    """The relay cannot start; the message names the address or file, on one line."""


class Bindable(Protocol):
    """A part that listens: binds its sockets (raising OSError), then serves on them."""

    async def bind(self) -> None: ...

    async def serve(self) -> None: ...

    async def stop(self, grace: float) -> None: ...


def tls_problem(config: Config) -> str | None:
    """Why ``server.tls`` cannot be loaded (unreadable file, key not the certificate's), or None.

    A self-signed pair that does not exist yet is no problem: `serve` makes it.
    """
    files = config.server.tls
    if files is None or (files.self_signed and not (files.cert.exists() and files.key.exists())):
        return None
    for key, path in (("server.tls.cert", files.cert), ("server.tls.key", files.key)):
        try:
            path.open("rb").close()
        except OSError as error:
            return f"{key}: cannot read {path}: {error.strerror}"
    try:
        server_context(files, config.server.hostname)
    except ssl.SSLError as error:
        return f"server.tls: {files.cert} and {files.key} do not load together: {error.reason or error}"
    return None


def server_tls(config: Config) -> ServerTLS | None:
    """The listeners' TLS, or :class:`StartupError` naming the file that stops it."""
    if config.server.tls is None:
        return None
    problem = tls_problem(config)
    if problem is not None:
        raise StartupError(problem)
    try:
        return ServerTLS(config.server.tls, config.server.hostname)
    except (OSError, ssl.SSLError) as error:  # e.g. the self-signed pair's folder is not writable
        raise StartupError(f"server.tls: {getattr(error, 'strerror', None) or error}") from None


async def open_spool_or_refuse(spool: Spool) -> None:
    """Open the spool; a shared one whose schema is not this relay's stops the start with what to do."""
    try:
        await spool.open()
    except SchemaMismatch as error:
        raise StartupError(str(error)) from None


async def bind_all(parts: list[Bindable]) -> None:
    """Bind every part's sockets before any serves; on a failure, close them all and say where."""
    try:
        for part in parts:
            await part.bind()
    except OSError as error:
        for part in parts:
            await part.stop(0)
        where = f" on {error.filename}" if error.filename else ""
        raise StartupError(f"cannot listen{where}: {error.strerror or error}") from None


async def serve_all(parts: list[Bindable]) -> None:
    for part in parts:
        await part.serve()
