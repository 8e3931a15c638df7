"""Statistics as SendCloud's data centre computes them, from the relay's own sends and events.

The store keeps one counter per (UTC hour, group, value, counter); every counted thing is
added once under each group (user, account, channel, label, domain), so any one group
partitions all the mail. Days, other time zones and rates are derived when read.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone, tzinfo

from relay.events.status import canonical

COUNTERS = (
    "requested",
    "delivered",
    "soft_bounce",
    "invalid",
    "open",
    "unique_open",
    "click",
    "unique_click",
    "unsubscribe",
    "report_spam",
)

GROUPS = ("user", "account", "channel", "label", "domain")

_COUNTED = {
    "deliver": "delivered",
    "soft_bounce": "soft_bounce",
    "invalid": "invalid",
    "unsubscribe": "unsubscribe",
    "report_spam": "report_spam",
}


def accepted(recipients: int = 1) -> dict[str, int]:
    """What the relay counts itself when SendCloud accepts a message at the final dot."""
    return {"requested": recipients} if recipients else {}


def increments(event_name: str, first_of_kind_for_recipient: bool) -> dict[str, int]:
    """The counters one event adds.

    ``request`` adds nothing: ``requested`` was counted by the relay when SendCloud accepted
    the recipients (see :func:`accepted`), and counting the event again would double it.
    ``first_of_kind_for_recipient``: this is the first open (or click) of this recipient of
    this message, which adds ``unique_open`` (``unique_click``). ``route`` and unknown events
    count nothing.
    """
    name = canonical(event_name)
    if name in ("open", "click"):
        counts = {name: 1}
        if first_of_kind_for_recipient:
            counts[f"unique_{name}"] = 1
        return counts
    counter = _COUNTED.get(name)
    return {counter: 1} if counter else {}


def hour_bucket(t: float, tz: tzinfo = timezone.utc) -> str:
    """``2026-12-01T10``: the hour ``t`` falls in, in ``tz``.

    UTC by default: SendCloud's console is UTC+8, but the relay's operators and nodes may be
    anywhere, and a stored bucket must not depend on the clock of the node that wrote it.
    Store UTC hours and pick the display zone in :func:`rollup`.
    """
    return datetime.fromtimestamp(t, tz).strftime("%Y-%m-%dT%H")


def day_bucket(t: float, tz: tzinfo = timezone.utc) -> str:
    return datetime.fromtimestamp(t, tz).strftime("%Y-%m-%d")


def dimensions(user: str, account: str, channel: str, label: int | str | None, recipient: str) -> dict[str, str]:
    """The value of each group for one recipient's counters (``domain``: lowercased, no label → "")."""
    domain = recipient.rpartition("@")[2].strip().rstrip(">").lower().rstrip(".")
    return {
        "user": user,
        "account": account,
        "channel": channel,
        "label": "" if label is None else str(label),
        "domain": domain,
    }


def _ratio(numerator: int, divisor: int) -> float:
    # 0.0 rather than None when nothing was sent: SendCloud's console shows 0.00 %, and a
    # number in every row keeps charts and sums free of special cases.
    return round(numerator / divisor, 4) if divisor else 0.0


def _period(hour: str, by: str, tz: tzinfo) -> str:
    start = datetime.strptime(hour, "%Y-%m-%dT%H").replace(tzinfo=timezone.utc).astimezone(tz)
    return start.strftime("%Y-%m-%d" if by == "day" else "%Y-%m-%dT%H")


def rollup(
    rows: Iterable[tuple[str, str, str, str, int]],
    by: str = "day",
    group: str | None = None,
    tz: tzinfo = timezone.utc,
) -> list[dict]:
    """``stats --json`` rows from stored ``(utc_hour, group, value, counter, count)`` rows.

    One row per period (``by``: ``day`` or ``hour``, in ``tz``) and value of ``group``, sorted
    by period then value, with every counter (0 when absent) and the rates: ``delivered_rate``
    = delivered / requested, ``open_rate`` = unique_open / delivered, ``click_rate`` =
    unique_click / delivered, rounded to 4 decimals, 0.0 when the divisor is 0. Rates are not
    capped: events counted in a later period than their sends can take one above 1.

    ``group`` None totals the rows of one group only (the first of GROUPS present), since
    each group holds all the mail once. An hour of a zone with a half-hour offset is labelled
    by the local hour it starts in.
    """
    if by not in ("day", "hour"):
        raise ValueError(f"by must be day or hour, not {by!r}")
    if group is not None and group not in GROUPS:
        raise ValueError(f"group must be one of {', '.join(GROUPS)}, not {group!r}")
    rows = list(rows)
    chosen = group
    if chosen is None:
        present = {row[1] for row in rows}
        chosen = next((name for name in GROUPS if name in present), None)
    totals: dict[tuple[str, str], dict[str, int]] = {}
    for hour, row_group, value, counter, count in rows:
        if counter not in COUNTERS:
            raise ValueError(f"unknown counter {counter!r}")
        if row_group != chosen:
            continue
        key = (_period(hour, by, tz), value if group is not None else "")
        counts = totals.setdefault(key, dict.fromkeys(COUNTERS, 0))
        counts[counter] += count
    result = []
    for (period, value), counts in sorted(totals.items()):
        row: dict = {"period": period}
        if group is not None:
            row[group] = value
        row.update(counts)
        row["delivered_rate"] = _ratio(counts["delivered"], counts["requested"])
        row["open_rate"] = _ratio(counts["unique_open"], counts["delivered"])
        row["click_rate"] = _ratio(counts["unique_click"], counts["delivered"])
        result.append(row)
    return result
