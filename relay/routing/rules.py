"""Which channel, and so which SendCloud account, carries a message, with which options.

Pure functions, tested as tables. Rules are tried in order and the first that matches picks
the channel; a rule naming a channel the user does not have is skipped, so bulk mail never
falls onto a transactional account by a rule written for other teams. Without a matching rule
a message goes on the user's ``trigger`` channel, or on its only channel.

The options a message travels with (sender mode, subject marker, label, tracking) are the
matching rule's, else the user's, else the global defaults — field by field.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from relay.config import Config, Rule
from relay.routing.options import Options, resolve_options


@dataclass(frozen=True)
class Route:
    channel: str
    account: str
    rule: int | None  # index of the rule that decided, None for the default
    options: Options


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


def rule_mismatch(rule: Rule, envelope: Envelope, header: Callable[[str], str | None]) -> str | None:
    """Why ``rule`` does not match (the first condition that fails), or None when it matches."""
    match = rule.match
    if not _one_of(envelope.user, match.user):
        return f"user {envelope.user} is not {match.user}"
    if not _one_of(envelope.listener, match.listener):
        return f"listener {envelope.listener} is not {match.listener}"
    if match.sender is not None and not fnmatchcase(envelope.sender.lower(), match.sender.lower()):
        return f"sender <{envelope.sender}> does not match {match.sender}"
    if match.recipient_domains is not None:
        domains = {domain.lower() for domain in match.recipient_domains}
        if not any(rcpt.rpartition("@")[2].lower() in domains for rcpt in envelope.recipients):
            return f"no recipient in {', '.join(match.recipient_domains)}"
    if match.recipients_more_than is not None and len(envelope.recipients) <= match.recipients_more_than:
        return f"{len(envelope.recipients)} recipient(s), not more than {match.recipients_more_than}"
    for name, pattern in (match.header or {}).items():
        value = header(name)
        if value is None:
            return f"no {name} header"
        if not fnmatchcase(value.strip().lower(), pattern.lower()):
            return f"{name}: {value.strip()!r} does not match {pattern!r}"
    return None


def trace_route(
    config: Config, envelope: Envelope, header: Callable[[str], str | None]
) -> tuple[Route, list[str]]:
    """The route, and one line per rule tried saying why it did or did not decide."""
    user = config.users[envelope.user]
    channels = user.channels
    trace = []
    for index, rule in enumerate(config.rules):
        if rule.channel not in channels:
            trace.append(f"rule {index}: skipped: user {envelope.user} has no {rule.channel} channel")
            continue
        reason = rule_mismatch(rule, envelope, header)
        if reason is None:
            trace.append(f"rule {index}: matches -> {rule.channel}")
            options = resolve_options(config, rule, user)
            return Route(rule.channel, channels[rule.channel], index, options), trace
        trace.append(f"rule {index}: no match: {reason}")
    channel = "trigger" if "trigger" in channels else next(iter(channels))
    trace.append(f"no rule matched: default channel {channel}")
    return Route(channel, channels[channel], None, resolve_options(config, None, user)), trace


def choose_route(config: Config, envelope: Envelope, header: Callable[[str], str | None]) -> Route:
    """The route for a message; ``header(name)`` gives a header's value (parsed lazily)."""
    return trace_route(config, envelope, header)[0]
