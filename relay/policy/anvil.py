"""The counts every SMTP session asks about, kept once per relay: Postfix's anvil(8) server.

Connection limits (``server.max_connections``, ``max_connections_per_address``) and AUTH
failure tracking (:class:`relay.policy.auth.AuthGuard`) must hold for the whole relay: a client
spread over several acceptor processes must not get N times the connections or the guesses.
So one process owns them. The listener asks through :class:`SharedLimits`; in a one-process
relay that is :class:`LocalLimits` itself, in an acceptor process a thin client
(:class:`relay.process.acceptor.RemoteLimits`) that sends each question over the socketpair to the
main process's :class:`LocalLimits`, as Postfix's ``smtpd`` asks ``anvil`` over a local socket.

Each open connection is an entry in a ledger under a key the asking process chooses, so its
slot is freed exactly once whatever happens: ``release`` of a key never admitted is a no-op
(a session that went away while its question was on the way still sends it), and the main
process releases every key of an acceptor that died (:meth:`LocalLimits.release_owner`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Protocol

from relay.errors import SMTPReply
from relay.policy.auth import AuthGuard, GuardSettings
from relay.policy.checks import check_address_connections, check_total_connections

if TYPE_CHECKING:
    from relay.config import Config
    from relay.policy.rates import RateCounter


class Connections:
    """Open SMTP sessions, in total and per client address (None: not known yet, or never)."""

    def __init__(self) -> None:
        self.total = 0
        self.by_address: Counter[str] = Counter()

    def opened(self, address: str | None) -> None:
        self.total += 1
        self.also_from(address)

    def also_from(self, address: str | None) -> None:
        """The session's address became known (a PROXY header named it)."""
        if address is not None:
            self.by_address[address] += 1

    def closed(self, address: str | None) -> None:
        self.total -= 1
        if address is not None:
            self.by_address[address] -= 1
            if self.by_address[address] <= 0:
                del self.by_address[address]


class LimitsUnavailable(Exception):
    """The process that keeps the counts did not answer (gone, or too slow): refuse for now."""


class SharedLimits(Protocol):
    """What a session asks before the greeting, at a PROXY header, at close and around AUTH."""

    async def admit(self, connection: Hashable, address: str | None) -> SMTPReply | None:
        """Count a new connection (``address`` None: not known yet), or say why it may not open."""

    async def admit_address(self, connection: Hashable, address: str) -> SMTPReply | None:
        """A PROXY header named the client: count the admitted connection against it, or refuse."""

    def release(self, connection: Hashable) -> None:
        """The connection closed (admitted or not): free its slot. Needs no answer."""

    async def auth_locked_for(self, address: str, username: str) -> float | None:
        """Seconds left if this AUTH is refused unheard (see :meth:`AuthGuard.locked_for`)."""

    async def auth_failed(self, address: str, username: str) -> float:
        """Note a failed AUTH; how long to wait before answering it."""

    def auth_succeeded(self, address: str, username: str) -> None:
        """Note a successful AUTH (exempts the address from the user's lockout). Needs no answer."""


class LocalLimits:
    """The one connection table and AuthGuard of a relay; answers without ever suspending."""

    def __init__(self, config: Callable[[], Config], shared: RateCounter | None = None):
        self._config = config
        self.connections = Connections()  # this node's sockets only (docs/decisions.md, "Several nodes")
        # With ``shared`` (several nodes on one database) AUTH failures also count across nodes.
        self.auth = AuthGuard(lambda: GuardSettings.from_server(config().server), shared=shared)
        self._open: dict[Hashable, str | None] = {}  # connection key → the address it counts against

    async def admit(self, connection: Hashable, address: str | None) -> SMTPReply | None:
        server = self._config().server
        refusal = check_total_connections(self.connections.total, server)
        if refusal is None and address is not None:
            refusal = self._check_address(address)
        if refusal is None:
            self.connections.opened(address)
            self._open[connection] = address
        return refusal

    async def admit_address(self, connection: Hashable, address: str) -> SMTPReply | None:
        refusal = self._check_address(address)
        if refusal is None and connection in self._open:
            self.connections.also_from(address)
            self._open[connection] = address
        return refusal

    def _check_address(self, address: str) -> SMTPReply | None:
        config = self._config()
        trusted = config.user_for_address(address) is not None
        return check_address_connections(self.connections.by_address[address], trusted, config.server)

    def release(self, connection: Hashable) -> None:
        if connection in self._open:
            self.connections.closed(self._open.pop(connection))

    def release_owner(self, owner: Hashable) -> int:
        """Free every connection whose key is ``(owner, ...)``: an acceptor process that died."""
        keys = [key for key in self._open if isinstance(key, tuple) and key[0] == owner]
        for key in keys:
            self.release(key)
        return len(keys)

    async def auth_locked_for(self, address: str, username: str) -> float | None:
        return self.auth.locked_for(address, username)

    async def auth_failed(self, address: str, username: str) -> float:
        return self.auth.failed(address, username)

    def auth_succeeded(self, address: str, username: str) -> None:
        self.auth.succeeded(address, username)
