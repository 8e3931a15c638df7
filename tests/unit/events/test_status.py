"""relay.events.status: SendCloud's status per recipient, whatever order events arrive in."""

from __future__ import annotations

from functools import reduce
from itertools import permutations

import pytest

from relay.events.status import EVENT_NAMES, canonical, is_known, status_after

T = 1_800_000_000.0

CANONICAL = {
    "deliver": "deliver",
    "delivered": "deliver",
    " DELIVERED ": "deliver",
    "spam-report": "report_spam",
    "spam_report": "report_spam",
    "invalid_email": "invalid",
    "invalid-email": "invalid",
    "soft-bounce": "soft_bounce",
    "something_new": "something_new",
}


@pytest.mark.parametrize("name, expected", CANONICAL.items(), ids=CANONICAL.keys())
def test_canonical(name, expected):
    assert canonical(name) == expected


def test_every_documented_name_is_its_own_canonical_name():
    assert all(canonical(name) == name and is_known(name) for name in EVENT_NAMES)
    assert not is_known("bounce")


STEPS = {
    "first_request": ((None, None), "request", T, ("requested", T)),
    "first_event_is_a_deliver": ((None, None), "deliver", T, ("delivered", T)),
    "deliver_after_request": (("requested", T), "deliver", T + 5, ("delivered", T + 5)),
    "alias_spelling": (("requested", T), "delivered", T + 5, ("delivered", T + 5)),
    "late_request_does_not_undo_deliver": (("delivered", T + 5), "request", T, ("delivered", T + 5)),
    "soft_bounce_then_deliver": (("soft_bounce", T + 60), "deliver", T + 600, ("delivered", T + 600)),
    "late_soft_bounce_does_not_undo_deliver": (("delivered", T + 600), "soft_bounce", T + 60, ("delivered", T + 600)),
    "soft_bounce_then_invalid": (("soft_bounce", T + 60), "invalid_email", T + 3600, ("invalid", T + 3600)),
    "open_changes_nothing": (("delivered", T), "open", T + 99, ("delivered", T)),
    "click_changes_nothing": (("delivered", T), "click", T + 99, ("delivered", T)),
    "unsubscribe_changes_nothing": (("delivered", T), "unsubscribe", T + 99, ("delivered", T)),
    "spam_report_changes_nothing": (("delivered", T), "spam-report", T + 99, ("delivered", T)),
    "route_changes_nothing": (("delivered", T), "route", T + 99, ("delivered", T)),
    "unknown_changes_nothing": (("delivered", T), "bounce_v2", T + 99, ("delivered", T)),
    "open_before_any_status_leaves_none": ((None, None), "open", T, (None, None)),
    "tie_deliver_beats_request": (("requested", T), "deliver", T, ("delivered", T)),
    "tie_request_loses_to_deliver": (("delivered", T), "request", T, ("delivered", T)),
    "tie_invalid_beats_deliver": (("delivered", T), "invalid", T, ("invalid", T)),
    "status_without_time_is_replaced": (("requested", None), "soft_bounce", T, ("soft_bounce", T)),
}


@pytest.mark.parametrize("current, event, event_time, expected", STEPS.values(), ids=STEPS.keys())
def test_status_after(current, event, event_time, expected):
    assert status_after(*current, event, event_time) == expected


LIVES = {
    "delivered_after_a_soft_bounce": (
        [("request", T), ("soft_bounce", T + 60), ("deliver", T + 600), ("open", T + 900), ("click", T + 901)],
        ("delivered", T + 600),
    ),
    "invalid_after_soft_bounces": (
        [("request", T), ("soft_bounce", T + 60), ("soft_bounce", T + 300), ("invalid", T + 3600)],
        ("invalid", T + 3600),
    ),
    "same_millisecond_request_and_deliver": ([("request", T), ("delivered", T), ("report_spam", T + 1)], ("delivered", T)),
}


@pytest.mark.parametrize("events, expected", LIVES.values(), ids=LIVES.keys())
def test_out_of_order_arrival_gives_the_same_status(events, expected):
    """Every arrival order of one recipient's events ends in the latest status by event time."""
    for order in permutations(events):
        final = reduce(lambda state, event: status_after(*state, *event), order, (None, None))
        assert final == expected, order
