"""The reply decisions of the SMTP front end: enhanced codes, what of an unknown command is logged, EHLO."""

from __future__ import annotations

import pytest

from relay.smtp.protocol import is_error, loggable_verb, with_enhanced_code
from relay.smtp.session import ehlo_reply


@pytest.mark.parametrize(("status", "expected"), [
    ("503 Error: need MAIL command", "503 5.5.1 Error: need MAIL command"),
    ("501 Syntax: MAIL FROM: <address>", "501 5.5.4 Syntax: MAIL FROM: <address>"),
    ("500 Error: bad syntax", "500 5.5.2 Error: bad syntax"),
    ("554 Command refused due to lack of security", "554 5.7.0 Command refused due to lack of security"),
    ("523 odd", "523 5.0.0 odd"),  # an unknown code takes its class's X.0.0
    ("250 OK", "250 2.0.0 OK"),
    ("221 Bye", "221 2.0.0 Bye"),
    ("220 Ready to start TLS", "220 2.0.0 Ready to start TLS"),
    # already complete, or never given one: the greeting, HELO, EHLO lines, 354, our replies
    ("553 5.1.3 Error: malformed address", "553 5.1.3 Error: malformed address"),
    ("220 relay.test ESMTP", "220 relay.test ESMTP"),
    ("250 relay.test", "250 relay.test"),
    ("250-PIPELINING", "250-PIPELINING"),
    ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
    ("250 2.0.0 Ok: queued as X", "250 2.0.0 Ok: queued as X"),
])
def test_with_enhanced_code(status, expected):
    assert with_enhanced_code(status) == expected


@pytest.mark.parametrize(("status", "error"), [("250 OK", False), ("354 Go", False), ("451 4.3.0 x", True), ("535 5.7.8 x", True)])
def test_is_error(status, error):
    assert is_error(status) is error


@pytest.mark.parametrize(("command", "logged"), [
    ("XCLIENT", "XCLIENT"),
    ("BDAT", "BDAT"),
    ("X-LINK2STATE", "X-LINK2STATE"),
    # a base64 password line sent after a 538 is an "unrecognised command" too: never logged
    ("AGJPBGXPBMCAYMLSBGLUZY1ZZWNYZXQ=", None),
    ("BILLING-SECRET", None),
    ("", None),
])
def test_loggable_verb(command, logged):
    assert loggable_verb(command) == logged


AIOSMTPD_EHLO = ["250-relay.test", "250-SIZE 65536", "250-8BITMIME", "250-STARTTLS", "250-AUTH LOGIN PLAIN", "250 HELP"]


def test_ehlo_reply_adds_pipelining_and_enhanced_codes_and_drops_help():
    assert ehlo_reply(AIOSMTPD_EHLO, offer_auth=True) == [
        "250-relay.test", "250-PIPELINING", "250-SIZE 65536", "250-8BITMIME", "250-STARTTLS",
        "250-AUTH LOGIN PLAIN", "250 ENHANCEDSTATUSCODES",
    ]


def test_ehlo_reply_without_auth():
    reply = ehlo_reply(AIOSMTPD_EHLO, offer_auth=False)
    assert not any("AUTH" in line for line in reply)
    assert reply[-1] == "250 ENHANCEDSTATUSCODES" and all(line.startswith("250-") for line in reply[:-1])
