"""Restrictions applied at MAIL and RCPT time, as pure functions of the facts they judge.

Each returns ``None`` when the command may proceed, or the :class:`SMTPReply` to give —
the spec's reply table lives here and nowhere else.
"""

from __future__ import annotations

import math
import re
from fnmatch import fnmatchcase

from relay.config import Config, Listener, Rate, Server, User
from relay.errors import SMTPReply
from relay.policy.rates import would_exceed


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


# -- limits (the counts come from relay.policy.rates) ------------------------------------------------


def check_total_connections(open_total: int, server: Server) -> SMTPReply | None:
    """May one more session open at all? Asked before the greeting, where only ``421`` can refuse."""
    if open_total >= server.max_connections:
        return SMTPReply(421, "4.3.2", "Too many connections, try again later")
    return None


def limits_unavailable() -> SMTPReply:
    """The connection counts could not be asked (the main process did not answer): later."""
    return SMTPReply(421, "4.3.0", "Service temporarily unavailable, try again later")


def check_address_connections(open_from_address: int, trusted: bool, server: Server) -> SMTPReply | None:
    """May this address open one more? Trusted networks are exempt (as Postfix exempts
    ``$mynetworks`` from anvil's limits): a mail hub opens many sessions from one address."""
    if not trusted and open_from_address >= server.max_connections_per_address:
        return SMTPReply(421, "4.7.1", "Too many connections from your address, try again later")
    return None


def rate_budgets(config: Config, user: str, client_ip: str) -> list[tuple[str, str, Rate]]:
    """The rate limits this session's recipients count against, as (who, counter key, rate)."""
    budgets = []
    rate = config.users[user].rate_limit if user in config.users else None
    if rate is not None:
        budgets.append((f"user {user}", f"user:{user}", rate))
    client_rate = config.server.client_rate_limit
    if client_rate is not None and config.user_for_address(client_ip) is None:
        budgets.append((f"client {client_ip}", f"client:{client_ip}", client_rate))
    return budgets


def check_rate(who: str, used: float, adding: int, rate: Rate) -> SMTPReply | None:
    """``451 4.7.1`` when ``adding`` more recipients would take ``who`` past its rate limit."""
    if not would_exceed(used, adding, rate):
        return None
    return SMTPReply(451, "4.7.1", f"Rate limit exceeded: {who} may send to {rate} recipients; try again later")


def auth_locked_out(seconds_left: float) -> SMTPReply:
    minutes = max(1, math.ceil(seconds_left / 60))
    return SMTPReply(
        454, "4.7.0",
        f"Too many failed logins from your address or for this user; AUTH refused for {minutes} more minute(s)",
    )


def check_auth_allowed(in_transaction: bool) -> SMTPReply | None:
    """No AUTH inside a mail transaction (RFC 4954 section 4).

    Otherwise a client could give a MAIL FROM while nobody owns the session (no sender check
    applies then), log in, and have that sender relayed as the user it logged in as.
    """
    if in_transaction:
        return SMTPReply(503, "5.5.1", "AUTH not permitted during a mail transaction")
    return None


def auth_unavailable() -> SMTPReply:
    """The failure counts could not be asked, so neither a lockout nor a guess can be ruled out."""
    return SMTPReply(454, "4.7.0", "Temporary authentication failure, try again later")


def auth_failed() -> SMTPReply:
    return SMTPReply(535, "5.7.8", "Authentication credentials invalid")


# -- control characters: nothing a client sends may become a header line or a log line ---------

# C0 and DEL, and C1 (U+0080-U+009F) for text that arrived as UTF-8. TAB is let through in a
# HELO argument only, as the spec says: it is whitespace wherever the name is written (the
# Received header, a log line escapes it), so it cannot start a new line.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROLS_BUT_TAB = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def check_helo(argument: str) -> SMTPReply | None:
    """``501 5.5.2`` for a HELO/EHLO argument with CR, LF, NUL or another control character.

    A bare CR in the HELO name reached the Received header, where the dot-stuffer turned it
    into a header line of the client's choosing (an ``X-SMTPAPI``). The reply does not echo
    the argument: a CR or LF in it would break the reply line too.
    """
    if _CONTROLS_BUT_TAB.search(argument):
        return SMTPReply(501, "5.5.2", "Syntax error: control character in the HELO/EHLO argument")
    return None


def check_address_chars(address: str, command: str) -> SMTPReply | None:
    """``553 5.1.7`` for a MAIL or RCPT address with any control character, TAB included
    (RFC 5321 allows none, not even quoted); ``command`` is ``MAIL`` or ``RCPT``."""
    if _CONTROLS.search(address):
        role = "Sender" if command.upper() == "MAIL" else "Recipient"
        return SMTPReply(553, "5.1.7", f"{role} address rejected: control character in the address")
    return None


def check_auth_identity(text: str) -> SMTPReply | None:
    """``501 5.5.2`` for an AUTH username or authorisation identity with a control character.

    A newline in a username forged maillog lines without logging in; such a name can never
    match a configured user, so refusing it costs nothing. Checked before the password is.
    """
    if _CONTROLS.search(text):
        return SMTPReply(501, "5.5.2", "Syntax error: control character in the authentication identity")
    return None
