"""relay.webapi.mime: the message SendCloud's Web API would have sent, as CRLF bytes, and its envelope."""

from __future__ import annotations

import base64
import email
import email.header
import email.policy
import gc
import json
import os
import re
import tracemalloc

import pytest

from relay.webapi.mime import build_message, envelope, per_recipient_copies
from relay.webapi.request import Attachment, SendRequest

NOW = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 +0000
DOMAIN = "relay.acme.com"


def request(**changes) -> SendRequest:
    fields = {
        "api_user": "billing", "api_key": "k", "sender": "app@acme.com", "to": ("a@example.net",),
        "subject": "Hello", "html": "<p>hi</p>",
    }
    return SendRequest(**{**fields, **changes})


def build(**changes) -> bytes:
    return build_message(request(**changes), DOMAIN, NOW)


def parsed(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def header_lines(data: bytes) -> list[bytes]:
    return data[:data.index(b"\r\n\r\n")].split(b"\r\n")


def raw_field(data: bytes, name: str) -> bytes:
    """The field ``name: ...`` with its continuation lines, CRLFs kept."""
    block = b"\r\n" + data[:data.index(b"\r\n\r\n") + 2]
    start = block.index(b"\r\n" + name.encode() + b": ") + 2
    end = re.compile(rb"\r\n[^ \t]").search(block, start).start() + 2
    return block[start:end - 2]


def header_names(data: bytes) -> list[str]:
    return [line.split(b":", 1)[0].decode() for line in header_lines(data) if line[:1] not in (b" ", b"\t")]


def structure(message) -> list[str]:
    return [part.get_content_type() for part in message.walk()]


def test_lines_are_crlf_and_7bit():
    data = build(subject="测试", from_name="客服", plain="中文正文\n第二行", html="<p>中文</p>",
                 attachments=(Attachment("报告.pdf", "application/pdf", bytes(range(256))),))
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert data.isascii()
    assert max(len(line) for line in data.split(b"\r\n")) <= 78


def test_chinese_subject_and_from_name_decode_back():
    data = build(subject="您本月的账单 — 2024年1月", from_name="爱发信支持")
    assert "爱发信支持".encode() not in data and b"=?utf-8?" in data
    message = parsed(data)
    assert message["Subject"] == "您本月的账单 — 2024年1月"
    (sender,) = message["From"].addresses
    assert (sender.display_name, sender.addr_spec) == ("爱发信支持", "app@acme.com")


def test_headers_in_order():
    data = build(cc=("c@example.net",), reply_to="help@acme.com", disposition_notification_to="app@acme.com",
                 headers=(("SC-Custom-Order", "42"), ("X-Mail-Type", "账单")), xsmtpapi={"filters": {}})
    assert header_names(data) == [
        "From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID", "Disposition-Notification-To",
        "SC-Custom-Order", "X-Mail-Type", "Content-Type", "Content-Transfer-Encoding", "MIME-Version", "X-SMTPAPI",
    ]
    message = parsed(data)
    assert (message["To"], message["Cc"], message["Reply-To"]) == ("a@example.net", "c@example.net", "help@acme.com")
    assert message["Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert re.fullmatch(r"<[^@<>]+@relay\.acme\.com>", message["Message-ID"])
    assert (message["SC-Custom-Order"], message["X-Mail-Type"]) == ("42", "账单")


UNSUBSCRIBE = "<https://acme.com/unsubscribe?token=" + "x" * 150 + ">, <mailto:unsubscribe@acme.com?subject=u>"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SC-Custom-Token", "t" * 900),  # one long word: written as is, not as encoded words
        ("List-Unsubscribe", UNSUBSCRIBE),
        ("X-Words", " ".join(["word"] * 100)),
        ("X-Spaces", "a  b\tc" + " " * 3 + "d" * 80),
        ("X-Quoted", 'a "b" (c) =?utf-8?q?not-encoded?= d'),
        ("X-Empty", ""),
    ],
)
def test_ascii_client_headers_unfold_to_their_value(name, value):
    data = build(headers=((name, value),), xsmtpapi={"filters": {}})
    raw = raw_field(data, name)
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert raw.replace(b"\r\n", b"") == f"{name}: {value}".encode()  # RFC 5322 unfolding gives it back
    if len(value) < 60:
        assert b"\r\n" not in raw
    assert parsed(data)[name] == value.strip() or name == "X-Quoted"  # the email package decodes =?...?= words


