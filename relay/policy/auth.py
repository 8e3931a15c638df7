"""Credentials: password hashes, verification off the event loop, and stopping guessers.

Hashes are argon2id (argon2-cffi, what `hash-password` prints) or scrypt in the same PHC
string form (``$scrypt$ln=15,r=8,p=1$<salt>$<hash>``, verified with the standard library) for
operators who already hold scrypt hashes. A successful verification is remembered for a few
minutes under an HMAC of the credentials with a per-process random key, as Dovecot's auth
cache does: a smarthost opening a connection per message must not pay 50 ms of argon2 each
time, and the cache holds nothing that could be replayed from a memory dump of another
process.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import argon2

from relay.config.formats import parse_scrypt

if TYPE_CHECKING:
    from relay.config import Server
    from relay.policy.rates import RateCounter
    from relay.spool import WindowKey

log = logging.getLogger("relay.auth")

_argon2 = argon2.PasswordHasher()  # argon2id, RFC 9106 "second recommended" parameters


def hash_password(password: str) -> str:
    """A new salted argon2id hash for ``users.*.password_hash``."""
    return _argon2.hash(password)



def verify_password(password_hash: str, password: str) -> bool:
    """Constant-time check of a password against a stored hash (blocking: run in a thread)."""
    if password_hash.startswith("$argon2"):
        try:
            return _argon2.verify(password_hash, password)
        except argon2.exceptions.VerificationError:
            return False
        except argon2.exceptions.InvalidHashError:
            return False
    parsed = parse_scrypt(password_hash)
    if parsed is None:
        return False
    log_n, r, p, salt, expected = parsed
    try:
        actual = hashlib.scrypt(
            password.encode(), salt=salt, n=1 << log_n, r=r, p=p, dklen=len(expected), maxmem=1 << 28
        )
    except (ValueError, OverflowError, MemoryError):  # parameters OpenSSL refuses: never a match
        return False
    return hmac.compare_digest(actual, expected)


class Authenticator:
    """Checks a username and password against the configured users' hashes.

    ``hashes`` is a callable so a config reload changes credentials without a new object; a
    user may have several (``api_keys``: any one matches).
    """

    def __init__(self, hashes: Callable[[], Mapping[str, str | Sequence[str] | None]], cache_ttl: float = 300.0):
        self._hashes = hashes
        self._cache_ttl = cache_ttl
        self._cache_key = secrets.token_bytes(32)
        self._verified: dict[bytes, tuple[str, float]] = {}
        self._verifying: dict[bytes, asyncio.Future[bool]] = {}

    def _fingerprint(self, username: str, password: str, password_hash: str) -> bytes:
        material = "\0".join((username, password, password_hash)).encode()
        return hmac.new(self._cache_key, material, hashlib.sha256).digest()

    async def check(self, username: str, password: str) -> bool:
        """Whether ``password`` matches the user's hash, or one of its hashes (HTTP API keys)."""
        configured = self._hashes().get(username)
        candidates = [configured] if isinstance(configured, str) else list(configured or ())
        if not candidates:
            # Same cost as a real check, so a guesser cannot tell unknown users apart.
            await asyncio.to_thread(verify_password, _dummy_hash(), password)
            return False
        for password_hash in candidates:
            if await self._verify(username, password, password_hash):
                return True
        return False

    async def _verify(self, username: str, password: str, password_hash: str) -> bool:
        fingerprint = self._fingerprint(username, password, password_hash)
        cached = self._verified.get(fingerprint)
        now = time.monotonic()
        if cached and cached[1] > now:
            return True
        # A smarthost reconnecting after a restart logs in on all its connections at once:
        # one hash verification answers them all instead of one each (argon2 costs ~50 ms).
        running = self._verifying.get(fingerprint)
        if running is not None:
            return await asyncio.shield(running)
        running = self._verifying[fingerprint] = asyncio.ensure_future(asyncio.to_thread(verify_password, password_hash, password))
        try:
            ok = await asyncio.shield(running)
        finally:
            self._verifying.pop(fingerprint, None)
        if ok:
            if len(self._verified) > 10_000:
                self._verified.clear()
            self._verified[fingerprint] = (username, now + self._cache_ttl)
        return ok


