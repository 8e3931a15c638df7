"""relay.delivery.bounce: RFC 3464 delivery status notifications for recipients that failed for good."""

from __future__ import annotations

import email
import email.utils
import re

import pytest

from relay.delivery.bounce import FailedRecipient, build_dsn
from relay.delivery.retry import RetryPolicy, after_attempt
from relay.errors import SMTPReply
from relay.spool import Recipient, State

GAVE_UP = " (gave up: message older than the spool's max_lifetime)"


def failed(address: str, reply_text: str) -> FailedRecipient:
    """A recipient failed for good by the retry rules, from its last reply as the upstream sent
    it (``GAVE_UP`` at the end: a temporary reply that outlived ``max_lifetime``)."""
    text = reply_text.removesuffix(GAVE_UP)
    code, _, rest = text.partition(" ")
    reply = SMTPReply.received(int(code), rest) if code.isdigit() else SMTPReply(None, None, text)
    waiting = Recipient("3ZK7Q9M2XD4HWT", 0, address, State.DEFERRED, 3, 0.0)
    update = after_attempt(waiting, reply, received_at=0.0, now=10.0, policy=RetryPolicy((60.0,), 0.0, 5.0), retry_at=70.0)
    assert update.state is State.FAILED
    return FailedRecipient(address, update.last_reply, update.dsn_status)
ORIGINAL_HEADERS = (
    b"From: Billing <billing@acme.com>\r\n"
    b"To: someone@example.org\r\n"
    b"Subject: Invoice 2024-117\r\n"
    b"Message-ID: <inv-117@acme.com>\r\n"
)


def dsn(*recipients: FailedRecipient, headers: bytes = ORIGINAL_HEADERS) -> bytes:
    return build_dsn(
        queue_id="3ZK7Q9M2XD4HWT",
        original_sender="billing@acme.com",
        recipients=recipients or (failed("nobody@example.org", "550 5.1.1 user unknown"),),
        original_headers=headers,
        reporting_mta="relay.acme.internal",
        from_domain="info.acme.com",
        arrival=1_700_000_000.0,
        now=1_700_086_400.0,
    )


def parts(data: bytes):
    message = email.message_from_bytes(data)
    assert message.get_content_type() == "multipart/report"
    return message, message.get_payload()


def test_dsn_is_a_three_part_delivery_status_report():
    message, (notification, report, headers) = parts(dsn())
    assert message.get_param("report-type") == "delivery-status"
    assert notification.get_content_type() == "text/plain"
    assert report.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"
    assert not message.defects


def test_dsn_envelope_headers():
    """From the mailer daemon at the given domain, to the original sender, marked automatic."""
    message, _ = parts(dsn())
    assert email.utils.parseaddr(message["From"])[1] == "MAILER-DAEMON@info.acme.com"
    assert email.utils.parseaddr(message["To"])[1] == "billing@acme.com"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["Subject"]
    assert message["Message-ID"] and message["Date"]


RECIPIENT_STATUS = {
    "user_unknown": ("550 5.1.1 user unknown", "5.1.1"),
    "policy_reject": ("554 5.7.1 message rejected as spam", "5.7.1"),
    "no_enhanced_code": ("550 mailbox unavailable", "5.0.0"),
    "expired_without_code": ("connect to smtp.sendcloud.net[587]: Connection refused" + GAVE_UP, "4.4.7"),
    "expired_keeps_reply_code": ("451 4.7.1 greylisted, try later" + GAVE_UP, "4.7.1"),
}


@pytest.mark.parametrize("reply, status", RECIPIENT_STATUS.values(), ids=RECIPIENT_STATUS.keys())
def test_delivery_status_names_each_failed_recipient(reply, status):
    """Each failed recipient has its own block: Final-Recipient, Action: failed, Status."""
    recipients = (
        failed("first@example.org", "550 5.1.1 user unknown"),
        failed("second@example.net", reply),
    )
    _, (notification, report, _) = parts(dsn(*recipients))
    per_message, *per_recipient = report.get_payload()
    assert per_message["Reporting-MTA"] == "dns; relay.acme.internal"
    assert len(per_recipient) == 2
    first, second = per_recipient
    assert first["Final-Recipient"] == "rfc822; first@example.org"
    assert first["Action"] == "failed"
    assert first["Status"] == "5.1.1"
    assert second["Final-Recipient"] == "rfc822; second@example.net"
    assert second["Action"] == "failed"
    assert second["Status"] == status
    assert second["Diagnostic-Code"].startswith("smtp; ")
    assert "second@example.net" in notification.get_payload()