@pytest.mark.parametrize(
    "value",
    ["月度账单 " * 30, "账单", "Invoice 账单 for January, 2024 — see (attached) \"pdf\"", "é" * 300, "a 词" * 100],
)
def test_non_ascii_values_are_encoded_words_that_decode_exactly(value):
    """Subject and client headers; the email package's own folding would drop a space per fold."""
    data = build(subject=value, headers=(("X-Mail-Type", value),))
    assert data.isascii()
    for name in ("Subject", "X-Mail-Type"):
        raw = raw_field(data, name)
        assert all(len(line) <= 78 for line in raw.split(b"\r\n"))
        assert b"=?utf-8?b?" in raw
    message = parsed(data)
    assert (message["Subject"], message["X-Mail-Type"]) == (value, value)


@pytest.mark.parametrize(
    ("subject", "encoded"),
    [
        ("Your invoice for January", False),
        (" ".join(["word"] * 60), False),
        ("x" * 1200, True),  # a word past the 998-character line: encoded words, the one way to carry it
    ],
)
def test_ascii_subjects(subject, encoded):
    data = build(subject=subject)
    raw = raw_field(data, "Subject")
    assert (b"=?utf-8?b?" in raw) is encoded
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert parsed(data)["Subject"] == subject


@pytest.mark.parametrize("name", ["爱发信支持", "Acme Billing", 'Acme, "Billing" (team)', "账单 Billing, Acme", "N" * 40])
def test_from_names_decode_back(name):
    data = build(from_name=name)
    assert all(len(line) <= 78 for line in raw_field(data, "From").split(b"\r\n"))
    (sender,) = parsed(data)["From"].addresses
    assert (sender.display_name, sender.addr_spec) == (name, "app@acme.com")


def test_a_long_non_ascii_from_name_is_several_encoded_words():
    """RFC 2047 6.2: the blank between two encoded words is not text. CPython's address parser
    keeps it (it would read "...the A cme..."), so the name is read back with the decoder that
    follows the RFC, as mail clients do."""
    name = "客服中心 Customer Service Center of the Acme Corporation 客服中心"
    check_long_from_name(name)


def test_a_long_ascii_from_name_is_encoded_words_too():
    check_long_from_name("Customer Service Center of the Acme Corporation, Billing Department " * 20)


def check_long_from_name(name: str) -> None:
    raw = raw_field(build(from_name=name), "From")
    assert all(len(line) <= 78 for line in raw.split(b"\r\n"))
    words, _, address = raw[len(b"From: "):].decode().rpartition(" ")
    assert address == "<app@acme.com>"
    assert str(email.header.make_header(email.header.decode_header(words))) == name


def test_a_client_message_id_replaces_the_relays():
    message = parsed(build(headers=(("Message-ID", "<order-42@acme.com>"),)))
    assert message.get_all("Message-ID") == ["<order-42@acme.com>"]


def test_bcc_is_in_the_envelope_only():
    built = request(to=("a@example.net", "b@example.net"), cc=("c@example.net",), bcc=("hidden@example.net",))
    data = build_message(built, DOMAIN, NOW)
    assert b"hidden" not in data
    assert "Bcc" not in header_names(data)
    assert envelope(built) == ("app@acme.com", ["a@example.net", "b@example.net", "c@example.net", "hidden@example.net"])