@functools.cache
def _dummy_hash() -> str:
    return hash_password(secrets.token_urlsafe(16))


def unknown_user_hash() -> str:
    """A real hash to check an unknown name's password against, so it costs what a known name's does."""
    return _dummy_hash()


class RecentEvents:
    """Timestamps of recent events per key (failed logins); ``window`` is given per call so a
    reloaded setting applies at once."""

    def __init__(self, keep: int = 64, max_keys: int = 50_000, clock: Callable[[], float] = time.monotonic):
        self._keep = keep
        self._max_keys = max_keys
        self._clock = clock
        self._events: dict[str, list[float]] = {}

    def record(self, key: str, window: float) -> int:
        """Note one event; return how many happened within ``window`` seconds, this one included."""
        now = self._clock()
        recent = [t for t in self._events.get(key, ()) if now - t < window]
        recent.append(now)
        if len(self._events) >= self._max_keys and key not in self._events:
            self._forget_older_than(now - window)
        self._events[key] = recent[-self._keep :]
        return len(recent)

    def _forget_older_than(self, cutoff: float) -> None:
        self._events = {key: times for key, times in self._events.items() if times[-1] > cutoff}
        if len(self._events) >= self._max_keys:  # a flood of fresh keys: start over rather than grow
            self._events.clear()


@dataclass(frozen=True)
class GuardSettings:
    base_delay: float  # the first failure's reply waits this long; each further one doubles it
    window: float  # failures older than this are forgotten
    lockout_failures: int  # this many failures within the window lock the address or username
    lockout_duration: float
    max_delay: float = 30.0

    @classmethod
    def from_server(cls, server: Server) -> GuardSettings:
        return cls(server.auth_failure_delay, server.auth_failure_window, server.auth_lockout_failures, server.auth_lockout_duration)


# The guard's keys in the shared rate windows (several nodes on one database): failures count
# in windows of ``auth_failure_window``; a lock, and an address's recent login as a user, are
# *marks*: a window numbered by the time they end, which the rate store keeps until then.
FAILURES = "auth-fail:"
LOCKS = "auth-lock:"
LOGINS = "auth-good:"
_LOCK_GRAIN = 1.0  # a lock ends to the second
_LOGIN_GRAIN = 60.0  # a smarthost logging in ten times a second makes one mark a minute, not ten rows


def mark_slot(key: str, until: float, grain: float) -> WindowKey:
    """The window that says "``key`` holds until ``until``" (rounded up to ``grain`` seconds)."""
    return (key, grain, math.ceil(until / grain))


def marks(slots: Iterable[tuple[WindowKey, int]], prefix: str) -> dict[str, float]:
    """The latest end of each key's marks under ``prefix`` (the prefix taken off)."""
    found: dict[str, float] = {}
    for (key, grain, window), count in slots:
        if count > 0 and key.startswith(prefix):
            name = key[len(prefix):]
            found[name] = max(found.get(name, 0.0), window * grain)
    return found


def recent_failures(here: int, shared: float) -> int:
    """Failures to judge by: this process's exact count, or the shared windows' estimate
    (every node's failures, this one's included) when it says more."""
    return max(here, math.ceil(shared - 1e-9))


def should_lock(failures: int, locked_until: float | None, now: float, settings: GuardSettings) -> bool:
    """Whether the shared failure count alone locks a key: past the threshold, not locked now,
    and no lock of it lifted within the window (one node locks again only on a new failure)."""
    return failures >= settings.lockout_failures and (locked_until is None or locked_until <= now - settings.window)


