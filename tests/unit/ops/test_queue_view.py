"""relay.ops.queue_view: the text of `queue list` and `queue show` that operators read."""

from __future__ import annotations

from datetime import datetime

import pytest

from relay.ops.queue_view import format_age, list_lines, list_query, list_record, page, show_lines, show_record
from relay.spool import ListQuery, QueuedMessage, Recipient, State
from tests.unit.helpers import BASE, config_from

NOW = 1_700_000_000.0

AGES = {
    "zero": (0, "0s"),
    "negative_clock_skew": (-5, "0s"),
    "seconds": (12, "12s"),
    "fraction_truncated": (59.9, "59s"),
    "one_minute": (60, "1m"),
    "minutes_and_seconds": (250, "4m10s"),
    "one_hour": (3600, "1h"),
    "hours_and_minutes": (2 * 3600 + 5 * 60 + 30, "2h5m"),
    "one_day": (86400, "1d"),
    "days_and_hours": (3 * 86400 + 4 * 3600 + 59 * 60, "3d4h"),
    "days_skip_zero_hours": (3 * 86400 + 5 * 60, "3d"),
    "many_days": (40 * 86400, "40d"),
}


@pytest.mark.parametrize("seconds, text", AGES.values(), ids=AGES.keys())
def test_format_age(seconds, text):
    """The two largest units, as operators read them."""
    assert format_age(seconds) == text


def rcpt(message_id: str, idx: int, state: State, attempts: int = 0, next_attempt: float = NOW,
         last_reply: str | None = None, email_id: str | None = None) -> Recipient:
    return Recipient(message_id, idx, f"r{idx}@example.org", state, attempts, next_attempt, last_reply, email_id)


def message(message_id: str, age: float, recipients: list[Recipient], user: str = "billing",
            account: str = "acme_trigger") -> QueuedMessage:
    return QueuedMessage(
        message_id, NOW - age, user, "smtp", "10.20.0.5", account, "trigger",
        "billing@acme.com", 1234, recipients=recipients,
    )


DEFERRED = message(
    "238CF37BF6FPHX", 250,
    [
        rcpt("238CF37BF6FPHX", 0, State.DELIVERED, 1, NOW - 200, "250 #mid#Queued", "mid0$r0@example.org"),
        rcpt("238CF37BF6FPHX", 1, State.DEFERRED, 2, NOW + 300, "451 4.7.1 greylisted"),
    ],
)
QUEUED = message("238CF37BFT8JB9", 7500, [rcpt("238CF37BFT8JB9", 0, State.QUEUED)], user="mailhub",
                 account="acme_batch")
FAILED = message(
    "238CF37BF3VCR5", 3 * 86400 + 4 * 3600,
    [rcpt("238CF37BF3VCR5", 0, State.FAILED, 1, NOW, "550 5.1.1 user unknown")],
)


def test_list_lines_columns():
    """One line per message: ID, age, user, account, pending/total recipients, state."""
    lines = list_lines([DEFERRED, QUEUED, FAILED], now=NOW)
    assert lines[0].split() == ["ID", "AGE", "USER", "ACCOUNT", "RCPTS", "STATE"]
    assert [line.split() for line in lines[1:4]] == [
        ["238CF37BF6FPHX", "4m10s", "billing", "acme_trigger", "1/2", "deferred"],
        ["238CF37BFT8JB9", "2h5m", "mailhub", "acme_batch", "1/1", "queued"],
        ["238CF37BF3VCR5", "3d4h", "billing", "acme_trigger", "0/1", "failed"],
    ]
    assert lines[4] == "-- 3 message(s)"


def test_list_lines_columns_line_up_under_the_header():
    header, row = list_lines([DEFERRED], now=NOW)[:2]
    assert row.index("billing") == header.index("USER")
    assert row.index("acme_trigger") == header.index("ACCOUNT")
    assert row.rindex("deferred") == header.index("STATE")


def test_list_lines_empty_queue():
    lines = list_lines([], now=NOW)
    assert len(lines) == 2
    assert lines[-1] == "-- 0 message(s)"


STATES = {
    "queued_wins": ([State.DELIVERED, State.QUEUED, State.DEFERRED], "queued"),
    "deferred_over_final": ([State.DELIVERED, State.FAILED, State.DEFERRED], "deferred"),
    "failed_over_delivered": ([State.DELIVERED, State.FAILED], "failed"),
    "all_delivered": ([State.DELIVERED, State.DELIVERED], "delivered"),
}


@pytest.mark.parametrize("states, word", STATES.values(), ids=STATES.keys())
def test_message_state_is_least_advanced_recipient(states, word):
    assert message("X", 0, [rcpt("X", i, s) for i, s in enumerate(states)]).state == word


def show(msg: QueuedMessage, with_config: bool = True) -> str:
    return "\n".join(show_lines(msg, config_from(BASE) if with_config else None, now=NOW))


def test_show_lines_header_fields():
    text = show(DEFERRED)
    assert "id:        238CF37BF6FPHX" in text
    assert "(4m10s ago)" in text
    assert "user:      billing via listener smtp from [10.20.0.5]" in text
    assert "route:     channel trigger -> account acme_trigger (api_user acme_trigger)" in text
    assert "sender:    <billing@acme.com>" in text
    assert "size:      1234 bytes" in text


def test_show_lines_without_config_omits_api_user():
    assert "api_user" not in show(DEFERRED, with_config=False)


