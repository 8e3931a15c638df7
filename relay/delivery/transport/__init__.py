"""The upstream hop: ``base`` (what a transaction is and returns), ``smtp`` (kept aiosmtplib
connections), ``data`` (the DATA stream), ``capture`` (files instead of SendCloud), ``pool``
(an account's connections by key)."""

from __future__ import annotations

from relay.config import Account, Upstream
from relay.delivery.transport.base import (
    Key,
    Result,
    TLSContexts,
    TLSRequired,
    Transaction,
)
from relay.delivery.transport.capture import CaptureConnection
from relay.delivery.transport.pool import AccountPool
from relay.delivery.transport.smtp import Connection

__all__ = ["AccountPool", "Key", "Result", "TLSContexts", "TLSRequired", "Transaction", "open_connection"]


def open_connection(
    upstream: Upstream, account: Account, key: Key, local_hostname: str, tls: TLSContexts | None
) -> Connection | CaptureConnection:
    """A connection of the configured kind for one key of an account's pool."""
    if upstream.kind == "capture":
        return CaptureConnection(upstream, account, key)
    assert tls is not None, "network upstreams need TLS contexts"
    return Connection(upstream, account, key, local_hostname, tls)
