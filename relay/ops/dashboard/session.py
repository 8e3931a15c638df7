"""The dashboard's session cookie and CSRF token: pure functions of a secret, a clock and a nonce.

A session is ``name.expires.nonce.mac`` (the name base64url-encoded, the MAC an HMAC-SHA256 of
the rest): nothing is stored server-side, so a reload or a second worker needs no shared
table, and the role is read from the config on every request, so removing a user or demoting
them takes effect at once. The CSRF token is derived from the session's nonce, so it cannot be
known without the cookie, which SameSite=Strict and HttpOnly keep from other sites and scripts.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

COOKIE = "relay_session"


@dataclass(frozen=True)
class Session:
    user: str
    expires: int
    nonce: str


def _mac(secret: bytes, purpose: str, text: str) -> str:
    return hmac.new(secret, f"{purpose}\0{text}".encode(), hashlib.sha256).hexdigest()


def issue(secret: bytes, user: str, now: float, lifetime: float) -> str:
    """A new cookie value for ``user``, valid for ``lifetime`` seconds."""
    name = base64.urlsafe_b64encode(user.encode()).decode().rstrip("=")
    body = f"{name}.{int(now + lifetime)}.{secrets.token_urlsafe(16)}"
    return f"{body}.{_mac(secret, 'session', body)}"


def verify(secret: bytes, value: str | None, now: float) -> Session | None:
    """The session a cookie value carries, or None if it is absent, forged, malformed or expired."""
    if not value or value.count(".") != 3:
        return None
    body, _, mac = value.rpartition(".")
    if not hmac.compare_digest(mac.encode(), _mac(secret, "session", body).encode()):
        return None
    name, expires, nonce = body.split(".")
    try:
        user = base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode()
        expires_at = int(expires)
    except (ValueError, UnicodeDecodeError):
        return None
    return Session(user, expires_at, nonce) if expires_at > now else None


def csrf_token(secret: bytes, session: Session) -> str:
    """The token every form of this session carries; bound to the session, so a stolen form is useless."""
    return _mac(secret, "csrf", session.nonce)


def csrf_ok(expected: str, given: object) -> bool:
    """Whether a form's ``csrf`` field is the session's token (compared in constant time)."""
    return isinstance(given, str) and bool(given) and hmac.compare_digest(given.encode(), expected.encode())


def behind_tls(secure_socket: bool, peer: str | None, forwarded_proto: str | None,
               trusted_proxies: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> bool:
    """Whether the browser reached us over HTTPS: our own TLS, or a trusted proxy saying so.

    X-Forwarded-Proto from anyone else is ignored: a client could send it to itself.
    """
    if secure_socket:
        return True
    if not peer or (forwarded_proto or "").split(",")[0].strip().lower() != "https":
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return address in set(trusted_proxies)
