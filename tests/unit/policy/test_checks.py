"""relay.policy: MAIL/RCPT restrictions and who owns a session, with the spec's reply codes."""

from __future__ import annotations

import pytest

from relay.config import User
from relay.policy.checks import check_recipient, check_relay, check_sender, identify
from tests.unit.helpers import config_from


def user(*allowed: str) -> User:
    return User(channels={"trigger": "acme_trigger"}, allowed_senders=list(allowed))


# -- check_sender: 553 5.7.1 on MAIL ------------------------------------------------------------------

SENDERS = {
    "empty_list_allows_anyone": ([], "anyone@anywhere.org", True),
    "empty_list_allows_null_sender": ([], "", True),
    "glob_matches": (["*@acme.com"], "billing@acme.com", True),
    "address_case_ignored": (["*@acme.com"], "Billing@ACME.Com", True),
    "pattern_case_ignored": (["*@ACME.COM"], "billing@acme.com", True),
    "exact_address": (["billing@acme.com"], "billing@acme.com", True),
    "exact_address_other_local_part": (["billing@acme.com"], "ceo@acme.com", False),
    "other_domain": (["*@acme.com"], "billing@evil.org", False),
    "suffix_trick": (["*@acme.com"], "billing@acme.com.evil.org", False),
    "subdomain_not_implied": (["*@acme.com"], "billing@mail.acme.com", False),
    "second_pattern": (["*@acme.com", "*@*.acme.com"], "billing@mail.acme.com", True),
    "null_sender_with_list_is_allowed_for_bounces": (["*@acme.com"], "", True),
}


@pytest.mark.parametrize("allowed, sender, ok", SENDERS.values(), ids=SENDERS.keys())
def test_check_sender(allowed, sender, ok):
    """allowed_senders globs, case-insensitive; a sender outside them gets 553 5.7.1."""
    reply = check_sender("billing", user(*allowed), sender)
    if ok:
        assert reply is None
    else:
        assert (reply.code, reply.enhanced) == (553, "5.7.1")
        assert f"<{sender}>" in reply.text


# -- check_relay: 554 5.7.1 on RCPT, never an open relay ---------------------------------------------


def test_unidentified_client_cannot_relay():
    reply = check_relay(None, "victim@example.org")
    assert (reply.code, reply.enhanced) == (554, "5.7.1")
    assert "victim@example.org" in reply.text


def test_identified_user_may_relay():
    assert check_relay("billing", "someone@example.org") is None


# -- check_recipient: syntax, and 452 4.5.3 past the limit -------------------------------------------

RECIPIENTS = {
    "plain": ("someone@example.org", 0, 100, None),
    "subdomain": ("a.b+tag@mail.example.co.uk", 0, 100, None),
    "last_allowed": ("someone@example.org", 99, 100, None),
    "limit_reached": ("someone@example.org", 100, 100, (452, "4.5.3")),
    "far_past_limit": ("someone@example.org", 150, 100, (452, "4.5.3")),
    "limit_of_one": ("someone@example.org", 1, 1, (452, "4.5.3")),
    "empty": ("", 0, 100, (501, "5.1.3")),
    "no_at": ("someone.example.org", 0, 100, (501, "5.1.3")),
    "no_local_part": ("@example.org", 0, 100, (501, "5.1.3")),
    "no_domain": ("someone@", 0, 100, (501, "5.1.3")),
    "dotless_domain": ("someone@localhost", 0, 100, (501, "5.1.3")),
    "dot_only_domain": ("someone@.", 0, 100, (501, "5.1.3")),
}


@pytest.mark.parametrize("recipient, accepted, limit, expected", RECIPIENTS.values(), ids=RECIPIENTS.keys())
def test_check_recipient(recipient, accepted, limit, expected):
    """Bad syntax is refused; recipients past max_recipients get 452 4.5.3 (temporary)."""
    reply = check_recipient(recipient, accepted, limit)
    if expected is None:
        assert reply is None
    else:
        assert (reply.code, reply.enhanced) == expected


# -- identify: the owner of the session's mail ----------------------------------------------------------

IDENTIFY_CONFIG = """
server:
  hostname: relay.test
  listeners:
    - {name: smtp, port: 2525, tls: none, auth: optional}
    - {name: submission, port: 2587, tls: none, auth: required}
    - {name: internal, port: 2526, tls: none, auth: none}
  trusted_networks:
    - {cidr: 10.20.0.0/16, user: mailhub}
upstream: {kind: capture}
accounts:
  acme_trigger: {api_user: acme_trigger, type: trigger, domain: acme.com}
users:
  billing: {channels: {trigger: acme_trigger}}
  mailhub: {channels: {trigger: acme_trigger}}
"""