def test_show_lines_deferred_recipient_says_why_it_waits_and_until_when():
    """A deferred recipient shows its last reply as the reason it waits, and the next attempt."""
    lines = show_lines(DEFERRED, None, now=NOW)
    index = lines.index("  <r1@example.org>  deferred, 2 attempt(s)")
    assert lines[index + 1].strip() == "waits: 451 4.7.1 greylisted; next attempt in 5m"


def test_show_lines_queued_recipient_not_tried_yet():
    lines = show_lines(QUEUED, None, now=NOW)
    index = lines.index("  <r0@example.org>  queued, 0 attempt(s)")
    assert lines[index + 1].strip() == "waits: not tried yet; next attempt now"


def test_show_lines_overdue_recipient_is_due_now():
    overdue = message("X", 600, [rcpt("X", 0, State.DEFERRED, 1, NOW - 30, "421 4.4.2 bye")])
    assert show_lines(overdue, None, now=NOW)[-1].strip() == "waits: 421 4.4.2 bye; next attempt now"


def test_show_lines_final_recipients_show_last_reply_and_email_id():
    text = show(DEFERRED)
    assert "<r0@example.org>  delivered, 1 attempt(s)" in text
    assert "last reply: 250 #mid#Queued" in text
    assert "SendCloud emailId: mid0$r0@example.org" in text
    failed = show(FAILED)
    assert "<r0@example.org>  failed, 1 attempt(s)" in failed
    assert "last reply: 550 5.1.1 user unknown" in failed
    assert "waits:" not in failed


def test_list_record_is_the_data_behind_a_list_line():
    """/api/queue and `queue list` come from the same record."""
    record = list_record(DEFERRED, NOW)
    assert record == {
        "id": "238CF37BF6FPHX", "received_at": NOW - 250, "age": "4m10s", "user": "billing",
        "account": "acme_trigger", "channel": "trigger", "recipients_pending": 1, "recipients_total": 2,
        "state": "deferred",
    }
    assert list_lines([DEFERRED], now=NOW)[1].split() == [
        record["id"], record["age"], record["user"], record["account"], "1/2", record["state"],
    ]


def test_show_record_has_every_recipient():
    record = show_record(DEFERRED, NOW)
    assert record["client"] == "10.20.0.5" and record["sender"] == "billing@acme.com" and record["size"] == 1234
    delivered, deferred = record["recipients"]
    assert delivered == {"address": "r0@example.org", "state": "delivered", "attempts": 1, "next_attempt": None,
                         "last_reply": "250 #mid#Queued", "email_id": "mid0$r0@example.org",
                         "status": None, "events": []}
    assert deferred["next_attempt"] == NOW + 300 and deferred["last_reply"] == "451 4.7.1 greylisted"


QUERIES = {
    "nothing": ({}, ListQuery()),
    "all": ({"include_final": True}, ListQuery(include_final=True)),
    "age_days": ({"since": "1d"}, ListQuery(since=NOW - 86400)),
    "age_minutes": ({"since": "90m"}, ListQuery(since=NOW - 5400)),
    "date_local": ({"since": "2026-12-01"}, ListQuery(since=datetime(2026, 12, 1).timestamp())),
    "limit_asks_one_more": ({"limit": "50"}, ListQuery(limit=51)),
    "state": ({"state": "deferred"}, ListQuery(state=State.DEFERRED)),
    "cursor_and_filters": ({"after": "3ZK7", "user": "crm", "to": "a@x.org"},
                           ListQuery(after="3ZK7", user="crm", to="a@x.org")),
}


@pytest.mark.parametrize("given, query", QUERIES.values(), ids=QUERIES.keys())
def test_list_query_from_options(given, query):
    assert list_query(now=NOW, **given) == query


REFUSED = {
    "state": ({"state": "sent"}, "state 'sent': one of queued, deferred, delivered, failed"),
    "since": ({"since": "yesterday"}, "since 'yesterday': an age such as 1d"),
    "limit_text": ({"limit": "ten"}, "limit 'ten' is not a number"),
    "limit_zero": ({"limit": 0}, "limit must be at least 1"),
}


@pytest.mark.parametrize("given, why", REFUSED.values(), ids=REFUSED.keys())
def test_list_query_says_which_option_is_wrong(given, why):
    with pytest.raises(ValueError, match=why.replace("(", r"\(")):
        list_query(now=NOW, **given)


def listed(*ids: str) -> list[QueuedMessage]:
    return [QueuedMessage(i, NOW, "u", "smtp", "10.0.0.5", "acct", "trigger", "s@x.org", 1) for i in ids]


PAGES = {
    "no_limit": (ListQuery(), listed("A", "B"), ["A", "B"], None),
    "short_page_is_the_last": (ListQuery(limit=3), listed("A", "B"), ["A", "B"], None),
    "full_page_has_a_next": (ListQuery(limit=3), listed("A", "B", "C"), ["A", "B"], "B"),
}


@pytest.mark.parametrize("query, messages, shown, cursor", PAGES.values(), ids=PAGES.keys())
def test_page_shows_the_limit_and_the_cursor_to_the_rest(query, messages, shown, cursor):
    got, after = page(messages, query)
    assert [m.id for m in got] == shown and after == cursor


def test_list_lines_says_how_to_get_the_next_page():
    assert list_lines(listed("A"), NOW, more_after="A")[-1] == "-- 1 message(s); more with --after A"
