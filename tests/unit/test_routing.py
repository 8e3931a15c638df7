"""relay.routing.choose_route: which channel and account carry a message, as a table."""

from __future__ import annotations

from typing import NamedTuple

import pytest

from relay.rewrite import header_reader
from relay.routing import Envelope, choose_route
from tests.unit.helpers import config_from

BASE = """
server:
  hostname: relay.test
  listeners:
    - {name: smtp, port: 2525, tls: none, auth: optional}
    - {name: submission, port: 2587, tls: none, auth: required}
upstream: {kind: capture}
accounts:
  acme_trigger: {api_user: acme_trigger, type: trigger, domain: acme.com}
  acme_batch:   {api_user: acme_batch,   type: batch,   domain: news.acme.com}
  ops_trigger:  {api_user: ops_trigger,  type: trigger, domain: ops.acme.com}
  promo_batch:  {api_user: promo_batch,  type: batch,   domain: promo.acme.com}
users:
  billing: {channels: {trigger: acme_trigger, batch: acme_batch}}
  ops:     {channels: {trigger: ops_trigger}}
  promo:   {channels: {batch: promo_batch}}
"""

PLAIN = b"From: billing@acme.com\r\nTo: a@example.org\r\nSubject: Invoice\r\n\r\nbody\r\n"
NEWSLETTER = b"From: billing@acme.com\r\nx-mail-type: NewsLetter\r\nSubject: News\r\n\r\nbody\r\n"
WEEKLY = b"From: billing@acme.com\r\nX-Mail-Type:  newsletter-weekly \r\n\r\nbody\r\n"
TWO = ["a@example.org", "b@example.org"]
THREE = ["a@example.org", "b@example.org", "c@example.org"]

HEADER_RULE = "- match: {header: {X-Mail-Type: newsletter}}\n  channel: batch\n"


class Decision(NamedTuple):
    channel: str
    account: str
    rule: int | None


class Case(NamedTuple):
    rules: str
    user: str
    expected: Decision
    listener: str = "smtp"
    sender: str = "billing@acme.com"
    recipients: tuple[str, ...] = ("a@example.org",)
    message: bytes = PLAIN


TRIGGER = Decision("trigger", "acme_trigger", None)

CASES = {
    "no_rules_default_trigger": Case("", "billing", TRIGGER),
    "no_rules_user_with_only_batch": Case("", "promo", Decision("batch", "promo_batch", None)),
    "no_rules_user_with_only_trigger": Case("", "ops", Decision("trigger", "ops_trigger", None)),
    "header_rule_matches_case_insensitively": Case(
        HEADER_RULE, "billing", Decision("batch", "acme_batch", 0), message=NEWSLETTER
    ),
    "header_rule_glob": Case(
        "- match: {header: {x-mail-type: 'news*'}}\n  channel: batch\n",
        "billing", Decision("batch", "acme_batch", 0), message=WEEKLY,
    ),
    "header_rule_other_value": Case(
        HEADER_RULE, "billing", TRIGGER, message=PLAIN.replace(b"Subject", b"X-Mail-Type: receipt\r\nSubject")
    ),
    "header_rule_header_absent": Case(HEADER_RULE, "billing", TRIGGER),
    "recipients_more_than_exceeded": Case(
        "- match: {recipients_more_than: 2}\n  channel: batch\n",
        "billing", Decision("batch", "acme_batch", 0), recipients=tuple(THREE),
    ),
    "recipients_more_than_not_exceeded": Case(
        "- match: {recipients_more_than: 2}\n  channel: batch\n", "billing", TRIGGER, recipients=tuple(TWO)
    ),
    "sender_glob_case_insensitive": Case(
        "- match: {sender: '*@news.acme.com'}\n  channel: batch\n",
        "billing", Decision("batch", "acme_batch", 0), sender="Offers@NEWS.acme.com",
    ),
    "sender_glob_no_match": Case("- match: {sender: '*@news.acme.com'}\n  channel: batch\n", "billing", TRIGGER),
    "recipient_domain_any_recipient": Case(
        "- match: {recipient_domains: [Example.NET]}\n  channel: batch\n",
        "billing", Decision("batch", "acme_batch", 0), recipients=("a@example.org", "b@example.net"),
    ),
    "recipient_domain_no_match": Case(
        "- match: {recipient_domains: [example.net]}\n  channel: batch\n", "billing", TRIGGER
    ),
    "recipient_domain_is_not_a_suffix_match": Case(
        "- match: {recipient_domains: [example.org]}\n  channel: batch\n",
        "billing", TRIGGER, recipients=("a@mail.example.org",),
    ),
    "listener_matches": Case(
        "- match: {listener: submission}\n  channel: batch\n",
        "billing", Decision("batch", "acme_batch", 0), listener="submission",
    ),
    "listener_list_matches": Case(
        "- match: {listener: [alt, submission]}\n  channel: batch\n",
        "billing", Decision("batch", "acme_batch", 0), listener="submission",
    ),
    "listener_other": Case("- match: {listener: submission}\n  channel: batch\n", "billing", TRIGGER),
    "user_matches": Case(
        "- match: {user: [ops, billing]}\n  channel: batch\n", "billing", Decision("batch", "acme_batch", 0)
    ),
    "user_other": Case("- match: {user: ops}\n  channel: batch\n", "billing", TRIGGER),
    "all_conditions_must_hold": Case(
        "- match: {sender: '*@acme.com', header: {X-Mail-Type: newsletter}}\n  channel: batch\n",
        "billing", TRIGGER,
    ),
    "rule_for_channel_user_lacks_is_skipped": Case(
        "- {channel: batch}\n", "ops", Decision("trigger", "ops_trigger", None)
    ),
    "skipped_rule_falls_through_to_next_rule": Case(
        "- {channel: trigger}\n- {channel: batch}\n", "promo", Decision("batch", "promo_batch", 1)
    ),
    "first_match_wins": Case(
        "- match: {sender: '*@acme.com'}\n  channel: trigger\n" + HEADER_RULE,
        "billing", Decision("trigger", "acme_trigger", 0), message=NEWSLETTER,
    ),
    "later_rule_when_first_does_not_match": Case(
        "- match: {user: ops}\n  channel: trigger\n" + HEADER_RULE,
        "billing", Decision("batch", "acme_batch", 1), message=NEWSLETTER,
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_choose_route(case: Case):
    """Rules in order, first match wins, rules for channels the user lacks are skipped."""
    rules = "rules:\n" + "".join(f"  {line}\n" for line in case.rules.splitlines()) if case.rules else ""
    config = config_from(BASE + rules)
    envelope = Envelope(case.user, case.listener, case.sender, list(case.recipients))
    route = choose_route(config, envelope, header_reader(case.message))
    assert (route.channel, route.account, route.rule) == case.expected


def test_headers_are_not_parsed_when_no_rule_asks():
    """The header lookup is lazy: routing without header rules never calls it."""
    config = config_from(BASE + "rules:\n  - match: {recipients_more_than: 0}\n    channel: batch\n")

    def header(name: str):
        raise AssertionError(f"header {name} was read")

    route = choose_route(config, Envelope("billing", "smtp", "a@acme.com", ["x@example.org"]), header)
    assert (route.channel, route.account, route.rule) == ("batch", "acme_batch", 0)
