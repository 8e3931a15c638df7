"""Restrictions applied at MAIL and RCPT time, as pure functions of the facts they judge.

Each returns ``None`` when the command may proceed, or the :class:`SMTPReply` to give —
the spec's reply table lives here and nowhere else.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from relay.config import Config, Listener, User
from relay.errors import SMTPReply


def check_sender(user_name: str, user: User, sender: str) -> SMTPReply | None:
    """``allowed_senders`` globs (case-insensitive); an empty list allows any sender.

    The null sender is always allowed: a smarthost relays its own bounces with it, and it
    claims no address a team could be impersonating.
    """
    if not user.allowed_senders or not sender:
        return None
    address = sender.lower()
    if any(fnmatchcase(address, pattern.lower()) for pattern in user.allowed_senders):
        return None
    return SMTPReply(553, "5.7.1", f"<{sender}>: Sender address rejected: not owned by user {user_name}")


def check_relay(user_name: str | None, recipient: str) -> SMTPReply | None:
    """Only an authenticated user or a trusted network may relay: never an open relay."""
    if user_name is None:
        return SMTPReply(554, "5.7.1", f"<{recipient}>: Relay access denied")
    return None


def check_recipient(recipient: str, accepted_so_far: int, max_recipients: int) -> SMTPReply | None:
    local, at, domain = recipient.rpartition("@")
    if not at or not local or not domain or "." not in domain.strip("."):
        return SMTPReply(501, "5.1.3", f"<{recipient}>: Bad recipient address syntax")
    if accepted_so_far >= max_recipients:
        return SMTPReply(452, "4.5.3", "Error: too many recipients")
    return None


def identify(config: Config, listener: Listener, authenticated_user: str | None, client_ip: str) -> str | None:
    """The local user who owns this session's mail: the AUTH user, else a trusted network's.

    A listener with ``auth: required`` ignores trusted networks: on a submission port
    everybody logs in, as with Postfix's ``smtpd_client_restrictions = permit_sasl_authenticated, reject``.
    """
    if authenticated_user is not None:
        return authenticated_user if authenticated_user in config.users else None
    if listener.auth == "required":
        return None
    return config.user_for_address(client_ip)