@pytest.mark.parametrize(
    ("plain", "html", "attachments", "expected"),
    [
        ("text", None, (), ["text/plain"]),
        (None, "<p>x</p>", (), ["text/html"]),
        ("text", "<p>x</p>", (), ["multipart/alternative", "text/plain", "text/html"]),
        ("text", None, (Attachment("a.txt", "text/plain", b"a"),), ["multipart/mixed", "text/plain", "text/plain"]),
        ("text", "<p>x</p>", (Attachment("a.pdf", "application/pdf", b"%PDF"), Attachment("b.png", "image/png", b"\x89PNG")),
         ["multipart/mixed", "multipart/alternative", "text/plain", "text/html", "application/pdf", "image/png"]),
    ],
)
def test_body_structure(plain, html, attachments, expected):
    data = build(plain=plain, html=html, attachments=attachments)
    message = parsed(data)
    assert structure(message) == expected
    assert data.count(b"MIME-Version:") == 1  # RFC 2045: the top level only
    bodies = [part.get_content() for part in message.walk() if part.get_content_maintype() == "text" and not part.is_attachment()]
    # MIME's canonical text: CRLF line ends, a final one added
    assert bodies == [text + "\r\n" for text in (plain, html) if text is not None]


def test_chinese_bodies_decode_back():
    message = parsed(build(plain="你好，世界\n" * 50, html="<p>你好，世界</p>" * 200))
    plain, html = (part.get_content() for part in message.walk() if part.get_content_maintype() == "text")
    assert plain == "你好，世界\r\n" * 50
    assert html == "<p>你好，世界</p>" * 200 + "\r\n"


@pytest.mark.parametrize(
    ("filename", "content_type", "payload"),
    [
        ("report.pdf", "application/pdf", bytes(range(256)) * 10),
        ("报告 2024年.xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", os.urandom(1000)),
        ("empty.bin", "application/octet-stream", b""),
        ("one.txt", "text/plain", b"x"),
        ("lines.txt", "text/plain", b"a\r\nb\nc\r" * 100),
        ("exact.bin", "application/octet-stream", os.urandom(57 * 1024 * 2)),
    ],
)
def test_attachment_round_trip(filename, content_type, payload):
    data = build(plain="see attached", attachments=(Attachment(filename, content_type, payload),))
    (part,) = parsed(data).iter_attachments()
    assert part.get_filename() == filename
    assert part.get_content_type() == content_type
    assert part["Content-Transfer-Encoding"] == "base64"
    assert part.get_payload(decode=True) == payload


def test_non_ascii_attachment_names_use_rfc_2231():
    data = build(attachments=(Attachment("报告.pdf", "application/pdf", b"%PDF"),))
    assert b"filename*=utf-8''%E6%8A%A5%E5%91%8A.pdf" in data
    ascii_data = build(attachments=(Attachment("report.pdf", "application/pdf", b"%PDF"),))
    assert b'filename="report.pdf"' in ascii_data


def test_several_attachments_keep_their_order_and_bytes():
    files = tuple(Attachment(f"f{n}.bin", "application/octet-stream", os.urandom(n * 1000)) for n in range(4))
    got = [(part.get_filename(), part.get_payload(decode=True)) for part in parsed(build(attachments=files)).iter_attachments()]
    assert got == [(item.filename, item.data) for item in files]


def test_a_5_mb_attachment_builds_in_little_more_memory_than_the_message():
    payload = os.urandom(5 * 1024 * 1024)
    built = request(attachments=(Attachment("big.bin", "application/octet-stream", payload),))
    gc.collect()
    tracemalloc.start()
    try:
        data = build_message(built, DOMAIN, NOW)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the base64 message itself is 4/3 of the file: about 7 MB; the email package alone would hold ~30 MB
    assert len(data) < 1.4 * len(payload)
    assert peak < 1.5 * len(data), f"peak {peak / 1e6:.1f} MB for a {len(data) / 1e6:.1f} MB message"
    (part,) = parsed(data).iter_attachments()
    assert part.get_payload(decode=True) == payload


