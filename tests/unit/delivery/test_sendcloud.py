"""relay.delivery.sendcloud: SendCloud's DATA reply and per-recipient emailIds."""

from __future__ import annotations

import pytest

from relay.delivery.sendcloud import email_ids, queued_message_id

DOC_ID = "1426390015358_15_6484_8661.sc-10_10_127_51-inbound"

QUEUED = {
    "with_code": (f"250 #{DOC_ID}#Queued", DOC_ID),
    "without_code": (f"#{DOC_ID}#Queued", DOC_ID),
    "trailing_newline": (f"#{DOC_ID}#Queued\n", DOC_ID),
    "other_id": ("250 #1700000000000_1_2_3.sc-10_9_8_7-inbound#Queued", "1700000000000_1_2_3.sc-10_9_8_7-inbound"),
    "postfix_style_reply": ("250 2.0.0 Ok: queued as 3ZK7Q9M2XD4HWT", None),
    "not_queued": (f"250 #{DOC_ID}#", None),
    "empty_id": ("250 ##Queued", None),
    "empty": ("", None),
    "capture_reply": ("2.0.0 Ok: captured as 3ZK7Q9M2XD4HWT-1.eml", None),
}


@pytest.mark.parametrize("text, expected", QUEUED.values(), ids=QUEUED.keys())
def test_queued_message_id(text, expected):
    """The messageId of ``250 #<messageId>#Queued``, with or without the code; None otherwise."""
    assert queued_message_id(text) == expected


EMAIL_IDS = {
    "one": (["a@example.org"], [f"{DOC_ID}0$a@example.org"]),
    "in_rcpt_order": (
        ["b@example.org", "a@example.org"],
        [f"{DOC_ID}0$b@example.org", f"{DOC_ID}1$a@example.org"],
    ),
    "no_padding_past_ten": (
        [f"r{i}@example.org" for i in range(12)],
        [f"{DOC_ID}{i}$r{i}@example.org" for i in range(12)],
    ),
    "none": ([], []),
}


@pytest.mark.parametrize("recipients, expected", EMAIL_IDS.values(), ids=EMAIL_IDS.keys())
def test_email_ids(recipients, expected):
    """messageId + zero-based RCPT index (no padding) + ``$`` + address, in RCPT order."""
    assert email_ids(DOC_ID, recipients) == expected


def test_email_id_index_ten_is_not_padded():
    ids = email_ids("M", [f"r{i}@x.org" for i in range(11)])
    assert ids[10] == "M10$r10@x.org"
    assert ids[1] == "M1$r1@x.org"