class AuthGuard:
    """Failed logins counted per client address AND per username: a growing delay, then a lockout.

    Per address stops one machine guessing many passwords; per username stops a botnet
    guessing one account's password from many addresses. While locked, AUTH is refused
    without checking the password, so guesses teach nothing. So that a stranger cannot lock a
    team out of its own account, an address that logged in as a user recently is exempt from
    that user's lockout (not from its own address's).

    With ``shared`` (the main process's rate counter, when several nodes share a PostgreSQL
    spool) failures, locks and logins are also written to the shared rate windows, and what
    the other nodes wrote is taken in each time the counter is refreshed (every second): a
    guesser spread over nodes is judged on the failures of all of them.
    """

    def __init__(self, settings: Callable[[], GuardSettings], clock: Callable[[], float] = time.monotonic,
                 shared: RateCounter | None = None):
        self._settings = settings
        self._clock = clock
        self._failures = RecentEvents(clock=clock)
        self._locked_until: dict[str, float] = {}
        self._known_good: dict[tuple[str, str], float] = {}  # (address, username) → until
        self._shared = shared
        self._adopted = -1  # the shared counter's generation last taken in

    def locked_for(self, address: str, username: str) -> float | None:
        """Seconds left if this attempt is refused unheard (the address or the username is locked)."""
        self._adopt()
        now = self._clock()
        left = self._locked_until.get(f"address:{address}", 0.0) - now
        if self._known_good.get((address, username), 0.0) <= now:
            left = max(left, self._locked_until.get(f"user:{username}", 0.0) - now)
        return left if left > 0 else None

    def failed(self, address: str, username: str) -> float:
        """Note a failure; return how long to wait before answering it (lockouts start here)."""
        settings = self._settings()
        self._adopt()
        now = self._clock()
        recent = 0
        for key in (f"address:{address}", f"user:{username}"):
            count = self._failures.record(key, settings.window)
            if self._shared is not None:
                self._shared.add(FAILURES + key, settings.window, 1)
                count = recent_failures(count, self._shared.used(FAILURES + key, settings.window))
            recent = max(recent, count)
            if count >= settings.lockout_failures and self._locked_until.get(key, 0.0) <= now:
                self._lock(key, now + settings.lockout_duration)
        return min(settings.base_delay * 2 ** (recent - 1), settings.max_delay)

    def succeeded(self, address: str, username: str) -> None:
        settings = self._settings()
        if len(self._known_good) > 50_000:
            now = self._clock()
            self._known_good = {pair: until for pair, until in self._known_good.items() if until > now}
        until = self._clock() + max(settings.lockout_duration, settings.window)
        self._known_good[(address, username)] = until
        self._share(f"{LOGINS}{address} {username}", until, _LOGIN_GRAIN)

    def _lock(self, key: str, until: float) -> None:
        if len(self._locked_until) > 50_000:
            now = self._clock()
            self._locked_until = {k: t for k, t in self._locked_until.items() if t > now}
        self._locked_until[key] = until
        self._share(LOCKS + key, until, _LOCK_GRAIN)
        log.warning("%s locked out of AUTH for %.0fs after repeated failures", key.replace(":", " ", 1), until - self._clock())

    def _share(self, key: str, until: float, grain: float) -> None:
        """Write a mark for the other nodes, in the shared counter's (wall) time."""
        if self._shared is not None:
            self._shared.add_slot(mark_slot(key, self._shared.now() + until - self._clock(), grain), 1)

    def _adopt(self) -> None:
        """Take in the locks and logins the other nodes marked, once per refresh of the counter."""
        if self._shared is None or self._shared.generation == self._adopted:
            return
        self._adopted = self._shared.generation
        offset = self._clock() - self._shared.now()
        for key, until in marks(self._shared.slots(LOCKS), LOCKS).items():
            self._locked_until[key] = max(self._locked_until.get(key, 0.0), until + offset)
        for pair, until in marks(self._shared.slots(LOGINS), LOGINS).items():
            address, _, username = pair.partition(" ")
            self._known_good[(address, username)] = max(self._known_good.get((address, username), 0.0), until + offset)
        settings = self._settings()
        now = self._clock()
        for key in {slot[0][len(FAILURES):] for slot, _ in self._shared.slots(FAILURES) if slot[1] == settings.window}:
            # failures spread over nodes faster than they sync, which no node alone saw cross the line
            shared = recent_failures(0, self._shared.used(FAILURES + key, settings.window))
            if should_lock(shared, self._locked_until.get(key), now, settings):
                self._lock(key, now + settings.lockout_duration)