def xsmtpapi_of(data: bytes) -> dict:
    (line,) = [line for line in header_lines(data) if line.startswith(b"X-SMTPAPI:")]
    return json.loads(base64.b64decode(line[len(b"X-SMTPAPI: "):], validate=True))


def test_x_smtpapi_is_the_last_header_on_one_line():
    value = {"to": [f"user{n}@example.net" for n in range(100)], "sub": {"%name%": [f"名字{n}" for n in range(100)]},
             "filters": {"open_tracking": {"settings": {"enable": "1"}}}}
    data = build(xsmtpapi=value, attachments=(Attachment("a.txt", "text/plain", b"a"),))
    lines = header_lines(data)
    assert lines[-1].startswith(b"X-SMTPAPI: ")
    assert len(lines[-1]) > 998  # past RFC 5322's line limit, and still one line: SendCloud drops a folded one
    assert xsmtpapi_of(data) == value
    assert parsed(data)["Subject"] == "Hello"  # the rest of the message is intact


@pytest.mark.parametrize("xsmtpapi", [None, {}])
def test_no_x_smtpapi_without_xsmtpapi(xsmtpapi):
    assert b"X-SMTPAPI" not in build(xsmtpapi=xsmtpapi)


def test_xsmtpapi_to_is_the_envelope_and_no_recipient_sees_the_others():
    value = {"to": ["ben@x.net", "joe@x.net"], "sub": {"%name%": ["Ben", "Joe"]}}
    built = request(to=(), xsmtpapi=value)
    data = build_message(built, DOMAIN, NOW)
    assert envelope(built) == ("app@acme.com", ["ben@x.net", "joe@x.net"])
    assert parsed(data)["To"] == "undisclosed-recipients:;"
    assert b"ben@x.net" not in data[:data.index(b"X-SMTPAPI")]
    assert xsmtpapi_of(data) == value


def test_per_recipient_copies_follow_xsmtpapi_to_and_sub():
    value = {"to": ["ben@x.net", "joe@x.net"], "sub": {"%name%": ["Ben", "Joe"], "%money%": [288, 497]}, "filters": {}}
    copies = per_recipient_copies(request(to=(), xsmtpapi=value))
    assert [envelope(copy)[1] for copy in copies] == [["ben@x.net"], ["joe@x.net"]]
    assert [copy.xsmtpapi for copy in copies] == [
        {"to": ["ben@x.net"], "sub": {"%name%": ["Ben"], "%money%": [288]}, "filters": {}},
        {"to": ["joe@x.net"], "sub": {"%name%": ["Joe"], "%money%": [497]}, "filters": {}},
    ]
    first = build_message(copies[0], DOMAIN, NOW)
    assert parsed(first)["To"] == "ben@x.net"
    assert xsmtpapi_of(first)["to"] == ["ben@x.net"]
    assert value["to"] == ["ben@x.net", "joe@x.net"]  # the request's own object is untouched


def test_per_recipient_copies_without_xsmtpapi_to_is_the_request():
    plain = request(to=("a@x.net", "b@x.net"), xsmtpapi={"filters": {}})
    assert per_recipient_copies(plain) == [plain]


def test_the_smtp_side_reads_the_header_as_it_reads_a_clients():
    """The built message passes relay.rewrite.xsmtpapi's DATA check and its per-transaction split."""
    from relay.rewrite import xsmtpapi

    value = {"to": ["ben@x.net", "joe@x.net"], "sub": {"%name%": ["Ben", "Joe"]}}
    built = request(to=(), xsmtpapi=value)
    data = build_message(built, DOMAIN, NOW)
    (line,) = [line for line in header_lines(data) if line.startswith(b"X-SMTPAPI:")]
    decoded = xsmtpapi.decode(line[len(b"X-SMTPAPI:"):])
    xsmtpapi.check_recipients(decoded, envelope(built)[1])
    assert xsmtpapi_of(xsmtpapi.for_transaction(data, ["joe@x.net"])) == {"to": ["joe@x.net"], "sub": {"%name%": ["Joe"]}}
