"""relay.policy.suppression: when an entry applies, what RCPT hears, what a routed recipient gets,
and the cache the SMTP and delivery stages read."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import pytest

from relay.policy.suppression import (
    Entry,
    SuppressionCache,
    applies,
    normalise_address,
    rcpt_refusal,
    routed_refusal,
)

ALL = frozenset({"trigger", "batch"})
BATCH = frozenset({"batch"})
TRIGGER = frozenset({"trigger"})

DAY = 86400.0
ADDED = datetime(2026, 11, 30, 22, 15, tzinfo=timezone.utc).timestamp()
NOW = ADDED + 10 * DAY
BOTH = {"trigger": "acme_trigger", "batch": "acme_batch"}


def entry(reason="invalid", channels=ALL, account=None, added_at=ADDED, expires_at=None, address="someone@example.org"):
    return Entry(address, reason, channels, account, added_at, expires_at)


ADDRESSES = {
    "lowercase_domain": ("someone@EXAMPLE.org", "someone@example.org"),
    "lowercase_local_part": ("Some.One@example.org", "some.one@example.org"),
    "angle_brackets_and_spaces": ("  <Someone@Example.org> ", "someone@example.org"),
    "trailing_dot_of_domain": ("someone@example.org.", "someone@example.org"),
    "quoted_local_with_at": ('"a@b"@Example.org', '"a@b"@example.org'),
    "no_at": ("Postmaster", "postmaster"),
}


@pytest.mark.parametrize("raw, normal", ADDRESSES.values(), ids=ADDRESSES.keys())
def test_normalise_address(raw, normal):
    assert normalise_address(raw) == normal


APPLIES = {
    "relay_wide_all": (entry(), "batch", "acme_batch", NOW, True),
    "relay_wide_other_account": (entry(), "trigger", "ops_trigger", NOW, True),
    "batch_entry_on_trigger": (entry(channels=BATCH), "trigger", "acme_trigger", NOW, False),
    "batch_entry_on_batch": (entry(channels=BATCH), "batch", "promo_batch", NOW, True),
    "account_entry_same_account": (entry(account="acme_batch"), "batch", "acme_batch", NOW, True),
    "account_entry_other_account": (entry(account="acme_batch"), "batch", "promo_batch", NOW, False),
    "not_yet_expired": (entry(expires_at=NOW + 1), "batch", "acme_batch", NOW, True),
    "expires_now": (entry(expires_at=NOW), "batch", "acme_batch", NOW, False),
    "expired": (entry(expires_at=NOW - DAY), "batch", "acme_batch", NOW, False),
}


@pytest.mark.parametrize("e, channel, account, now, expected", APPLIES.values(), ids=APPLIES.keys())
def test_applies(e, channel, account, now, expected):
    assert applies(e, channel, account, now) is expected


REFUSALS = {
    "all_channels_entry_refuses": ([entry()], BOTH, "invalid 2026-11-30"),
    "batch_only_entry_lets_trigger_through": ([entry("unsubscribe", BATCH)], BOTH, None),
    "batch_only_user_is_refused": ([entry("unsubscribe", BATCH)], {"batch": "acme_batch"}, "unsubscribe 2026-11-30"),
    "trigger_only_user_not_refused_by_batch_entry": ([entry("unsubscribe", BATCH)], {"trigger": "acme_trigger"}, None),
    "one_entry_per_channel_together_refuse": (
        [entry("unsubscribe", BATCH), entry("manual", TRIGGER, added_at=ADDED + DAY)],
        BOTH,
        "manual 2026-12-01",
    ),
    "account_entry_for_one_of_two_accounts": ([entry("manual", account="acme_batch")], BOTH, None),
    "account_entries_for_both_accounts": (
        [entry("manual", account="acme_batch"), entry("manual", account="acme_trigger")],
        BOTH,
        "manual 2026-11-30",
    ),
    "account_entry_for_another_team": ([entry("manual", account="promo_batch")], {"batch": "acme_batch"}, None),
    "expired_entry_does_not_refuse": ([entry(expires_at=NOW - 1)], BOTH, None),
    "expired_and_live_entry": (
        [entry(expires_at=NOW - 1), entry("report_spam", added_at=ADDED - DAY)],
        BOTH,
        "report_spam 2026-11-29",
    ),
    "names_the_most_recent_entry": (
        [entry("invalid", added_at=ADDED - 300 * DAY), entry("report_spam", added_at=ADDED)],
        BOTH,
        "report_spam 2026-11-30",
    ),
    "no_entries": ([], BOTH, None),
    "user_without_channels": ([entry()], {}, None),
}


@pytest.mark.parametrize("entries, user_channels, named", REFUSALS.values(), ids=REFUSALS.keys())
def test_rcpt_refusal(entries, user_channels, named):
    reply = rcpt_refusal(entries, user_channels, NOW)
    if named is None:
        assert reply is None
    else:
        assert (reply.code, reply.enhanced) == (550, "5.1.1")
        assert reply.text == f"<someone@example.org>: suppressed ({named})"
        assert str(reply) == f"550 5.1.1 <someone@example.org>: suppressed ({named})"


def test_refusal_is_independent_of_the_order_entries_come_in():
    entries = [entry("manual", added_at=ADDED), entry("report_spam", added_at=ADDED), entry("invalid", added_at=ADDED)]
    texts = {rcpt_refusal(order, BOTH, NOW).text for order in (entries, entries[::-1], entries[1:] + entries[:1])}
    assert texts == {"<someone@example.org>: suppressed (report_spam 2026-11-30)"}


def test_refusal_echoes_the_address_as_written_and_dates_in_the_given_zone():
    from zoneinfo import ZoneInfo

    reply = rcpt_refusal([entry()], BOTH, NOW, address="Someone@Example.org", tz=ZoneInfo("Asia/Shanghai"))
    assert reply.text == "<Someone@Example.org>: suppressed (invalid 2026-12-01)"  # 22:15 UTC is the next day in UTC+8


ROUTED = {
    "batch_entry_routed_to_batch": ([entry("unsubscribe", BATCH)], "batch", "acme_batch", "unsubscribe 2026-11-30"),
    "batch_entry_routed_to_trigger": ([entry("unsubscribe", BATCH)], "trigger", "acme_trigger", None),
    "account_entry_other_account": ([entry("manual", account="promo_batch")], "batch", "acme_batch", None),
    "account_entry_this_account": ([entry("manual", account="acme_batch")], "batch", "acme_batch", "manual 2026-11-30"),
    "expired": ([entry(expires_at=ADDED + DAY)], "batch", "acme_batch", None),
}


@pytest.mark.parametrize("entries, channel, account, named", ROUTED.values(), ids=ROUTED.keys())
def test_routed_refusal(entries, channel, account, named):
    reply = routed_refusal(entries, channel, account, NOW)
    assert (reply.text if reply else None) == (f"<someone@example.org>: suppressed ({named})" if named else None)


class FakeList:
    """A spool's suppression list as the cache sees it: a version and the rows."""

    def __init__(self):
        self.rows = []
        self.version_value = 0
        self.full_reads = 0

    async def version(self):
        return self.version_value

    async def entries(self):
        self.full_reads += 1
        return list(self.rows)

    def add(self, row):
        self.rows.append(row)
        self.version_value += 1


