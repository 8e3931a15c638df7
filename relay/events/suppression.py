"""The suppression list's maintenance: what events add, the CSV import and export.

An entry names an address, why it is there and the channels it covers. Entries added from
SendCloud's events are relay-wide (``account`` None): a recipient who reported spam through
one team's mail is not mailed by the next team either. Operators may limit a manual entry to
one account. Enforcement (when an entry applies, the 550) is in ``relay.policy.suppression``,
below the SMTP and delivery stages that use it.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone

from relay.events.status import canonical
from relay.policy.suppression import CHANNELS, REASONS, Entry, normalise_address

# What ``events.suppress`` values mean.
SETTING_CHANNELS = {"all": CHANNELS, "batch": frozenset({"batch"}), "trigger": frozenset({"trigger"}), "none": frozenset()}

DEFAULT_SUPPRESS = {"invalid": "all", "report_spam": "all", "unsubscribe": "batch"}

# Only these events add entries (whatever else the setting names): a soft bounce passes.
SUPPRESSING_EVENTS = frozenset(DEFAULT_SUPPRESS)

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
