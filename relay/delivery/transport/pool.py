"""One account's kept upstream connections, by key, within ``upstream.connections_per_account``."""

from __future__ import annotations

from collections.abc import Callable

from relay.delivery.transport.base import Key
from relay.delivery.transport.capture import CaptureConnection
from relay.delivery.transport.smtp import Connection


class AccountPool:
    """One account's kept connections by key, at most ``size`` open.

    Each of the account's ``size`` workers holds at most one connection at a time, so only
    idle ones need limiting: when a key needs a new connection and the account is at its
    limit, the longest idle connection of another key is closed first.
    """

    def __init__(self, size: int, factory: Callable[[Key], Connection | CaptureConnection]):
        self._size = size
        self._factory = factory
        self._idle: list = []  # oldest first
        self._busy = 0

    async def acquire(self, key: Key):
        """A kept connection for ``key``, or a new one; counted busy only once it is handed out,
        so a factory or a close that raises leaves the count as it was."""
        for connection in reversed(self._idle):
            if connection.key == key:
                self._idle.remove(connection)
                self._busy += 1
                return connection
        if self._idle and self._busy + 1 + len(self._idle) > self._size:
            await self._idle.pop(0).close()
        connection = self._factory(key)
        self._busy += 1
        return connection

    def release(self, connection) -> None:
        self._busy -= 1
        self._idle.append(connection)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.close()