ROW = ("someone@example.org", "invalid", ALL, None, ADDED, None, "acme_batch")


def test_cache_reads_the_list_only_when_its_version_moved():
    async def scenario():
        listed = FakeList()
        cache = SuppressionCache(listed.version, listed.entries)
        await cache.refresh()
        assert cache.rcpt_refusal("someone@example.org", BOTH, NOW) is None
        listed.add(ROW)
        await cache.refresh()
        await cache.refresh()
        assert listed.full_reads == 2  # once at version 0, once at 1; the second refresh read nothing
        reply = cache.rcpt_refusal("Someone@Example.org", BOTH, NOW)
        assert str(reply) == "550 5.1.1 <Someone@Example.org>: suppressed (invalid 2026-11-30)"
        assert cache.routed_refusal("someone@example.org", "batch", "acme_batch", NOW) is not None

    asyncio.run(scenario())


def test_cache_keeps_its_snapshot_when_a_read_fails():
    async def scenario():
        listed = FakeList()
        listed.add(ROW)
        cache = SuppressionCache(listed.version, listed.entries, interval=0.01)
        cache.start()
        await asyncio.sleep(0.05)

        async def broken():
            raise OSError("disk gone")

        cache._version = broken
        await asyncio.sleep(0.05)
        await cache.stop()
        assert cache.rcpt_refusal("someone@example.org", BOTH, NOW) is not None

    asyncio.run(scenario())
