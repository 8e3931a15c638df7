"""relay.rewrite.rewrite_message and its stages, as tables, including hostile input.

What must hold for every case: the body passes byte for byte, and every field the stage did
not have to change keeps its exact bytes.
"""

from __future__ import annotations

import base64
import datetime
import json

import pytest

from relay.config import Tracking
from relay.errors import SMTPReply
from relay.rewrite.fields import Message
from relay.rewrite.hygiene import Arrival
from relay.rewrite.marker import add_marker
from relay.rewrite.message import rewrite_message
from relay.rewrite.sender import aligned, apply_sender_mode
from relay.routing import Options
from tests.support.mail import added_fields, fields, parsed

WHEN = datetime.datetime(2025, 3, 4, 5, 6, 7, tzinfo=datetime.timezone(datetime.timedelta(hours=8)))
ARRIVAL = Arrival(
    helo="app.internal", client_ip="10.20.0.5", esmtp=True, tls=("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256),
    authenticated_user="billing", hostname="relay.test", queue_id="3ZK7Q9M2XD4HWT",
    recipients=("a@example.net",), when=WHEN,
)
BODY = b"\r\nline one\r\n\r\nX-Not-A-Header: body\r\n\xe4\xb8\xad\xe6\x96\x87 8-bit body\r\n"


NO_TRACKING = Tracking()


def options(mode="align", ad_marker=None, tracking=NO_TRACKING, label=None) -> Options:
    return Options(sender_mode=mode, from_local="noreply", ad_marker=ad_marker, label=label, tracking=tracking)


def rewrite(data: bytes, **kwargs):
    arguments = dict(
        options=options(), account_domain="info.acme.com", ad_marker_text="(AD)", envelope_sender="app@info.acme.com",
        recipients=["a@example.net"], user="billing", arrival=ARRIVAL,
    )
    arguments.update(kwargs)
    return rewrite_message(data, **arguments)


def text(result) -> bytes:
    """The rewritten message joined (the relay itself spools the pieces without joining them)."""
    return b"".join(result.pieces)


def test_aligned_message_only_gains_trace_and_relay_headers():
    data = b"From: App <app@info.acme.com>\r\nTo: a@example.net\r\nSubject: hi\r\nMessage-ID: <1@x>\r\nDate: Mon, 3 Mar 2025 10:00:00 +0000\r\n" + BODY
    result = rewrite(data)
    assert added_fields(data, text(result)) == ["Received", "SC-Custom-Relay-Id", "SC-Custom-Relay-User"]
    assert result.mail_from == "app@info.acme.com" and result.from_domain == "info.acme.com"
    headers = parsed(text(result))
    assert headers["SC-Custom-Relay-Id"] == "3ZK7Q9M2XD4HWT" and headers["SC-Custom-Relay-User"] == "billing"


def test_received_is_written_as_postfix_does():
    result = rewrite(b"From: app@info.acme.com\r\n" + BODY)
    received = fields(text(result))[0]
    assert received == (
        b"Received: from app.internal (unknown [10.20.0.5])\r\n"
        b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n"
        b"\t(Authenticated sender: billing)\r\n"
        b"\tby relay.test (sendcloud-relay) with ESMTPSA id 3ZK7Q9M2XD4HWT\r\n"
        b"\tfor <a@example.net>; Tue, 04 Mar 2025 05:06:07 +0800\r\n"
    )


def test_received_without_tls_or_auth_says_esmtp():
    arrival = Arrival(**{**ARRIVAL.__dict__, "tls": None, "authenticated_user": None, "recipients": ("a@x.net", "b@x.net")})
    received = fields(text(rewrite(b"From: app@info.acme.com\r\n" + BODY, arrival=arrival)))[0]
    assert b"with ESMTP id" in received and b"using" not in received and b"Authenticated" not in received
    assert b"for <" not in received  # several recipients: none is named, as Postfix does


def test_missing_message_id_and_date_are_added():
    result = parsed(text(rewrite(b"From: app@info.acme.com\r\n" + BODY)))
    assert result["Message-ID"] == "<20250304050607.3ZK7Q9M2XD4HWT@relay.test>"
    assert result["Date"] == "Tue, 04 Mar 2025 05:06:07 +0800"


DROPPED = {
    "bcc": b"Bcc: secret@example.org\r\n",
    "bcc_folded_lowercase": b"bcc: one@example.org,\r\n two@example.org\r\n",
    "resent_bcc": b"Resent-Bcc: x@example.org\r\n",
    "return_path": b"Return-Path: <forged@example.org>\r\n",
    "forged_relay_id": b"SC-Custom-Relay-Id: FORGED\r\n",
    "forged_relay_user": b"sc-custom-relay-user: someone-else\r\n",
}


@pytest.mark.parametrize("field", DROPPED.values(), ids=DROPPED.keys())
def test_headers_that_must_not_travel_are_dropped(field):
    result = rewrite(b"From: app@info.acme.com\r\n" + field + b"Subject: s\r\n" + BODY)
    assert field not in text(result)
    assert b"FORGED" not in text(result) and b"someone-else" not in text(result) and b"secret@" not in text(result)
    assert parsed(text(result))["SC-Custom-Relay-User"] == "billing"


def test_multiple_from_headers_are_refused():
    with pytest.raises(SMTPReply) as refused:
        rewrite(b"From: a@info.acme.com\r\nFrom: b@evil.example\r\n" + BODY)
    assert refused.value.code == 554 and "2 From headers" in refused.value.text


def test_missing_from_takes_the_envelope_sender():
    result = rewrite(b"Subject: no from\r\n" + BODY)
    assert parsed(text(result))["From"] == "app@info.acme.com"


# -- sender modes ---------------------------------------------------------------------------

SENDER_MODES = {
    # name: (mode, From field, envelope sender, expected From, expected Reply-To, expected MAIL FROM)
    "keep_passes_everything": ("keep", b"From: App <app@acme.com>\r\n", "app@acme.com", "App <app@acme.com>", None, "app@acme.com"),
    "align_same_domain": ("align", b"From: App <app@info.acme.com>\r\n", "bounces@x.example", "App <app@info.acme.com>", None, "app@info.acme.com"),
    "align_subdomain": ("align", b"From: app@eu.info.acme.com\r\n", "x@y.example", "app@eu.info.acme.com", None, "app@eu.info.acme.com"),
    "align_domain_case": ("align", b"From: App <App@INFO.Acme.com>\r\n", "a@b.example", "App <App@INFO.Acme.com>", None, "App@INFO.Acme.com"),
    "align_other_domain_rewrites": ("align", b"From: App <app@acme.com>\r\n", "app@acme.com", "App <noreply@info.acme.com>", "App <app@acme.com>", "noreply@info.acme.com"),
    "align_lookalike_domain_rewrites": ("align", b"From: x@evilinfo.acme.com\r\n", "x@e.example", "noreply@info.acme.com", "x@evilinfo.acme.com", "noreply@info.acme.com"),
    "rewrite_even_when_aligned": ("rewrite", b"From: App <app@info.acme.com>\r\n", "app@info.acme.com", "App <noreply@info.acme.com>", "App <app@info.acme.com>", "noreply@info.acme.com"),
    "rewrite_non_ascii_display_name": ("rewrite", b"From: =?utf-8?b?5byg5LiJ?= <zhang@acme.com>\r\n", "z@acme.com", "张三 <noreply@info.acme.com>", "张三 <zhang@acme.com>", "noreply@info.acme.com"),
    "rewrite_raw_utf8_display_name": ("rewrite", "From: 张三 <zhang@acme.com>\r\n".encode(), "z@acme.com", "张三 <noreply@info.acme.com>", "张三 <zhang@acme.com>", "noreply@info.acme.com"),
    "rewrite_display_name_with_comma": ("rewrite", b'From: "Doe, Jane" <jane@acme.com>\r\n', "j@acme.com", '"Doe, Jane" <noreply@info.acme.com>', '"Doe, Jane" <jane@acme.com>', "noreply@info.acme.com"),
    "from_without_domain": ("align", b"From: root\r\n", "root@host.acme.com", "noreply@info.acme.com", None, "noreply@info.acme.com"),
    "folded_from": ("align", b"From: A very long display name\r\n <app@acme.com>\r\n", "app@acme.com", "A very long display name <noreply@info.acme.com>", "A very long display name <app@acme.com>", "noreply@info.acme.com"),
    "null_sender_stays_null": ("align", b"From: MAILER-DAEMON@acme.com\r\n", "", "noreply@info.acme.com", "MAILER-DAEMON@acme.com", ""),
}


@pytest.mark.parametrize("case", SENDER_MODES.values(), ids=SENDER_MODES.keys())
def test_sender_modes(case):
    mode, from_field, envelope_sender, expected_from, expected_reply_to, expected_mail_from = case
    data = from_field + b"Sender: agent@acme.com\r\nSubject: s\r\n" + BODY
    result = rewrite(data, options=options(mode), envelope_sender=envelope_sender)
    headers = parsed(text(result))
    assert headers["From"] == expected_from
    assert result.mail_from == expected_mail_from
    if mode == "keep":
        assert headers["Sender"] == "agent@acme.com"
        assert added_fields(data, text(result)) == ["Received", "Message-ID", "Date", "SC-Custom-Relay-Id", "SC-Custom-Relay-User"]
        return
    assert headers["Sender"] is None
    assert headers["Reply-To"] == expected_reply_to
    assert text(result).endswith(BODY)


def test_rewrite_moves_the_original_from_bytes_to_reply_to():
    original = b"From: =?gb2312?b?1cXI/Q==?=\r\n <zhang@acme.com>\r\n"
    result = rewrite(original + BODY, options=options("rewrite"))
    assert b"Reply-To: =?gb2312?b?1cXI/Q==?=\r\n <zhang@acme.com>\r\n" in text(result)
    assert parsed(text(result))["From"] == "张三 <noreply@info.acme.com>"


def test_rewrite_keeps_an_existing_reply_to():
    data = b"From: app@acme.com\r\nReply-To: support@acme.com\r\n" + BODY
    headers = parsed(text(rewrite(data, options=options("rewrite"))))
    assert headers.get_all("Reply-To") == ["support@acme.com"]


def test_undecodable_display_name_is_dropped_rather_than_garbled():
    data = b"From: \xd5\xc5\xc8\xfd <zhang@acme.com>\r\n" + BODY  # raw GB2312, not UTF-8
    result = rewrite(data, options=options("rewrite"))
    assert b"From: noreply@info.acme.com\r\n" in text(result)
    assert b"Reply-To: \xd5\xc5\xc8\xfd <zhang@acme.com>\r\n" in text(result)


@pytest.mark.parametrize("domain, account, expected", [
    ("info.acme.com", "info.acme.com", True), ("a.info.acme.com", "info.acme.com", True),
    ("acme.com", "info.acme.com", False), ("xinfo.acme.com", "info.acme.com", False),
    ("INFO.ACME.COM.", "info.acme.com", True),
])
def test_aligned(domain, account, expected):
    assert aligned(domain, account) is expected


def test_sender_mode_without_from_header_adds_one():
    message = Message(b"Subject: x\r\n\r\nbody\r\n")
    assert apply_sender_mode(message, "rewrite", "noreply", "info.acme.com", "a@b.example") == "noreply@info.acme.com"
    assert message.bytes() == b"Subject: x\r\nFrom: noreply@info.acme.com\r\n\r\nbody\r\n"


# -- AD marker ------------------------------------------------------------------------------

LONG = b"x" * 989  # "Subject: " + 989 = 998 characters: the longest line RFC 5322 allows

MARKERS = {
    "prefix": ("prefix", b"Subject: Big sale\r\n", "(AD) Big sale"),
    "suffix": ("suffix", b"Subject: Big sale\r\n", "Big sale (AD)"),
    "already_prefixed": ("prefix", b"Subject: (AD) Big sale\r\n", "(AD) Big sale"),
    "already_suffixed": ("suffix", b"Subject: Big sale (AD)\r\n", "Big sale (AD)"),
    "encoded_subject": ("prefix", b"Subject: =?UTF-8?B?5aSn5YmN5L+D6ZSA?=\r\n", "(AD) 大前促销"),
    "encoded_already_marked": ("prefix", b"Subject: =?UTF-8?Q?=28AD=29_Caf=C3=A9?=\r\n", "(AD) Café"),
    "encoded_suffix": ("suffix", b"Subject: =?UTF-8?Q?Caf=C3=A9?=\r\n", "Café (AD)"),
    "folded_subject": ("suffix", b"Subject: first\r\n second\r\n", "first second (AD)"),
    "missing_subject": ("prefix", b"", "(AD)"),
    "998_character_line_prefix": ("prefix", b"Subject: " + LONG + b"\r\n", "(AD) " + LONG.decode()),
    "998_character_line_suffix": ("suffix", b"Subject: " + LONG + b"\r\n", LONG.decode() + " (AD)"),
}


@pytest.mark.parametrize("case", MARKERS.values(), ids=MARKERS.keys())
def test_ad_marker_exactly_once(case):
    position, subject, expected = case
    data = b"From: app@info.acme.com\r\n" + subject + b"X-Other: kept\r\n" + BODY
    result = rewrite(data, options=options(ad_marker=position))
    headers = parsed(text(result))
    assert headers.get_all("Subject") == [expected]
    assert b"X-Other: kept\r\n" in text(result) and text(result).endswith(BODY)
    assert all(len(line) <= 998 for line in text(result).split(b"\r\n"))
    # Applying it again changes nothing: exactly once.
    message = Message(text(result))
    add_marker(message, position, "(AD)")
    assert message.bytes() == text(result)


def test_non_ascii_marker_is_encoded():
    message = Message(b"Subject: Sale\r\n\r\nb\r\n")
    add_marker(message, "prefix", "【广告】")
    assert message.bytes().isascii()
    assert parsed(message.bytes())["Subject"] == "【广告】 Sale"


# -- X-SMTPAPI ------------------------------------------------------------------------------


def smtpapi(value: dict) -> bytes:
    return b"X-SMTPAPI: " + base64.b64encode(json.dumps(value).encode()) + b"\r\n"


def read_smtpapi(data: bytes) -> dict:
    last = fields(data)[-1]
    assert last.startswith(b"X-SMTPAPI: ") and last.count(b"\r\n") == 1  # last header, one line
    return json.loads(base64.b64decode(last[len(b"X-SMTPAPI: "):]))


def test_tracking_becomes_filters_in_the_last_header():
    result = rewrite(b"From: app@info.acme.com\r\n" + BODY, options=options(tracking=Tracking(open=True, click=False)))
    assert read_smtpapi(text(result)) == {"filters": {
        "open_tracking": {"settings": {"enable": "1"}}, "click_tracking": {"settings": {"enable": "0"}},
    }}


def test_client_header_is_merged_rule_values_win_where_set():
    client = {"to": ["a@example.net"], "sub": {"%name%": ["Ann"]},
              "filters": {"open_tracking": {"settings": {"enable": "0"}}, "click_tracking": {"settings": {"enable": "1"}}}}
    data = b"From: app@info.acme.com\r\n" + smtpapi(client) + b"Subject: s\r\n" + BODY
    result = rewrite(data, options=options(tracking=Tracking(open=True)))
    merged = read_smtpapi(text(result))
    assert merged["filters"]["open_tracking"] == {"settings": {"enable": "1"}}  # the rule's
    assert merged["filters"]["click_tracking"] == {"settings": {"enable": "1"}}  # the client's (rule silent)
    assert merged["to"] == ["a@example.net"] and merged["sub"] == {"%name%": ["Ann"]}


def test_folded_client_header_without_merge_is_unfolded_and_moved_last():
    encoded = base64.b64encode(json.dumps({"sub": {"%x%": ["1"]}}).encode())
    data = b"From: app@info.acme.com\r\nX-SMTPAPI: " + encoded[:10] + b"\r\n " + encoded[10:] + b"\r\nSubject: s\r\n" + BODY
    result = rewrite(data)
    assert fields(text(result))[-1] == b"X-SMTPAPI: " + encoded + b"\r\n"


def test_long_header_is_never_folded():
    client = {"to": ["a@example.net"], "sub": {"%long%": ["y" * 3000]}}
    result = rewrite(b"From: app@info.acme.com\r\n" + smtpapi(client) + BODY, options=options(tracking=Tracking(open=False)))
    assert read_smtpapi(text(result))["sub"]["%long%"] == ["y" * 3000]


INVALID = {
    "not_base64": (b"X-SMTPAPI: {not base64}\r\n", "not base64"),
    "base64_not_json": (b"X-SMTPAPI: " + base64.b64encode(b"hello") + b"\r\n", "not base64 of a UTF-8 JSON object"),
    "json_not_object": (smtpapi([1, 2]), "not a JSON object"),
    "unknown_key": (smtpapi({"bcc": ["x@y.z"]}), "unknown key 'bcc'"),
    "to_not_a_list": (smtpapi({"to": "a@example.net"}), '"to" must be'),
    "sub_length_mismatch": (smtpapi({"to": ["a@example.net"], "sub": {"%n%": ["1", "2"]}}), "one value per"),
    "two_headers": (smtpapi({}) + smtpapi({}), "2 X-SMTPAPI headers"),
    "to_outside_envelope": (smtpapi({"to": ["a@example.net", "victim@example.org"]}), "victim@example.org"),
    "to_missing_envelope_recipient": (smtpapi({"to": ["other@example.net"]}), "not a RCPT TO recipient"),
    "to_over_100": (smtpapi({"to": [f"r{i}@example.net" for i in range(101)]}), "SendCloud allows 100"),
}


@pytest.mark.parametrize("header, reason", INVALID.values(), ids=INVALID.keys())
def test_invalid_or_policy_violating_client_header_is_refused(header, reason):
    with pytest.raises(SMTPReply) as refused:
        rewrite(b"From: app@info.acme.com\r\n" + header + BODY)
    assert refused.value.code == 550 and reason in refused.value.text


# -- hostile structure ---------------------------------------------------------------------


def test_998_character_header_and_unrelated_fields_pass_byte_for_byte():
    long_field = b"X-Long: " + b"a" * 990 + b"\r\n"
    data = b"From: App <app@acme.com>\r\n" + long_field + b"X-Folded: one\r\n\ttwo\r\n" + BODY
    result = rewrite(data, options=options("rewrite"))
    assert long_field in text(result) and b"X-Folded: one\r\n\ttwo\r\n" in text(result)
    assert text(result).endswith(BODY)


def test_message_without_empty_line_before_body_gets_one():
    data = b"From: app@info.acme.com\r\nSubject: s\r\nthis line is not a header\r\nmore\r\n"
    result = rewrite(data)
    assert text(result).endswith(b"\r\n\r\nthis line is not a header\r\nmore\r\n")


def test_headers_only_message():
    result = rewrite(b"From: app@info.acme.com\r\nSubject: s")
    assert b"Subject: s\r\n" in text(result) and fields(text(result))[-1].startswith(b"SC-Custom-Relay-User")


# -- control characters from the client never make a header line (defence in depth) -------------

import re


def lenient_header_lines(data: bytes) -> list[bytes]:
    """The header lines as a lenient receiver splits them: at CRLF, bare CR or bare LF."""
    return re.split(rb"\r\n|\r|\n", data.split(b"\r\n\r\n", 1)[0])


HOSTILE_ARRIVALS = {
    "bare_cr_in_helo": {"helo": "x\rX-SMTPAPI: eyJ0byI6WyJ2aWN0aW1AZXhhbXBsZS5vcmciXX0="},
    "crlf_in_helo": {"helo": "x\r\nSC-Custom-Relay-User: ceo"},
    "lf_in_auth_user": {"authenticated_user": "billing\nSC-Custom-Relay-User: ceo"},
    "nul_in_auth_user": {"authenticated_user": "billing\x00"},
    "cr_in_recipient": {"recipients": ("a@example.net\rBcc: everyone@example.net",)},
}


@pytest.mark.parametrize("change", HOSTILE_ARRIVALS.values(), ids=HOSTILE_ARRIVALS.keys())
def test_received_never_carries_a_client_line_break(change):
    arrival = Arrival(**{**ARRIVAL.__dict__, **change})
    out = text(rewrite(b"From: app@info.acme.com\r\nSubject: s\r\n" + BODY, arrival=arrival))
    received = fields(out)[0]
    assert re.findall(rb"\r\n(?![\t ]|$)|\r(?!\n)|(?<!\r)\n|\x00", received) == []
    for line in lenient_header_lines(out):
        assert not re.match(rb"(?i)(X-SMTPAPI|Bcc|SC-Custom-Relay-User: ceo)", line)
    assert parsed(out)["SC-Custom-Relay-User"] == "billing"


def test_from_made_from_an_envelope_sender_with_a_cr_stays_one_field():
    out = text(rewrite(b"Subject: no from\r\n" + BODY, envelope_sender='"a\rX-SMTPAPI: e30="@info.acme.com',
                       options=options("keep")))
    assert not any(re.match(rb"(?i)X-SMTPAPI", line) for line in lenient_header_lines(out))
    assert b"\r" not in b"".join(line for line in fields(out) if line.startswith(b"From:")).removesuffix(b"\r\n")


def test_relay_user_header_is_one_line_whatever_the_user_name():
    out = text(rewrite(b"From: app@info.acme.com\r\n" + BODY, user="billing\r\nBcc: x@y.z"))
    assert [line for line in lenient_header_lines(out) if line.lower().startswith(b"bcc")] == []


def test_a_field_is_parsed_once_and_again_when_its_bytes_change():
    """Rewriting reads the From twice; the parse is kept only for the bytes it came from."""
    field = Message(b"From: A <a@example.com>\r\n\r\nbody").first("From")
    first = field.parsed()
    assert first.addresses[0].addr_spec == "a@example.com" and first.addresses[0].display_name == "A"
    assert field.parsed() is first
    field.raw = b"From: B <b@example.org>\r\n"
    assert field.parsed().addresses[0].addr_spec == "b@example.org"


FROM_VALUES = [
    "a@example.com", "<a@example.com>", "John <j@example.com>", "John Smith <j.s@mail.example.com>",
    "John Smith<j@example.com>", "J!#$%&'*+/^_`{|}~-x <x.y-z+tag@sub.example.org>", "A B C D <a@b>",
    # not plain: the standard library decides
    '"Smith, John" <j@example.com>', "John  Smith <j@example.com>", "John Q. Public <j@example.com>",
    "=?utf-8?b?5byg5LiJ?= <z@example.cn>", "=?utf-8?q?x?=@example.com", "a=b@example.com", "a?@example.com",
    "j@example.com (John)", "<j@example.com> John", "a@example.com, b@example.com", "group: a@example.com;",
    "a..b@example.com", "a@example.com.", "a@[192.0.2.1]", "Grüße <g@example.de>", "<@route:a@example.com>",
    "a@", "@example.com", "", "<>", "John <j@example.com", "John j@example.com>", "\"a b\"@example.com",
    "John\r\n Smith <j@example.com>", "John Smith\r\n <j@example.com>",
]


@pytest.mark.parametrize("value", FROM_VALUES)
def test_mailbox_addresses_are_the_standard_librarys(value):
    from relay.rewrite.fields import Field, mailbox_addresses

    def parts(addresses):
        return [(a.display_name, a.username, a.domain, a.addr_spec) for a in addresses]

    field = Field(f"From: {value}\r\n".encode())
    try:
        theirs = parts(field.parsed().addresses)
    except Exception as error:  # noqa: BLE001 - the email package fails on some ("a@"): so must we
        with pytest.raises(type(error)):
            mailbox_addresses(Field(field.raw))
        return
    assert parts(mailbox_addresses(Field(field.raw))) == theirs
