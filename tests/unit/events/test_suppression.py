"""relay.events.suppression: what events add to the list, the CSV import and export."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from relay.events.suppression import (
    DEFAULT_SUPPRESS,
    SuppressionImportError,
    channels_for,
    from_event,
    parse_csv,
    to_csv,
)
from relay.policy.suppression import CHANNELS, Entry, rcpt_refusal

ALL = frozenset({"trigger", "batch"})
BATCH = frozenset({"batch"})
TRIGGER = frozenset({"trigger"})
NONE = frozenset()

DAY = 86400.0
ADDED = datetime(2026, 11, 30, 22, 15, tzinfo=timezone.utc).timestamp()
NOW = ADDED + 10 * DAY
BOTH = {"trigger": "acme_trigger", "batch": "acme_batch"}


def entry(reason="invalid", channels=ALL, account=None, added_at=ADDED, expires_at=None, address="someone@example.org"):
    return Entry(address, reason, channels, account, added_at, expires_at)


CHANNELS_FOR = {
    "invalid_default": ("invalid", {}, ALL),
    "alias_default": ("invalid_email", {}, ALL),
    "spam_default": ("spam-report", {}, ALL),
    "unsubscribe_default": ("unsubscribe", {}, BATCH),
    "deliver_never": ("deliver", {}, NONE),
    "soft_bounce_never_even_if_named": ("soft_bounce", {"soft_bounce": "all"}, NONE),
    "open_never": ("open", {}, NONE),
    "unsubscribe_all": ("unsubscribe", {"unsubscribe": "all"}, ALL),
    "invalid_trigger": ("invalid", {"invalid": "trigger"}, TRIGGER),
    "spam_none": ("report_spam", {"report_spam": "none"}, NONE),
    "setting_with_alias_key": ("report_spam", {"spam-report": "batch"}, BATCH),
    "unnamed_event_keeps_its_default": ("report_spam", {"invalid": "none"}, ALL),
    "value_case_insensitive": ("invalid", {"invalid": "Batch"}, BATCH),
}


@pytest.mark.parametrize("event, setting, channels", CHANNELS_FOR.values(), ids=CHANNELS_FOR.keys())
def test_channels_for(event, setting, channels):
    assert channels_for(event, setting) == channels


def test_channels_for_refuses_an_unknown_setting_value():
    with pytest.raises(ValueError, match="events.suppress.invalid"):
        channels_for("invalid", {"invalid": "everything"})


def test_default_suppress_is_the_spec_default():
    assert DEFAULT_SUPPRESS == {"invalid": "all", "report_spam": "all", "unsubscribe": "batch"}


def test_from_event_is_relay_wide_and_records_the_source_account():
    added = from_event("Someone@Example.ORG", "unsubscribe", "acme_batch", ADDED, DEFAULT_SUPPRESS)
    assert added == Entry("someone@example.org", "unsubscribe", BATCH, None, ADDED, None, "acme_batch")
    assert from_event("someone@example.org", "deliver", "acme_batch", ADDED, DEFAULT_SUPPRESS) is None
    assert from_event("someone@example.org", "invalid", "acme_batch", ADDED, {"invalid": "none"}) is None


# --- CSV --------------------------------------------------------------------------------

NOW_CSV = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc).timestamp()

ROWS = {
    "address_only": ("someone@example.org", ("someone@example.org", "manual", None, None, ALL)),
    "reason": ("someone@example.org,report_spam", ("someone@example.org", "report_spam", None, None, ALL)),
    "reason_alias": ("someone@example.org,spam-report", ("someone@example.org", "report_spam", None, None, ALL)),
    "account": ("Someone@Example.org,manual,acme_batch", ("someone@example.org", "manual", "acme_batch", None, ALL)),
    "duration_days": ("a@x.org,unsubscribe,,30d", ("a@x.org", "unsubscribe", None, NOW_CSV + 30 * DAY, ALL)),
    "duration_hours": ("a@x.org,manual,,12h", ("a@x.org", "manual", None, NOW_CSV + 12 * 3600, ALL)),
    "duration_weeks": ("a@x.org,manual,,2w", ("a@x.org", "manual", None, NOW_CSV + 14 * DAY, ALL)),
    "iso_date_is_utc_midnight": (
        "a@x.org,invalid,,2027-01-31", ("a@x.org", "invalid", None, datetime(2027, 1, 31, tzinfo=timezone.utc).timestamp(), ALL)
    ),
    "iso_datetime_zulu": (
        "a@x.org,invalid,,2027-01-31T08:30:00Z",
        ("a@x.org", "invalid", None, datetime(2027, 1, 31, 8, 30, tzinfo=timezone.utc).timestamp(), ALL),
    ),
    "iso_datetime_with_offset": (
        "a@x.org,invalid,,2027-01-31T08:30:00+08:00",
        ("a@x.org", "invalid", None, datetime(2027, 1, 31, 0, 30, tzinfo=timezone.utc).timestamp(), ALL),
    ),
    "spaces_and_quotes": (' "a@x.org" , manual , acme_batch , 1d ', ("a@x.org", "manual", "acme_batch", NOW_CSV + DAY, ALL)),
    "channels_column": ("a@x.org,unsubscribe,,,batch", ("a@x.org", "unsubscribe", None, None, BATCH)),
    "empty_reason_is_manual": ("a@x.org,,acme_batch", ("a@x.org", "manual", "acme_batch", None, ALL)),
}


@pytest.mark.parametrize("line, expected", ROWS.values(), ids=ROWS.keys())
def test_parse_csv_rows(line, expected):
    (row,) = parse_csv(line + "\n", NOW_CSV)
    assert (row.address, row.reason, row.account, row.expires_at, row.channels) == expected
    assert row.line == 1


def test_parse_csv_header_blank_lines_bom_and_line_numbers():
    text = "\ufeffaddress,reason,account,expires\r\n\r\nA@X.org,invalid\r\nb@x.org,manual,acme_batch,7d\r\n"
    rows = parse_csv(text, NOW_CSV)
    assert [(row.line, row.address) for row in rows] == [(3, "a@x.org"), (4, "b@x.org")]


def test_a_header_is_only_recognised_on_the_first_line():
    with pytest.raises(SuppressionImportError) as caught:
        parse_csv("a@x.org\naddress,reason\n", NOW_CSV)
    assert caught.value.errors == [(2, "'address' is not an address")]


BAD_LINES = {
    "not_an_address": ("someone", "'someone' is not an address"),
    "two_ats": ("a@b@c.org", "is not an address"),
    "space_in_address": ("some one@x.org", "is not an address"),
    "unknown_reason": ("a@x.org,bounced", "reason 'bounced' is not one of invalid, report_spam, unsubscribe, manual"),
    "soft_bounce_is_not_a_reason": ("a@x.org,soft_bounce", "reason 'soft_bounce'"),
    "bad_expiry": ("a@x.org,manual,,soon", "expires 'soon' is neither a duration like 30d nor an ISO date"),
    "bad_duration_unit": ("a@x.org,manual,,30y", "expires '30y'"),
    "bad_channels": ("a@x.org,manual,,,bulk", "channels 'bulk'"),
    "too_many_columns": ("a@x.org,manual,,,all,extra", "6 columns"),
}


@pytest.mark.parametrize("line, message", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_parse_csv_errors_name_the_line(line, message):
    with pytest.raises(SuppressionImportError) as caught:
        parse_csv(f"address,reason\nok@x.org,manual\n{line}\n", NOW_CSV)
    ((number, text),) = caught.value.errors
    assert number == 3
    assert message in text
    assert str(caught.value).startswith("line 3: ")
    assert isinstance(caught.value, ValueError)


def test_parse_csv_reports_every_bad_line_at_once():
    with pytest.raises(SuppressionImportError) as caught:
        parse_csv("nope\nok@x.org\na@x.org,bounced\n", NOW_CSV)
    assert [line for line, _ in caught.value.errors] == [1, 3]


def test_csv_round_trip():
    entries = [
        Entry("someone@example.org", "invalid", ALL, None, ADDED),
        Entry("news@example.org", "unsubscribe", BATCH, None, ADDED, None, "acme_batch"),
        Entry("ops@example.org", "manual", TRIGGER, "acme_trigger", ADDED, NOW + 0.5),
        Entry('"odd,name"@example.org', "report_spam", ALL, "acme_batch", ADDED, NOW + 30 * DAY),
    ]
    text = to_csv(entries)
    assert text.splitlines()[0] == "address,reason,account,expires,channels"
    rows = parse_csv(text, NOW_CSV)
    assert [(r.address, r.reason, r.channels, r.account, r.expires_at) for r in rows] == [
        (e.address, e.reason, e.channels, e.account, e.expires_at) for e in entries
    ]
    assert [row.to_entry(ADDED) for row in rows] == [Entry(e.address, e.reason, e.channels, e.account, ADDED, e.expires_at) for e in entries]


def test_to_csv_writes_iso_utc_expiry():
    text = to_csv([Entry("a@x.org", "manual", ALL, None, ADDED, datetime(2027, 1, 31, 8, 30, tzinfo=timezone.utc).timestamp())])
    assert text == "address,reason,account,expires,channels\na@x.org,manual,,2027-01-31T08:30:00Z,all\n"


def test_imported_rows_apply_to_every_channel_by_default():
    (row,) = parse_csv("a@x.org,unsubscribe\n", NOW_CSV)
    assert row.to_entry(NOW_CSV).channels == CHANNELS
    assert rcpt_refusal([row.to_entry(NOW_CSV)], BOTH, NOW_CSV).text == "<a@x.org>: suppressed (unsubscribe 2026-12-01)"
