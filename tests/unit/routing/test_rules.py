"""relay.routing.choose_route: which channel and account carry a message, as a table."""

from __future__ import annotations

from typing import NamedTuple

import pytest

from relay.rewrite.message import header_reader
from relay.routing import Envelope, choose_route, tls_policy, trace_route
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


# -- options: rule > user > global, field by field ------------------------------------------

OPTIONS_CONFIG = BASE.replace(
    "  billing: {channels: {trigger: acme_trigger, batch: acme_batch}}",
    "  billing:\n"
    "    channels: {trigger: acme_trigger, batch: acme_batch}\n"
    "    label: 11\n"
    "    tracking: {open: true, click: true}\n"
    "    sender: {mode: rewrite}\n",
) + """
sender: {mode: align, from_local: mailer}
rules:
  - match: {header: {X-Mail-Type: newsletter}}
    channel: batch
    ad_marker: prefix
    label: 22
    tracking: {click: false, unsubscribe: true}
    sender: {from_local: news}
"""


def test_options_inherit_field_by_field():
    config = config_from(OPTIONS_CONFIG)
    rule_route = choose_route(config, Envelope("billing", "smtp", "a@acme.com", ["x@example.org"]), header_reader(NEWSLETTER))
    assert rule_route.rule == 0
    options = rule_route.options
    assert (options.sender_mode, options.from_local, options.ad_marker, options.label) == ("rewrite", "news", "prefix", 22)
    assert options.tracking.model_dump() == {"open": True, "click": False, "unsubscribe": True}
    default_route = choose_route(config, Envelope("billing", "smtp", "a@acme.com", ["x@example.org"]), header_reader(PLAIN))
    options = default_route.options
    assert (options.sender_mode, options.from_local, options.ad_marker, options.label) == ("rewrite", "mailer", None, 11)
    assert options.tracking.model_dump() == {"open": True, "click": True, "unsubscribe": None}
    ops = choose_route(config, Envelope("ops", "smtp", "a@acme.com", ["x@example.org"]), header_reader(PLAIN)).options
    assert (ops.sender_mode, ops.from_local, ops.label) == ("align", "mailer", None)


def test_trace_says_why_each_rule_did_not_decide():
    config = config_from(BASE + "rules:\n"
                         "  - {match: {user: ops}, channel: trigger}\n"
                         "  - {channel: batch, match: {recipients_more_than: 5}}\n"
                         "  - {channel: batch, match: {header: {X-Mail-Type: 'news*'}}}\n")
    route, trace = trace_route(config, Envelope("billing", "smtp", "a@acme.com", ["x@example.org"]), header_reader(PLAIN))
    assert trace == [
        "rule 0: no match: user billing is not ops",
        "rule 1: no match: 1 recipient(s), not more than 5",
        "rule 2: no match: no X-Mail-Type header",
        "no rule matched: default channel trigger",
    ]
    route, trace = trace_route(config, Envelope("promo", "smtp", "a@acme.com", ["x@example.org"]), header_reader(NEWSLETTER))
    assert trace[0] == "rule 0: skipped: user promo has no trigger channel"
    assert trace[-1] == "rule 2: matches -> batch" and route.rule == 2


TLS_CONFIG = BASE + """
tls_rules:
  - {account: acme_trigger, domains: [qq.com], rule: encrypt}
  - {domains: [Example.NET], rule: may}
"""

TLS_CASES = {
    "account_and_domain": ("acme_trigger", "a@qq.com", "encrypt"),
    "subdomain": ("acme_trigger", "a@vip.qq.com", "encrypt"),
    "other_account_falls_through": ("acme_batch", "a@qq.com", "verify"),
    "any_account_rule": ("acme_batch", "a@EXAMPLE.net", "may"),
    "not_a_suffix_match": ("acme_trigger", "a@notqq.com", "verify"),
    "default_verify": ("acme_trigger", "a@gmail.com", "verify"),
}


@pytest.mark.parametrize("account, recipient, expected", TLS_CASES.values(), ids=TLS_CASES.keys())
def test_tls_policy(account, recipient, expected):
    assert tls_policy(config_from(TLS_CONFIG), account, recipient) == expected


def test_tls_policy_default_is_may_for_a_plaintext_staging_upstream():
    config = config_from(BASE.replace("upstream: {kind: capture}", "upstream: {kind: smtp, tls: none}"))
    assert tls_policy(config, "acme_trigger", "a@gmail.com") == "may"
