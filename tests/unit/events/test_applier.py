"""relay.events.applier.decide: what one event changes, as a table, and the rows it counts."""

from __future__ import annotations

import json

import pytest

from relay.events.applier import decide, failed_outbox, requested_rows, stat_rows
from relay.events.webhook import to_event
from relay.spool import QueuedMessage, Recipient, RecipientUpdate, State
from relay.spool.events_model import EventTarget, Fate, RecipientEvent
from tests.unit.events.test_receiver import CONFIG

T = 1_764_585_000.0  # 2025-12-01T10:30:00Z
TARGET = EventTarget("Q1", 0, "A@example.org", "billing", "acme_batch", "batch", 12)
DELIVERED = Fate("delivered", T, (RecipientEvent("deliver", T),))
OPENED = Fate("delivered", T, (RecipientEvent("deliver", T), RecipientEvent("open", T + 1)))


def event(name: str, at: float = T + 60, **fields):
    return to_event(
        {
            "event": name,
            "timestamp": str(int(at * 1000)),
            "token": "t",
            "apiUser": "acme_batch",
            "recipient": "a@example.org",
            **fields,
        }
    )


DECISIONS = {
    # name: (event, fate before, status after, suppressed channels, counters)
    "deliver_sets_delivered": (event("delivered"), None, "delivered", None, {"delivered": 1}),
    "open_keeps_the_status": (event("open"), DELIVERED, "delivered", None, {"open": 1, "unique_open": 1}),
    "second_open_is_not_unique": (event("open"), OPENED, "delivered", None, {"open": 1}),
    "late_soft_bounce_loses_to_the_delivery": (
        event("soft_bounce", T - 5),
        DELIVERED,
        "delivered",
        None,
        {"soft_bounce": 1},
    ),
    "invalid_suppresses_every_channel": (
        event("invalid_email"),
        DELIVERED,
        "invalid",
        {"batch", "trigger"},
        {"invalid": 1},
    ),
    "unsubscribe_suppresses_batch": (event("unsubscribe"), DELIVERED, "delivered", {"batch"}, {"unsubscribe": 1}),
    "spam_report_suppresses_all": (
        event("spam-report"),
        DELIVERED,
        "delivered",
        {"batch", "trigger"},
        {"report_spam": 1},
    ),
    "route_changes_and_counts_nothing": (event("route"), DELIVERED, "delivered", None, {}),
}


@pytest.mark.parametrize("webhook, fate, status, suppressed, counts", DECISIONS.values(), ids=DECISIONS.keys())
def test_decide(webhook, fate, status, suppressed, counts):
    applied = decide(CONFIG, 7, webhook, TARGET, fate, T + 100)
    assert applied.status == status
    assert applied.history.event == webhook.event and applied.history.time == webhook.time
    if suppressed is None:
        assert applied.suppression is None
    else:
        address, reason, channels, account, added_at, expires_at, source = applied.suppression
        assert (address, reason, channels, account, added_at, expires_at, source) == (
            "a@example.org",
            webhook.event,
            frozenset(suppressed),
            None,
            webhook.time,
            None,
            "acme_batch",
        )
    by_counter: dict[str, int] = {}
    for hour, group, value, counter, count in applied.stats:
        assert hour == "2025-12-01T10"
        if group == "user":
            assert value == "billing"
            by_counter[counter] = count
    assert by_counter == counts
    assert len(applied.stats) == 5 * len(counts)  # once under each group


def test_every_applied_event_of_a_user_with_events_url_is_fanned_out_with_the_message_it_answers():
    applied = decide(
        CONFIG, 7, event("route", emailId="m0$a@example.org", reference="<x@acme.com>"), TARGET, DELIVERED, T
    )
    (row,) = applied.outbox
    body = json.loads(row.body)
    assert (row.user, row.url) == ("billing", "https://billing.example/hook")
    assert (body["id"], body["event"], body["queue_id"], body["label"], body["email_id"]) == (
        "sc-7",
        "route",
        "Q1",
        12,
        "m0$a@example.org",
    )
    assert body["details"]["reference"] == "<x@acme.com>"


def test_an_unknown_message_only_feeds_the_suppression_list():
    applied = decide(CONFIG, 8, event("invalid"), None, None, T)
    assert applied.target is None and applied.stats == () and applied.outbox == () and applied.history is None
    assert applied.suppression[:2] == ("a@example.org", "invalid") and applied.suppression[6] == "acme_batch"


def test_suppress_setting_none_adds_nothing():
    config = CONFIG.model_copy(update={"events": CONFIG.events.model_copy(update={"suppress": {"invalid": "none"}})})
    assert decide(config, 9, event("invalid"), TARGET, DELIVERED, T).suppression is None


def test_requested_rows_count_each_recipient_under_each_group():
    rows = requested_rows("billing", "acme_trigger", "trigger", None, ["a@x.org", "b@Y.org"], T)
    assert ("2025-12-01T10", "domain", "y.org", "requested", 1) in rows and len(rows) == 10
    assert stat_rows({}, {"user": "billing"}, "2025-12-01T10") == []


def test_failed_outbox_only_for_failed_recipients_of_users_with_events_url():
    message = QueuedMessage(
        "Q2",
        T,
        "billing",
        "smtp",
        "10.0.0.1",
        "acme_trigger",
        "trigger",
        "app@acme.com",
        100,
        recipients=[Recipient("Q2", 0, "a@x.org", State.QUEUED, 0, T)],
    )
    failed = RecipientUpdate(
        "Q2", 0, State.FAILED, 1, T, "550 5.1.1 <a@x.org>: suppressed (invalid 2025-12-01)", dsn_status="5.1.1"
    )
    row = failed_outbox(CONFIG, message, failed, T)
    body = json.loads(row.body)
    assert (body["id"], body["event"], body["recipient"], body["timestamp"]) == (
        "failed-Q2-0",
        "failed",
        "a@x.org",
        int(T * 1000),
    )
    assert body["details"] == {"reply": failed.last_reply, "status": "5.1.1"}
    delivered = RecipientUpdate("Q2", 0, State.DELIVERED, 1, T, "250 ok")
    assert failed_outbox(CONFIG, message, delivered, T) is None
