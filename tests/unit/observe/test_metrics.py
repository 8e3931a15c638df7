"""relay.observe.metrics: refusal replies as bounded reason words."""

from __future__ import annotations

import pytest

from relay.errors import SMTPReply
from relay.observe.metrics import reason_for


def received(line: str) -> SMTPReply:
    code, _, rest = line.partition(" ")
    return SMTPReply.received(int(code), rest) if code.isdigit() else SMTPReply(None, None, line)

REASONS = {
    "relay": ("554 5.7.1 <x@y.org>: Relay access denied", "relay_denied"),
    "sender": ("553 5.7.1 <a@b.c>: Sender address rejected", "sender_not_allowed"),
    "syntax": ("501 5.1.3 <x>: Bad recipient address syntax", "bad_recipient_syntax"),
    "count": ("452 4.5.3 Error: too many recipients", "too_many_recipients"),
    "spool": ("451 4.3.0 Requested action aborted: spool unavailable", "spool_unavailable"),
    "size": ("552 5.3.4 Message size exceeds fixed maximum message size", "message_too_big"),
    "auth": ("530 5.7.0 Authentication required", "auth_required"),
    "rate": ("451 4.7.1 Try later", "rate_limited"),
    "unknown_enhanced": ("550 5.7.0 Policy", "smtp_550_5.7.0"),
    "no_enhanced": ("503 Error: need RCPT command", "smtp_503_x"),
    "garbage": ("oops", "other"),
}


@pytest.mark.parametrize("reply, reason", REASONS.values(), ids=REASONS.keys())
def test_reason_for(reply, reason):
    assert reason_for(received(reply)) == reason
