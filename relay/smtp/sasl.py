"""AUTH PLAIN and LOGIN for a listener's handler, so the password hash check runs off the event loop.

aiosmtpd's own mechanisms call a synchronous authenticator on the loop (argon2 costs ~50 ms);
handler methods named ``auth_<MECHANISM>`` override them (aiosmtpd looks them up by name).
The failure counts and lockouts are asked of the relay-wide limits (:mod:`relay.policy.anvil`).
"""

from __future__ import annotations

import asyncio
import binascii
import logging
from base64 import b64decode

from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    Envelope,
)

from relay.observe import metrics
from relay.observe.logs import event
from relay.policy.anvil import LimitsUnavailable
from relay.policy.checks import (
    auth_failed,
    auth_locked_out,
    auth_unavailable,
    check_auth_allowed,
    check_auth_identity,
)

log = logging.getLogger("relay.smtpd")


class SASLMechanisms:
    """The AUTH part of :class:`relay.smtp.session.ListenerHandler` (needs its ``listener`` and ``services``)."""

    async def handle_AUTH(self, server, session, envelope: Envelope, args):
        refusal = check_auth_allowed(bool(envelope.mail_from))
        return MISSING if refusal is None else str(refusal)

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            blob = await self._decode(server, args[1])
            if blob is None:
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await server.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        return await self._check(server, parts[1], parts[2], authzid=parts[0])

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await server.challenge_auth(SMTP.AuthLoginUsernameChallenge)
            if login is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            login = await self._decode(server, args[1])
            if login is None:
                return AuthResult(success=False, handled=True)
        password = await server.challenge_auth(SMTP.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._check(server, login, password)

    @staticmethod
    async def _decode(server: SMTP, text: str) -> bytes | None:
        try:
            return b64decode(text.encode(), validate=True)
        except binascii.Error:
            await server.push("501 5.5.2 Can't decode base64")
            return None

    async def _check(self, server: SMTP, login: bytes, password: bytes, authzid: bytes = b"") -> AuthResult:
        username = login.decode("utf-8", "replace")
        client = server.client_ip
        refusal = check_auth_identity(username) or check_auth_identity(authzid.decode("utf-8", "replace"))
        if refusal is not None:  # never a valid user: no password check, and the name is not logged
            metrics.AUTH.labels(self.listener.name, "bad_identity").inc()
            event(log, None, {"client": client, "listener": self.listener.name}, f"AUTH refused: {refusal}", logging.WARNING)
            return AuthResult(success=False, handled=False, message=str(refusal))
        fields = {"client": client, "listener": self.listener.name, "sasl_username": username}
        limits = self.services.limits
        try:
            locked = await limits.auth_locked_for(client, username)
        except LimitsUnavailable as error:  # a lockout elsewhere cannot be ruled out: not now
            metrics.AUTH.labels(self.listener.name, "unavailable").inc()
            event(log, None, fields, f"AUTH refused: cannot check the failure counts: {error}", logging.ERROR)
            return AuthResult(success=False, handled=False, message=str(auth_unavailable()))
        if locked is not None:  # refused unheard: guesses during a lockout teach nothing
            metrics.AUTH.labels(self.listener.name, "locked_out").inc()
            event(log, None, fields, f"AUTH refused, locked out for {locked:.0f}s more", logging.WARNING)
            return AuthResult(success=False, handled=False, message=str(auth_locked_out(locked)))
        if await self.services.authenticator.check(username, password.decode("utf-8", "replace")):
            limits.auth_succeeded(client, username)
            metrics.auth(self.listener.name, True)
            event(log, None, fields, "authenticated")
            return AuthResult(success=True, auth_data=username)
        metrics.auth(self.listener.name, False)
        try:
            delay = await limits.auth_failed(client, username)
        except LimitsUnavailable:
            delay = self.services.config().server.auth_failure_delay
        event(log, None, fields, f"authentication failed, reply delayed {delay:.1f}s", logging.WARNING)
        await asyncio.sleep(delay)
        return AuthResult(success=False, handled=False, message=str(auth_failed()))

