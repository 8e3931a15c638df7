"""The suppression list's decisions: who is added, when an entry applies, what RCPT hears.

An entry names an address, why it is there and the channels it covers. Entries added from
SendCloud's events are relay-wide (``account`` None): a recipient who reported spam through
one team's mail is not mailed by the next team either. Operators may limit a manual entry to
one account. The store only keeps entries; every decision is here, tested as tables.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo

from relay.errors import SMTPReply
from relay.events.status import canonical

CHANNELS = frozenset({"trigger", "batch"})

# What ``events.suppress`` values mean.
SETTING_CHANNELS = {"all": CHANNELS, "batch": frozenset({"batch"}), "trigger": frozenset({"trigger"}), "none": frozenset()}

DEFAULT_SUPPRESS = {"invalid": "all", "report_spam": "all", "unsubscribe": "batch"}

# Only these events add entries (whatever else the setting names): a soft bounce passes.
SUPPRESSING_EVENTS = frozenset(DEFAULT_SUPPRESS)

REASONS = ("invalid", "report_spam", "unsubscribe", "manual")


@dataclass(frozen=True)
class Entry:
    address: str  # normalised (see normalise_address)
    reason: str  # one of REASONS
    channels: frozenset[str]
    account: str | None  # None: relay-wide (every account of those channels)
    added_at: float
    expires_at: float | None = None
    source: str | None = None  # the account whose event added it (informative; not the scope)


def channels_for(event_name: str, suppress_setting: Mapping[str, str]) -> frozenset[str]:
    """The channels an event suppresses its recipient for, per ``events.suppress``.

    An event the setting does not mention keeps its default (``DEFAULT_SUPPRESS``): turning
    one off takes an explicit ``none``, so a partial setting cannot silently stop honouring
    spam reports. Keys may use any spelling of an event name.
    """
    name = canonical(event_name)
    if name not in SUPPRESSING_EVENTS:
        return frozenset()
    setting = {**DEFAULT_SUPPRESS, **{canonical(key): value for key, value in suppress_setting.items()}}
    value = setting[name].strip().lower()
    if value not in SETTING_CHANNELS:
        raise ValueError(f"events.suppress.{name}: {value!r} is not one of all, batch, trigger, none")
    return SETTING_CHANNELS[value]


def from_event(
    address: str, event_name: str, account: str | None, at: float, suppress_setting: Mapping[str, str]
) -> Entry | None:
    """The relay-wide entry an event adds (no expiry), or None when it suppresses nothing."""
    channels = channels_for(event_name, suppress_setting)
    if not channels:
        return None
    return Entry(normalise_address(address), canonical(event_name), channels, None, at, None, account)


def normalise_address(addr: str) -> str:
    """The form addresses are stored and looked up in: trimmed, without ``<>``, lowercased.

    The local part is lowercased too, though RFC 5321 lets it be case-sensitive: SendCloud
    treats addresses case-insensitively, so its events may name ``Foo@x`` for mail sent to
    ``foo@x``, and no real mailbox distinguishes the two. Erring this way can only withhold
    mail from someone who asked not to get it. A trailing dot of the domain is dropped.
    """
    addr = addr.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1].strip()
    local, at, domain = addr.rpartition("@")
    if not at:
        return addr.lower()
    return f"{local.lower()}@{domain.lower().rstrip('.')}"


def applies(entry: Entry, channel: str, account: str | None, now: float) -> bool:
    """Whether ``entry`` stops mail on ``channel`` through ``account`` at ``now``.

    An entry expires at ``expires_at`` (from then on it no longer applies).
    """
    if entry.expires_at is not None and now >= entry.expires_at:
        return False
    if channel not in entry.channels:
        return False
    return entry.account is None or entry.account == account


def _named(entries: Iterable[Entry]) -> Entry | None:
    """The entry a refusal names: the most recently added; ties by reason, then account.

    The most recent reason is the one the sender can act on ("unsubscribed last week" rather
    than "bounced two years ago"), and the tie-break makes the reply independent of the
    order the store returns entries in.
    """
    return max(entries, key=lambda e: (e.added_at, e.reason, e.account or ""), default=None)


def _reply(entry: Entry, address: str | None, tz: tzinfo) -> SMTPReply:
    day = datetime.fromtimestamp(entry.added_at, tz).strftime("%Y-%m-%d")
    return SMTPReply(550, "5.1.1", f"<{address or entry.address}>: suppressed ({entry.reason} {day})")


def rcpt_refusal(
    entries: Iterable[Entry],
    user_channels: Mapping[str, str],
    now: float,
    address: str | None = None,
    tz: tzinfo = timezone.utc,
) -> SMTPReply | None:
    """The RCPT reply when the address is suppressed for every channel the user has, else None.

    ``entries`` are the address's entries, ``user_channels`` maps channel → account. The
    channel a message takes is only known after DATA, so RCPT refuses only when no channel
    could carry it. The reply names one of the entries that apply (see ``_named``); ``address``
    is the address as the client wrote it (else the entry's), the date is ``tz``'s (UTC).
    """
    entries = list(entries)
    if not user_channels:
        return None
    applying: list[Entry] = []
    for channel, account in user_channels.items():
        found = [entry for entry in entries if applies(entry, channel, account, now)]
        if not found:
            return None
        applying.extend(found)
    return _reply(_named(applying), address, tz)


def routed_refusal(
    entries: Iterable[Entry],
    channel: str,
    account: str,
    now: float,
    address: str | None = None,
    tz: tzinfo = timezone.utc,
) -> SMTPReply | None:
    """The failure for a recipient suppressed for the channel and account the message was
    routed to (after DATA: the recipient is failed at once and a DSN tells the sender)."""
    named = _named(entry for entry in entries if applies(entry, channel, account, now))
    return _reply(named, address, tz) if named is not None else None


# --- CSV import and export -------------------------------------------------------------


class SuppressionImportError(ValueError):
    """A CSV that cannot be imported; ``errors`` lists every bad line as (line, message)."""

    def __init__(self, errors: list[tuple[int, str]]):
        self.errors = errors
        super().__init__("; ".join(f"line {line}: {message}" for line, message in errors))


@dataclass(frozen=True)
class ImportRow:
    line: int
    address: str
    reason: str
    account: str | None
    expires_at: float | None
    channels: frozenset[str] = CHANNELS

    def to_entry(self, now: float) -> Entry:
        return Entry(self.address, self.reason, self.channels, self.account, now, self.expires_at)


CSV_HEADER = ("address", "reason", "account", "expires", "channels")

_DURATION = re.compile(r"(\d+)\s*([smhdw])", re.IGNORECASE)
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_ADDRESS = re.compile(r'(?:"[^"\r\n]*"|[^@\s<>",;]+)@[^@\s<>",;]+')  # a quoted local part may hold anything


def parse_expiry(text: str, now: float) -> float | None:
    """``expires``: empty (never), a duration from ``now`` (``30d``, ``12h``, ``1w``, ``90m``,
    ``45s``), an ISO date (that day's 00:00 UTC) or an ISO date and time (UTC unless it says)."""
    text = text.strip()
    if not text:
        return None
    match = _DURATION.fullmatch(text)
    if match:
        return now + int(match.group(1)) * _UNIT[match.group(2).lower()]
    try:
        parsed = datetime.fromisoformat(text)  # a date alone is its 00:00
    except ValueError:
        raise ValueError(f"expires {text!r} is neither a duration like 30d nor an ISO date") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def _parse_channels(text: str) -> frozenset[str]:
    text = text.strip().lower()
    if not text:
        return CHANNELS
    if text not in ("all", "batch", "trigger"):
        raise ValueError(f"channels {text!r} is not one of all, batch, trigger")
    return SETTING_CHANNELS[text]


def _parse_row(cells: list[str], line: int, now: float) -> ImportRow:
    cells = [cell.strip() for cell in cells]
    if len(cells) > len(CSV_HEADER):
        raise ValueError(f"{len(cells)} columns; expected address,reason[,account][,expires][,channels]")
    address, reason, account, expires, channels = cells + [""] * (len(CSV_HEADER) - len(cells))
    if not _ADDRESS.fullmatch(address.strip("<>")):
        raise ValueError(f"{address!r} is not an address")
    reason = canonical(reason) if reason else "manual"
    if reason not in REASONS:
        raise ValueError(f"reason {reason!r} is not one of {', '.join(REASONS)}")
    return ImportRow(line, normalise_address(address), reason, account or None, parse_expiry(expires, now), _parse_channels(channels))


def parse_csv(text: str, now: float) -> list[ImportRow]:
    """Rows of ``address,reason[,account][,expires][,channels]``; a header line is optional.

    ``reason`` defaults to ``manual``; ``channels`` (written by :func:`to_csv`) to all.
    Blank lines are skipped. Every bad line is reported at once, by its line number, in one
    :class:`SuppressionImportError`; nothing is returned then (an import is all or nothing).
    """
    rows: list[ImportRow] = []
    errors: list[tuple[int, str]] = []
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")), skipinitialspace=True)  # a BOM from spreadsheet exports
    seen_data = False
    try:
        for cells in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in cells):
                continue
            if not seen_data and cells[0].strip().lower() in ("address", "email"):
                seen_data = True  # the header line
                continue
            seen_data = True
            try:
                rows.append(_parse_row(cells, line, now))
            except ValueError as error:
                errors.append((line, str(error)))
    except csv.Error as error:
        errors.append((reader.line_num, f"not CSV: {error}"))
    if errors:
        raise SuppressionImportError(errors)
    return rows


def _format_time(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def to_csv(entries: Iterable[Entry]) -> str:
    """The entries as CSV with a header line; :func:`parse_csv` reads it back.

    ``expires`` is ISO 8601 in UTC (to the microsecond), ``channels`` ``all``, ``batch`` or
    ``trigger``. ``added_at`` and ``source`` are not exported: an import is added at its time.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for entry in entries:
        channels = "all" if entry.channels == CHANNELS else ",".join(sorted(entry.channels))
        expires = _format_time(entry.expires_at) if entry.expires_at is not None else ""
        writer.writerow((entry.address, entry.reason, entry.account or "", expires, channels))
    return out.getvalue()