def test_original_headers_are_included():
    _, (_, _, headers) = parts(dsn())
    text = headers.get_payload()
    assert "Subject: Invoice 2024-117" in text
    assert "Message-ID: <inv-117@acme.com>" in text


def bare_line_endings(data: bytes) -> list[bytes]:
    return re.findall(rb".{0,20}(?:\r(?!\n)|(?<!\r)\n)", data)


LINE_ENDING_CASES = {
    "simple": (failed("nobody@example.org", "550 5.1.1 user unknown"),),
    "multi_line_upstream_reply": (
        failed(
            "nobody@example.org",
            "550 5.1.1 The email account that you tried to reach does not exist.\n"
            "5.1.1 Please try double-checking the recipient's email address",
        ),
    ),
}


@pytest.mark.parametrize("recipients", LINE_ENDING_CASES.values(), ids=LINE_ENDING_CASES.keys())
def test_every_line_ends_with_crlf(recipients):
    """The DSN is spooled as is: CRLF only, even when the upstream reply had several lines."""
    assert bare_line_endings(dsn(*recipients)) == []


def test_status_code_of_multi_line_reply_is_on_one_diagnostic_line():
    reply = "550 5.1.1 first line\n5.1.1 second line"
    _, (_, report, _) = parts(dsn(failed("nobody@example.org", reply)))
    block = report.get_payload()[1]
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 first line 5.1.1 second line"


STATUS_CODES = {
    "enhanced_5": ("550 5.1.1 user unknown", "5.1.1"),
    "enhanced_4": ("451 4.3.0 try again", "4.3.0"),
    "three_digit_detail": ("554 5.7.123 policy", "5.7.123"),
    "no_enhanced_permanent": ("550 no such user", "5.0.0"),
    "sendcloud_536_expired": ("536 Frequency limited" + GAVE_UP, "4.4.7"),
    "connection_error_expired": ("connect to smtp.sendcloud.net[587]: timed out" + GAVE_UP, "4.4.7"),
    "expired_upstream_ip_in_text": ("connect to 10.2.4.1[587]: Connection refused" + GAVE_UP, "4.4.7"),
    "expired_resolved_ip_in_text": (
        "connect to relay.internal[587]: Connect call failed ('10.4.5.6', 587)" + GAVE_UP,
        "4.4.7",
    ),
}


@pytest.mark.parametrize("reply, expected", STATUS_CODES.values(), ids=STATUS_CODES.keys())
def test_status_code(reply, expected):
    """The reply's own enhanced code (right after the reply code), else 4.4.7 if expired, else 5.0.0."""
    assert failed("nobody@example.org", reply).status == expected


# -- hostile addresses: defence in depth behind the 553 5.1.7 at MAIL/RCPT -------------------------

HOSTILE = {
    "crlf_in_recipient": ("billing@acme.com", "a@x.org\r\nBcc: everyone@example.net"),
    "bare_cr_in_recipient": ("billing@acme.com", "a@x.org\rX-SMTPAPI: eyJ0byI6W119"),
    "lf_in_sender": ("billing@acme.com\nBcc: everyone@example.net", "a@x.org"),
    "nul_and_escape_in_sender": ("bill\x00ing\x1b[2J@acme.com", "a@x.org"),
}


@pytest.mark.parametrize("sender, recipient", HOSTILE.values(), ids=HOSTILE.keys())
def test_no_address_can_start_a_line_of_its_own(sender, recipient):
    data = build_dsn(
        queue_id="3ZK7Q9M2XD4HWT", original_sender=sender,
        recipients=[FailedRecipient(recipient, "550 5.1.1 user unknown", "5.1.1")], original_headers=ORIGINAL_HEADERS,
        reporting_mta="relay.acme.internal", from_domain="info.acme.com", arrival=1_700_000_000.0, now=1_700_086_400.0,
    )
    assert bare_line_endings(data) == [] and b"\x00" not in data and b"\x1b" not in data
    forged = (b"\r\nBcc:", b"\r\nX-SMTPAPI:")
    assert not any(line in data for line in forged)
    message, (_, report, _) = parts(data)
    assert message["Bcc"] is None and not message.defects
    assert message["To"].startswith("<bill")
    assert [block["Action"] for block in report.get_payload()[1:]] == ["failed"]