IDENTITIES = {
    "auth_user": ("smtp", "billing", "192.0.2.1", "billing"),
    "auth_user_wins_over_trusted_network": ("smtp", "billing", "10.20.0.5", "billing"),
    "auth_user_removed_by_reload": ("smtp", "gone", "192.0.2.1", None),
    "auth_user_removed_inside_trusted_network": ("smtp", "gone", "10.20.0.5", None),
    "trusted_network": ("smtp", None, "10.20.0.5", "mailhub"),
    "unknown_client": ("smtp", None, "192.0.2.1", None),
    "auth_required_ignores_trusted_network": ("submission", None, "10.20.0.5", None),
    "auth_required_with_auth": ("submission", "billing", "10.20.0.5", "billing"),
    "auth_none_trusted_network": ("internal", None, "10.20.0.5", "mailhub"),
    "auth_none_unknown_client": ("internal", None, "192.0.2.1", None),
}


@pytest.mark.parametrize("listener, authenticated, client, expected", IDENTITIES.values(), ids=IDENTITIES.keys())
def test_identify(listener, authenticated, client, expected):
    """Every message has exactly one owner, or none (and then relaying is refused)."""
    config = config_from(IDENTIFY_CONFIG)
    listeners = {item.name: item for item in config.server.listeners}
    owner = identify(config, listeners[listener], authenticated, client)
    assert owner == expected
    if owner is None:
        assert check_relay(owner, "someone@example.org").code == 554


# -- control characters: 501 5.5.2 (HELO, AUTH) / 553 5.1.7 (MAIL, RCPT) ------------------------

from relay.policy.checks import check_address_chars, check_auth_identity, check_helo

HELOS = {
    "hostname": ("mail.acme.com", None),
    "address_literal": ("[10.0.0.5]", None),
    "tab_is_whitespace_not_a_line_break": ("host\tname", None),
    "non_ascii_is_not_a_control": ("почта.рф", None),
    "bare_cr_forging_a_header": ("x\rX-SMTPAPI: eyJ0byI6W119", (501, "5.5.2")),
    "bare_lf": ("x\nY: 1", (501, "5.5.2")),
    "crlf": ("x\r\n", (501, "5.5.2")),
    "nul": ("x\x00", (501, "5.5.2")),
    "escape": ("x\x1b[2J", (501, "5.5.2")),
    "del": ("x\x7f", (501, "5.5.2")),
    "c1_csi": ("x\x9b31m", (501, "5.5.2")),
}


@pytest.mark.parametrize("argument, expected", HELOS.values(), ids=HELOS.keys())
def test_check_helo(argument, expected):
    reply = check_helo(argument)
    assert (reply and (reply.code, reply.enhanced)) == expected
    if reply:
        assert argument not in reply.text and "\r" not in reply.text and "\n" not in reply.text


ADDRESSES = {
    "plain": ("a@acme.com", "MAIL", None),
    "null_sender": ("", "MAIL", None),
    "quoted_local_part": ('"john doe"@acme.com', "RCPT", None),
    "nul_in_mail": ("a\x00@acme.com", "MAIL", (553, "5.1.7")),
    "cr_in_quoted_local_part": ('"a\rX-Evil: 1"@acme.com', "MAIL", (553, "5.1.7")),
    "lf_in_rcpt": ("b@example.net\nRCPT TO:<c@x.org>", "RCPT", (553, "5.1.7")),
    "tab_in_rcpt": ("b\t@example.net", "RCPT", (553, "5.1.7")),
    "del_in_rcpt": ("b\x7f@example.net", "RCPT", (553, "5.1.7")),
    "c1_in_mail": ("b\x85@example.net", "MAIL", (553, "5.1.7")),
}


@pytest.mark.parametrize("address, command, expected", ADDRESSES.values(), ids=ADDRESSES.keys())
def test_check_address_chars(address, command, expected):
    reply = check_address_chars(address, command)
    assert (reply and (reply.code, reply.enhanced)) == expected
    if reply:
        assert address not in reply.text and reply.text.startswith("Sender" if command == "MAIL" else "Recipient")


IDENTITIES = {
    "user": ("billing", None),
    "address_as_user": ("ops@acme.com", None),
    "utf8_user": ("运维", None),
    "newline_forging_a_maillog_line": ("x\r\n238CDPP1K3S5NL: to=<a@b.c>, status=sent", (501, "5.5.2")),
    "nul": ("billing\x00", (501, "5.5.2")),
    "tab": ("bill\ting", (501, "5.5.2")),
    "ansi_escape": ("\x1b[31mroot", (501, "5.5.2")),
    "del": ("billing\x7f", (501, "5.5.2")),
}


@pytest.mark.parametrize("text, expected", IDENTITIES.values(), ids=IDENTITIES.keys())
def test_check_auth_identity(text, expected):
    reply = check_auth_identity(text)
    assert (reply and (reply.code, reply.enhanced)) == expected
