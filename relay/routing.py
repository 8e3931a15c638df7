"""Which channel, and so which SendCloud account, carries a message: one pure function.

Rules are tried in order and the first that matches picks the channel; a rule naming a
channel the user does not have is skipped, so bulk mail never falls onto a transactional
account by a rule written for other teams. Without a matching rule a message goes on the
user's ``trigger`` channel, or on its only channel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from relay.config import Config, Rule


@dataclass(frozen=True)
class Route:
    channel: str
    account: str
    rule: int | None  # index of the rule that decided, None for the default


@dataclass(frozen=True)
class Envelope:
    user: str
    listener: str
    sender: str
    recipients: Sequence[str]


def _one_of(value: str, wanted: str | list[str] | None) -> bool:
    if wanted is None:
        return True
    return value in ([wanted] if isinstance(wanted, str) else wanted)


def rule_matches(rule: Rule, envelope: Envelope, header: Callable[[str], str | None]) -> bool:
    match = rule.match
    if not _one_of(envelope.user, match.user) or not _one_of(envelope.listener, match.listener):
        return False
    if match.sender is not None and not fnmatchcase(envelope.sender.lower(), match.sender.lower()):
        return False
    if match.recipient_domains is not None:
        domains = {domain.lower() for domain in match.recipient_domains}
        if not any(rcpt.rpartition("@")[2].lower() in domains for rcpt in envelope.recipients):
            return False
    if match.recipients_more_than is not None and len(envelope.recipients) <= match.recipients_more_than:
        return False
    for name, pattern in (match.header or {}).items():
        value = header(name)
        if value is None or not fnmatchcase(value.strip().lower(), pattern.lower()):
            return False
    return True


def choose_route(config: Config, envelope: Envelope, header: Callable[[str], str | None]) -> Route:
    """The route for a message; ``header(name)`` gives a header's value (parsed lazily)."""
    channels = config.users[envelope.user].channels
    for index, rule in enumerate(config.rules):
        if rule.channel in channels and rule_matches(rule, envelope, header):
            return Route(rule.channel, channels[rule.channel], index)
    channel = "trigger" if "trigger" in channels else next(iter(channels))
    return Route(channel, channels[channel], None)
