"""What operators see of the events stage: statistics and the suppression list, as data.

Shared by the CLI (`stats`, `suppression`) and the admin endpoint (``/api/stats``,
``/api/suppressions``), so the two never disagree: each takes the spool and plain arguments.
"""

from __future__ import annotations

from datetime import datetime, timezone

from relay.config import Config, parse_duration
from relay.events import stats
from relay.events.suppression import parse_expiry
from relay.policy.suppression import CHANNELS, REASONS, Entry, normalise_address
from relay.spool import Spool


def since_hour(text: str, now: float) -> str:
    """``--since``: a duration back from now (``7d``) or a date / date and time (UTC)."""
    try:
        return stats.hour_bucket(now - parse_duration(text))
    except ValueError:
        pass
    return stats.hour_bucket(_parse_time(text))


def until_hour(text: str | None) -> str | None:
    """``--until DATE``: through the end of that day (or that hour, given a time), UTC."""
    if not text:
        return None
    parsed = _parse_time(text)
    return stats.hour_bucket(parsed) if "T" in text or " " in text.strip() else stats.day_bucket(parsed) + "T23"


def _parse_time(text: str) -> float:
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration like 7d nor an ISO date") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()


async def stats_rows(spool: Spool, since: str, until: str | None, by: str, group: str | None, now: float) -> list[dict]:
    """``stats --json``'s rows: the hourly counters from the spool, rolled up (no scan of events)."""
    return stats.rollup(await spool.stats(since_hour(since, now), until_hour(until)), by, group)


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def entry_record(entry: Entry) -> dict:
    """One entry of `suppression list --json` (``account`` null for relay-wide entries)."""
    return {
        "address": entry.address,
        "reason": entry.reason,
        "channels": sorted(entry.channels),
        "account": entry.account,
        "added_at": _iso(entry.added_at),
        "expires_at": _iso(entry.expires_at),
    }


async def entries(spool: Spool, now: float, include_expired: bool = False) -> list[Entry]:
    found = [Entry(*row) for row in await spool.suppressions()]
    return [e for e in found if include_expired or e.expires_at is None or e.expires_at > now]


def manual_entry(address: str, reason: str | None, account: str | None, expires: str | None, now: float) -> Entry:
    """An entry added by hand: every channel, ``manual`` unless another reason is given."""
    reason = reason or "manual"
    if reason not in REASONS:
        raise ValueError(f"reason {reason!r} is not one of {', '.join(REASONS)}")
    if "@" not in address:
        raise ValueError(f"{address!r} is not an address")
    return Entry(normalise_address(address), reason, CHANNELS, account or None, now, parse_expiry(expires or "", now))


def entry_row(entry: Entry) -> tuple:
    return (entry.address, entry.reason, entry.channels, entry.account, entry.added_at, entry.expires_at, entry.source)


def config_lines(config: Config) -> list[str]:
    """`check-config`'s events section: the receiver, whose key checks whose events, who fans out where."""
    events = config.events
    if events.listen:
        scheme = "https" if events.tls else "http"
        receiver = f"{scheme}://{events.listen}/webhooks/sendcloud"
        lines = [f"\nevents: receiver on {receiver}, max_age {events.max_age:g}s, retention {events.retention:g}s"]
        for name, account in config.accounts.items():
            key = "its own app_key" if account.app_key else "events.app_key" if events.app_key else "NO KEY"
            lines.append(f"  events of {account.api_user} ({name}) checked with {key}")
    else:
        lines = ["\nevents: no receiver (events.listen is not set)"]
    lines.append("  suppress: " + ", ".join(f"{event} -> {channels}" for event, channels in events.suppress.items()))
    fanning = [(name, user.events_url) for name, user in config.users.items() if user.events_url]
    for name, url in fanning:
        lines.append(f"  user {name}: events fanned out to {url}")
    if not fanning:
        lines.append("  no user fans out events (users.*.events_url)")
    return lines
