"""relay.webapi.answer: SendCloud's JSON answers and the HTTP status of each SMTP refusal."""

from __future__ import annotations

import json

import pytest

from relay.errors import SMTPReply, spool_unavailable
from relay.webapi.answer import (
    TEMPLATES_STATUS,
    TEMPLATES_UNAVAILABLE,
    email_ids,
    failure,
    refusal,
    status_for_reply,
    success,
    templates_unavailable,
)


def test_email_ids_number_recipients_from_zero_in_envelope_order():
    assert email_ids("3ZK7Q9M2XD4HWT", ["a@x.net", "c@x.net", "b@x.net"]) == [
        "3ZK7Q9M2XD4HWT.0$a@x.net", "3ZK7Q9M2XD4HWT.1$c@x.net", "3ZK7Q9M2XD4HWT.2$b@x.net",
    ]
    assert email_ids("Q1", [f"u{n}@x.net" for n in range(12)])[11] == "Q1.11$u11@x.net"  # no padding
    assert email_ids("Q1", []) == []


def test_success_is_sendclouds_shape():
    answer = success("3ZK7Q9M2XD4HWT", ["3ZK7Q9M2XD4HWT.0$a@x.net"])
    assert answer == {
        "result": True, "statusCode": 200, "message": "请求成功",
        "info": {"queueId": "3ZK7Q9M2XD4HWT", "emailIdList": ["3ZK7Q9M2XD4HWT.0$a@x.net"]},
    }
    assert json.loads(json.dumps(answer, ensure_ascii=False)) == answer


def test_success_without_email_ids_when_resp_email_id_is_false():
    assert success("Q1", None) == {"result": True, "statusCode": 200, "message": "请求成功", "info": {"queueId": "Q1"}}


def test_failure_repeats_the_http_status():
    assert failure(413, "too big") == {"result": False, "statusCode": 413, "message": "too big"}


def test_templates_are_unavailable():
    assert TEMPLATES_UNAVAILABLE == templates_unavailable()
    assert templates_unavailable()["result"] is False
    assert templates_unavailable()["statusCode"] == TEMPLATES_STATUS == 400
    assert "not available through the relay" in templates_unavailable()["message"]
    assert templates_unavailable() is not templates_unavailable()


# The relay's own refusals (relay.policy, relay.errors, relay.rewrite.xsmtpapi, the listener), written out
# so that this table reads as the spec's.
@pytest.mark.parametrize(
    ("code", "enhanced", "text", "status"),
    [
        (535, "5.7.8", "Authentication credentials invalid", 401),
        (530, "5.7.0", "Authentication required", 401),
        (454, "4.7.0", "Too many failed logins from your address or for this user; AUTH refused for 5 more minute(s)", 429),
        (454, "4.7.0", "Temporary authentication failure, try again later", 503),
        (553, "5.7.1", "<x@evil.com>: Sender address rejected: not owned by user billing", 403),
        (554, "5.7.1", "<a@x.net>: Relay access denied", 403),
        (550, "5.7.1", 'X-SMTPAPI "to" names <z@x.net>, which is not a RCPT TO recipient', 403),
        (552, "5.3.4", "Message size exceeds fixed maximum message size", 413),
        (451, "4.7.1", "Rate limit exceeded: user billing may send to 100/h recipients; try again later", 429),
        (421, "4.7.1", "Too many connections from your address, try again later", 429),
        (451, "4.3.0", "Requested action aborted: spool unavailable, try again later", 503),
        (421, "4.3.0", "Service temporarily unavailable, try again later", 503),
        (421, "4.3.2", "Too many connections, try again later", 503),
        (550, "5.1.1", "<a@x.net>: Recipient address rejected: suppressed (invalid)", 400),
        (501, "5.1.3", "<a@x>: Bad recipient address syntax", 400),
        (452, "4.5.3", "Error: too many recipients", 400),
        (554, "5.6.0", "Message has 2 From headers; RFC 5322 allows exactly one", 400),
        (550, "5.6.0", "Invalid X-SMTPAPI header: not a JSON object", 400),
        (553, "5.6.7", "Non-ASCII address requires SMTPUTF8", 400),
        (450, "4.2.0", "Mailbox busy", 503),
    ],
)
def test_status_for_reply(code, enhanced, text, status):
    reply = SMTPReply(code, enhanced, text)
    assert status_for_reply(reply) == status
    assert refusal(reply) == (status, {"result": False, "statusCode": status, "message": text})


def test_spool_unavailable_is_503():
    assert status_for_reply(spool_unavailable()) == 503


@pytest.mark.parametrize("code", [250, 354])
def test_a_success_reply_is_not_a_refusal(code):
    with pytest.raises(ValueError):
        status_for_reply(SMTPReply(code, "2.0.0", "Ok"))
