"""relay.events.stats: counters per event, buckets, and a scripted day rolled up exactly."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from relay.events.stats import COUNTERS, GROUPS, accepted, day_bucket, dimensions, hour_bucket, increments, rollup

INCREMENTS = {
    "request_counts_nothing": ("request", True, {}),
    "deliver": ("deliver", False, {"delivered": 1}),
    "delivered_alias": ("delivered", False, {"delivered": 1}),
    "soft_bounce": ("soft_bounce", False, {"soft_bounce": 1}),
    "invalid": ("invalid", False, {"invalid": 1}),
    "invalid_alias": ("invalid_email", False, {"invalid": 1}),
    "first_open": ("open", True, {"open": 1, "unique_open": 1}),
    "repeat_open": ("open", False, {"open": 1}),
    "first_click": ("click", True, {"click": 1, "unique_click": 1}),
    "repeat_click": ("click", False, {"click": 1}),
    "unsubscribe": ("unsubscribe", False, {"unsubscribe": 1}),
    "spam_report": ("spam-report", False, {"report_spam": 1}),
    "route_counts_nothing": ("route", True, {}),
    "unknown_counts_nothing": ("bounce_v2", True, {}),
}


@pytest.mark.parametrize("event, first, counts", INCREMENTS.values(), ids=INCREMENTS.keys())
def test_increments(event, first, counts):
    assert increments(event, first) == counts


def test_accepted_counts_requested():
    assert accepted(3) == {"requested": 3}
    assert accepted() == {"requested": 1}
    assert accepted(0) == {}


T = datetime(2026, 12, 1, 10, 59, 59, tzinfo=timezone.utc).timestamp()

BUCKETS = {
    "utc_hour": (hour_bucket(T), "2026-12-01T10"),
    "utc_day": (day_bucket(T), "2026-12-01"),
    "next_second_is_the_next_hour": (hour_bucket(T + 1), "2026-12-01T11"),
    "shanghai_hour": (hour_bucket(T, ZoneInfo("Asia/Shanghai")), "2026-12-01T18"),
    "shanghai_day_after_16_utc": (day_bucket(T + 6 * 3600, ZoneInfo("Asia/Shanghai")), "2026-12-02"),
    "new_york_day_before": (day_bucket(T - 10 * 3600, ZoneInfo("America/New_York")), "2026-11-30"),
}


@pytest.mark.parametrize("got, expected", BUCKETS.values(), ids=BUCKETS.keys())
def test_buckets(got, expected):
    assert got == expected


DIMENSIONS = {
    "plain": (("billing", "acme_trigger", "trigger", None, "a@qq.com"), "", "qq.com"),
    "label_number": (("billing", "acme_batch", "batch", 12345, "b@QQ.Com"), "12345", "qq.com"),
    "label_string_trailing_dot": (("billing", "acme_batch", "batch", "7", "c@163.com."), "7", "163.com"),
}


@pytest.mark.parametrize("args, label, domain", DIMENSIONS.values(), ids=DIMENSIONS.keys())
def test_dimensions(args, label, domain):
    user, account, channel, _, _ = args
    assert dimensions(*args) == {"user": user, "account": account, "channel": channel, "label": label, "domain": domain}
    assert tuple(dimensions(*args)) == GROUPS


# --- a scripted day --------------------------------------------------------------------

def at(hhmm: str, day: int = 1) -> float:
    hour, minute = map(int, hhmm.split(":"))
    return datetime(2026, 12, day, hour, minute, tzinfo=timezone.utc).timestamp()


MESSAGES = {  # queue ID: (user, account, channel, label)
    "Q1": ("billing", "acme_trigger", "trigger", None),
    "Q2": ("billing", "acme_batch", "batch", 12345),
    "Q3": ("ops", "ops_trigger", "trigger", None),
}
SENDS = [  # (time, queue ID, recipients SendCloud accepted at the final dot)
    (at("10:05"), "Q1", ["a@qq.com", "b@QQ.com", "c@163.com"]),
    (at("10:50"), "Q2", ["d@qq.com", "e@gmail.com"]),
    (at("11:00"), "Q3", ["f@qq.com"]),
]
EVENTS = [  # (time, queue ID, recipient, event as SendCloud spells it)
    (at("10:05"), "Q1", "a@qq.com", "request"),
    (at("10:06"), "Q1", "a@qq.com", "deliver"),
    (at("10:07"), "Q1", "b@QQ.com", "delivered"),
    (at("10:10"), "Q1", "c@163.com", "soft_bounce"),
    (at("10:30"), "Q1", "a@qq.com", "open"),
    (at("10:31"), "Q1", "a@qq.com", "click"),
    (at("10:32"), "Q1", "a@qq.com", "click"),
    (at("10:45"), "Q1", "a@qq.com", "open"),
    (at("10:51"), "Q2", "d@qq.com", "deliver"),
    (at("10:52"), "Q2", "e@gmail.com", "invalid_email"),
    (at("11:01"), "Q3", "f@qq.com", "deliver"),
    (at("11:05"), "Q1", "b@QQ.com", "open"),
    (at("11:20"), "Q1", "c@163.com", "deliver"),
    (at("11:29"), "Q2", "d@qq.com", "open"),
    (at("11:30"), "Q2", "d@qq.com", "unsubscribe"),
    (at("11:31"), "Q2", "d@qq.com", "spam-report"),
    (at("11:40"), "Q3", "f@qq.com", "route"),
    (at("20:30"), "Q3", "f@qq.com", "click"),  # 04:30 on 2 December in UTC+8
    (at("01:00", day=2), "Q3", "f@qq.com", "open"),
]


def stored_rows() -> list[tuple[str, str, str, str, int]]:
    """What the store would hold after the script: one counter per (hour, group, value)."""
    store: Counter = Counter()
    seen: set[tuple[str, str, str]] = set()

    def add(t, queue_id, recipient, counts):
        for group, value in dimensions(*MESSAGES[queue_id], recipient).items():
            for counter, n in counts.items():
                store[(hour_bucket(t), group, value, counter)] += n

    for t, queue_id, recipients in SENDS:
        for recipient in recipients:
            add(t, queue_id, recipient, accepted())
    for t, queue_id, recipient, event in EVENTS:
        key = (queue_id, recipient, event)
        add(t, queue_id, recipient, increments(event, key not in seen))
        seen.add(key)
    return [(*key, n) for key, n in store.items()]


def row(period, rates=(0.0, 0.0, 0.0), group=None, **counts):
    result = {"period": period}
    if group is not None:
        result[group[0]] = group[1]
    result.update({counter: counts.get(counter, 0) for counter in COUNTERS})
    result.update(zip(("delivered_rate", "open_rate", "click_rate"), rates))
    return result


DAY_TOTALS = [
    row("2026-12-01", (0.8333, 0.6, 0.4), requested=6, delivered=5, soft_bounce=1, invalid=1, open=4, unique_open=3,
        click=3, unique_click=2, unsubscribe=1, report_spam=1),
    row("2026-12-02", open=1, unique_open=1),
]

HOURS_BY_CHANNEL = [
    row("2026-12-01T10", (0.5, 0.0, 0.0), ("channel", "batch"), requested=2, delivered=1, invalid=1),
    row("2026-12-01T10", (0.6667, 0.5, 0.5), ("channel", "trigger"), requested=3, delivered=2, soft_bounce=1, open=2,
        unique_open=1, click=2, unique_click=1),
    row("2026-12-01T11", group=("channel", "batch"), open=1, unique_open=1, unsubscribe=1, report_spam=1),
    # Deliveries of the 10:05 message arrive at 11:20: a period's rate can pass 1.
    row("2026-12-01T11", (2.0, 0.5, 0.0), ("channel", "trigger"), requested=1, delivered=2, open=1, unique_open=1),
    row("2026-12-01T20", group=("channel", "trigger"), click=1, unique_click=1),
    row("2026-12-02T01", group=("channel", "trigger"), open=1, unique_open=1),
]

DAYS_BY_DOMAIN = [
    row("2026-12-01", (1.0, 0.0, 0.0), ("domain", "163.com"), requested=1, delivered=1, soft_bounce=1),
    row("2026-12-01", group=("domain", "gmail.com"), requested=1, invalid=1),
    row("2026-12-01", (1.0, 0.75, 0.5), ("domain", "qq.com"), requested=4, delivered=4, open=4, unique_open=3, click=3,
        unique_click=2, unsubscribe=1, report_spam=1),
    row("2026-12-02", group=("domain", "qq.com"), open=1, unique_open=1),
]

DAYS_BY_LABEL = [
    row("2026-12-01", (1.0, 0.5, 0.5), ("label", ""), requested=4, delivered=4, soft_bounce=1, open=3, unique_open=2,
        click=3, unique_click=2),
    row("2026-12-01", (0.5, 1.0, 0.0), ("label", "12345"), requested=2, delivered=1, invalid=1, open=1, unique_open=1,
        unsubscribe=1, report_spam=1),
    row("2026-12-02", group=("label", ""), open=1, unique_open=1),
]

DAYS_BY_USER = [
    row("2026-12-01", (0.8, 0.75, 0.25), ("user", "billing"), requested=5, delivered=4, soft_bounce=1, invalid=1, open=4,
        unique_open=3, click=2, unique_click=1, unsubscribe=1, report_spam=1),
    row("2026-12-01", (1.0, 0.0, 1.0), ("user", "ops"), requested=1, delivered=1, click=1, unique_click=1),
    row("2026-12-02", group=("user", "ops"), open=1, unique_open=1),
]

SHANGHAI_DAYS = [
    row("2026-12-01", (0.8333, 0.6, 0.2), requested=6, delivered=5, soft_bounce=1, invalid=1, open=4, unique_open=3,
        click=2, unique_click=1, unsubscribe=1, report_spam=1),
    row("2026-12-02", open=1, unique_open=1, click=1, unique_click=1),
]

ROLLUPS = {
    "days_total": (dict(by="day"), DAY_TOTALS),
    "hours_by_channel": (dict(by="hour", group="channel"), HOURS_BY_CHANNEL),
    "days_by_domain": (dict(by="day", group="domain"), DAYS_BY_DOMAIN),
    "days_by_label": (dict(by="day", group="label"), DAYS_BY_LABEL),
    "days_by_user": (dict(by="day", group="user"), DAYS_BY_USER),
    "days_in_shanghai": (dict(by="day", tz=ZoneInfo("Asia/Shanghai")), SHANGHAI_DAYS),
}


@pytest.mark.parametrize("kwargs, expected", ROLLUPS.values(), ids=ROLLUPS.keys())
def test_scripted_day_rolls_up_exactly(kwargs, expected):
    assert rollup(stored_rows(), **kwargs) == expected


def test_rollup_does_not_depend_on_row_order():
    rows = stored_rows()
    assert rollup(rows[::-1], by="hour", group="channel") == HOURS_BY_CHANNEL


def test_total_counts_each_recipient_once_whichever_single_group_is_stored():
    only_domain = [r for r in stored_rows() if r[1] == "domain"]
    assert rollup(only_domain, by="day") == DAY_TOTALS


def test_hours_in_a_half_hour_zone_are_labelled_by_the_local_hour_they_start_in():
    rows = [("2026-12-01T10", "user", "billing", "requested", 2), ("2026-12-01T11", "user", "billing", "requested", 1)]
    periods = [r["period"] for r in rollup(rows, by="hour", tz=ZoneInfo("Asia/Kolkata"))]
    assert periods == ["2026-12-01T15", "2026-12-01T16"]


def test_rollup_of_nothing_is_empty():
    assert rollup([], by="day", group="user") == []


BAD = {
    "by_week": (dict(by="week"), "by must be day or hour"),
    "group_unknown": (dict(group="country"), "group must be one of"),
    "counter_unknown": (dict(rows=[("2026-12-01T10", "user", "u", "bounces", 1)]), "unknown counter 'bounces'"),
}


@pytest.mark.parametrize("kwargs, message", BAD.values(), ids=BAD.keys())
def test_rollup_refuses(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rollup(**{"rows": [], **kwargs})
