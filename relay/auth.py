"""Credentials: password hashes, verification off the event loop, and slowing down guessers.

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
import base64
import functools
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping

import argon2

_argon2 = argon2.PasswordHasher()  # argon2id, RFC 9106 "second recommended" parameters


def hash_password(password: str) -> str:
    """A new salted argon2id hash for ``users.*.password_hash``."""
    return _argon2.hash(password)


def is_supported_hash(value: str) -> bool:
    return value.startswith("$argon2id$") or _parse_scrypt(value) is not None


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _parse_scrypt(value: str) -> tuple[int, int, int, bytes, bytes] | None:
    parts = value.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != "scrypt":
        return None
    try:
        params = dict(item.split("=", 1) for item in parts[2].split(","))
        parsed = int(params["ln"]), int(params["r"]), int(params["p"]), _b64decode(parts[3]), _b64decode(parts[4])
    except (KeyError, ValueError):
        return None
    log_n, r, p, _, expected = parsed
    if log_n < 1 or r < 1 or p < 1 or not expected:
        return None
    return parsed


def verify_password(password_hash: str, password: str) -> bool:
    """Constant-time check of a password against a stored hash (blocking: run in a thread)."""
    if password_hash.startswith("$argon2"):
        try:
            return _argon2.verify(password_hash, password)
        except argon2.exceptions.VerificationError:
            return False
        except argon2.exceptions.InvalidHashError:
            return False
    parsed = _parse_scrypt(password_hash)
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

    ``hashes`` is a callable so a config reload changes credentials without a new object.
    """

    def __init__(self, hashes: Callable[[], Mapping[str, str | None]], cache_ttl: float = 300.0):
        self._hashes = hashes
        self._cache_ttl = cache_ttl
        self._cache_key = secrets.token_bytes(32)
        self._verified: dict[bytes, tuple[str, float]] = {}
        self._verifying: dict[bytes, asyncio.Future[bool]] = {}

    def _fingerprint(self, username: str, password: str, password_hash: str) -> bytes:
        material = "\0".join((username, password, password_hash)).encode()
        return hmac.new(self._cache_key, material, hashlib.sha256).digest()

    async def check(self, username: str, password: str) -> bool:
        password_hash = self._hashes().get(username)
        if not password_hash:
            # Same cost as a real check, so a guesser cannot tell unknown users apart.
            await asyncio.to_thread(verify_password, _dummy_hash(), password)
            return False
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


class FailureDelay:
    """Failed logins per client address raise the delay before the ``535`` reply.

    The delay doubles with each recent failure (capped), so a script guessing passwords
    slows to a crawl while a person who mistyped once barely notices.
    """

    def __init__(self, base_delay: float, window: float = 600.0, max_delay: float = 30.0):
        self.base_delay = base_delay
        self._window = window
        self._max_delay = max_delay
        self._failures: dict[str, list[float]] = {}

    def record_failure(self, address: str) -> float:
        """Note a failure; return how long to wait before answering it."""
        now = time.monotonic()
        recent = [t for t in self._failures.get(address, []) if now - t < self._window]
        recent.append(now)
        self._failures[address] = recent[-32:]
        if len(self._failures) > 50_000:
            self._failures = {address: recent}
        return min(self.base_delay * 2 ** (len(recent) - 1), self._max_delay)
