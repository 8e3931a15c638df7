"""relay.webapi.request: SendCloud's send parameters in, a checked SendRequest or a 400/401 out."""

from __future__ import annotations

import json

import pytest

from relay.webapi.request import Attachment, RequestError, parse_send_request

BASE = {
    "apiUser": "billing", "apiKey": "s3cret", "from": "app@acme.com", "to": "a@example.net",
    "subject": "Hello", "html": "<p>hi</p>",
}


def form(**changes: str | list[str] | None) -> dict[str, list[str]]:
    """BASE with changes (None removes a field), as a form decoder gives it: name -> values."""
    fields = {**BASE, **changes}
    return {name: value if isinstance(value, list) else [value] for name, value in fields.items() if value is not None}


def parse(files: list[Attachment] = (), max_recipients: int = 400, **changes):
    return parse_send_request(form(**changes), list(files), max_recipients)


def addresses(count: int, domain: str = "example.net") -> str:
    return ";".join(f"user{n}@{domain}" for n in range(count))


def refused(status: int, fragment: str, **changes) -> None:
    with pytest.raises(RequestError) as caught:
        parse(**changes)
    assert caught.value.status == status
    assert fragment in caught.value.message


def test_a_plain_request():
    request = parse(cc="c@example.net", bcc="b@example.net", plain="hi", replyTo="help@acme.com", labelId="12345")
    assert (request.api_user, request.api_key, request.sender) == ("billing", "s3cret", "app@acme.com")
    assert (request.to, request.cc, request.bcc) == (("a@example.net",), ("c@example.net",), ("b@example.net",))
    assert (request.subject, request.html, request.plain) == ("Hello", "<p>hi</p>", "hi")
    assert (request.reply_to, request.label_id, request.resp_email_id) == ("help@acme.com", 12345, True)
    assert request.recipients == ("a@example.net", "c@example.net", "b@example.net")
    assert "s3cret" not in repr(request)


@pytest.mark.parametrize(
    ("changes", "attribute", "expected"),
    [
        ({"to": "a@x.net; b@x.net;;c@x.net;"}, "to", ("a@x.net", "b@x.net", "c@x.net")),
        ({"to": "Ben <ben@x.net>;<joe@x.net>"}, "to", ("ben@x.net", "joe@x.net")),
        ({"from": "爱发信支持<support@acme.com>"}, "from_name", "爱发信支持"),
        ({"from": "爱发信支持<support@acme.com>"}, "sender", "support@acme.com"),
        ({"from": '"Acme, Billing" <billing@acme.com>'}, "from_name", "Acme, Billing"),
        ({"from": "爱发信支持<support@acme.com>", "fromName": "客服"}, "from_name", "客服"),
        ({"fromName": "  "}, "from_name", None),
        ({"fromName": "账单"}, "from_name", "账单"),
        ({"html": None, "plain": "text only"}, "html", None),
        ({"html": "", "plain": "text only"}, "plain", "text only"),
        ({"respEmailId": "false"}, "resp_email_id", False),
        ({"respEmailId": "TRUE"}, "resp_email_id", True),
        ({"respEmailId": ""}, "resp_email_id", True),
        ({"labelId": ""}, "label_id", None),
        ({"replyTo": "Help <help@acme.com>"}, "reply_to", "help@acme.com"),
        ({"useNotification": "true"}, "disposition_notification_to", "app@acme.com"),
        ({"useNotification": "true", "dispositionNotificationTo": "r@acme.com"}, "disposition_notification_to", "r@acme.com"),
        ({"useAddressList": "false", "gzipCompress": "false"}, "to", ("a@example.net",)),
        ({"startTime": "2024-01-01 10:00:00", "unknown": "x"}, "to", ("a@example.net",)),
        ({"headers": '{"SC-Custom-Order": "42", "X-Mail-Type": "账单"}'}, "headers",
         (("SC-Custom-Order", "42"), ("X-Mail-Type", "账单"))),
        ({"headers": '{"Message-ID": " <order-42@acme.com> "}'}, "headers", (("Message-ID", "<order-42@acme.com>"),)),
        ({"headers": "{}"}, "headers", ()),
        ({"headers": '{"X-A": "  padded\\tvalue \\t"}'}, "headers", (("X-A", "padded\tvalue"),)),
        ({"headers": json.dumps({"X-A": "w" * 993})}, "headers", (("X-A", "w" * 993),)),
        ({"headers": json.dumps({"X-A": "词" * 2000})}, "headers", (("X-A", "词" * 2000),)),
        ({"to": "A@example.net", "bcc": "a@EXAMPLE.net;b@example.net"}, "recipients", ("A@example.net", "b@example.net")),
    ],
)
def test_accepted(changes, attribute, expected):
    assert getattr(parse(**changes), attribute) == expected


@pytest.mark.parametrize(
    ("status", "fragment", "changes"),
    [
        (401, "apiUser and apiKey are required", {"apiUser": None}),
        (401, "apiUser and apiKey are required", {"apiKey": ""}),
        (401, "apiUser and apiKey are required", {"apiKey": None, "from": None}),  # credentials first
        (400, "from is required", {"from": None}),
        (400, "from: <not-an-address> is not a valid", {"from": "not-an-address"}),
        (400, "subject is required", {"subject": ""}),
        (400, "subject is required", {"subject": "   "}),
        (400, "subject must be one line", {"subject": "a\r\nBcc: victim@example.net"}),
        (400, "html and plain cannot both be empty", {"html": None}),
        (400, "html and plain cannot both be empty", {"html": "", "plain": ""}),
        (400, "to is required", {"to": None}),
        (400, "to is required", {"to": " ; "}),
        (400, "to lists 101 addresses; at most 100", {"to": addresses(101)}),
        (400, "cc lists 101 addresses", {"cc": addresses(101)}),
        (400, "bcc lists 101 addresses", {"bcc": addresses(101)}),
        (400, "separate addresses with ';'", {"to": "a@x.net,b@x.net"}),
        (400, "is not ASCII", {"to": "用户@例子.中国"}),
        (400, "is not a valid email address", {"to": "a@localhost"}),
        (400, "is not a valid email address", {"to": "a..b@x.net"}),
        (400, "is not a valid email address", {"cc": "a b@x.net"}),
        (400, "replyTo: <nope> is not a valid", {"replyTo": "nope"}),
        (400, "to is given 2 times", {"to": ["a@x.net", "b@x.net"]}),
        (400, "labelId must be a positive integer", {"labelId": "abc"}),
        (400, "labelId must be a positive integer", {"labelId": "0"}),
        (400, "labelId must be a positive integer", {"labelId": "-3"}),
        (400, "respEmailId must be true or false", {"respEmailId": "yes"}),
        (400, "useAddressList is not available", {"useAddressList": "true"}),
        (400, "gzipCompress is not supported", {"gzipCompress": "true"}),
        (400, "templates are not available", {"templateInvokeName": "ifaxin_bill"}),
        (400, "not UTF-8", {"plain": "bad \udcff"}),
        (400, "NUL", {"html": "a\x00b"}),
        (400, "headers is not valid JSON", {"headers": "{nope"}),
        (400, "headers must be a JSON object", {"headers": '["X-A"]'}),
        (400, "value of X-Order must be a string", {"headers": '{"X-Order": 42}'}),
        (400, "value of X-A must be one line", {"headers": '{"X-A": "a\\r\\nBcc: v@x.net"}'}),
        (400, "is not a header name", {"headers": '{"X A": "1"}'}),
        (400, "X-A contains a control character", {"headers": '{"X-A": "a\\u0001b"}'}),
        (400, "X-A has a word too long", {"headers": json.dumps({"X-A": "w" * 995})}),
        (400, "X-a is given twice", {"headers": '{"X-A": "1", "X-a": "2"}'}),
        (400, "Subject is set by the subject parameter", {"headers": '{"Subject": "x"}'}),
        (400, "bcc is set by the bcc parameter", {"headers": '{"bcc": "x@x.net"}'}),
        (400, "X-SMTPAPI is set by the xsmtpapi parameter", {"headers": '{"X-SMTPAPI": "e30="}'}),
        (400, "SC-Custom-Relay-Id is set by the relay", {"headers": '{"SC-Custom-Relay-Id": "X"}'}),
        (400, "SC-Custom-Relay-User is set by the relay", {"headers": '{"SC-Custom-Relay-User": "ops"}'}),
        (400, "Date is set by the relay", {"headers": '{"Date": "Mon, 1 Jan 2024 00:00:00 +0000"}'}),
        (400, "Resent-To is set by the relay", {"headers": '{"Resent-To": "x@x.net"}'}),
        (400, "DKIM-Signature is set by the relay", {"headers": '{"DKIM-Signature": "v=1"}'}),
        (400, "Content-Type is part of the MIME structure", {"headers": '{"Content-Type": "text/plain"}'}),
        (400, "MIME-Version is part of the MIME structure", {"headers": '{"MIME-Version": "1.0"}'}),
        (400, "Message-ID must look like <id@domain>", {"headers": '{"Message-ID": "order-42"}'}),
        (400, "xsmtpapi is not valid JSON", {"xsmtpapi": "eyJ0byI6W119"}),  # base64 is the header's form, not the parameter's
        (400, "xsmtpapi must be a JSON object", {"xsmtpapi": "[]"}),
        (400, "unknown key 'tos'", {"xsmtpapi": '{"tos": ["a@x.net"]}'}),
        (400, '"to" must be a non-empty list', {"xsmtpapi": '{"to": []}'}),
        (400, '"to" must be a non-empty list', {"xsmtpapi": '{"to": "a@x.net"}'}),
        (400, '"to" lists 101 addresses; SendCloud allows 100', {"xsmtpapi": json.dumps({"to": addresses(101).split(";")})}),
        (400, '"to" lists <A@x.net> twice', {"xsmtpapi": '{"to": ["a@x.net", "A@x.net"]}'}),
        (400, "xsmtpapi to: <nope> is not a valid", {"xsmtpapi": '{"to": ["nope"]}'}),
        (400, 'one value per "to" address', {"xsmtpapi": '{"to": ["a@x.net", "b@x.net"], "sub": {"%n%": ["A"]}}'}),
        (400, '"sub" must map each variable', {"xsmtpapi": '{"sub": {"%n%": "A"}}'}),
        (400, '"filters" must be an object', {"xsmtpapi": '{"filters": []}'}),
        (400, "larger than SendCloud's 1000000 bytes", {"xsmtpapi": json.dumps({"section": {"s": "x" * 760_000}})}),
    ],
)
def test_refused(status, fragment, changes):
    refused(status, fragment, **changes)


def test_100_recipients_in_each_field_pass_and_the_total_is_bounded():
    request = parse(to=addresses(100, "a.net"), cc=addresses(100, "c.net"), bcc=addresses(100, "b.net"))
    assert len(request.recipients) == 300
    refused(400, "300 recipients; at most 299 per request", max_recipients=299,
            to=addresses(100, "a.net"), cc=addresses(100, "c.net"), bcc=addresses(100, "b.net"))


def test_101_recipients_are_refused():
    refused(400, "to lists 101 addresses; at most 100 are allowed", to=addresses(101))


def test_xsmtpapi_to_overrides_to_cc_and_bcc():
    xsmtpapi = {"to": [" ben@x.net", "joe@x.net"], "sub": {"%name%": ["Ben", "Joe"]}, "filters": {}}
    # to, cc and bcc are ignored, unchecked, as SendCloud ignores them
    request = parse(xsmtpapi=json.dumps(xsmtpapi), to="not an address", cc=addresses(150), bcc="b@x.net")
    assert (request.to, request.cc, request.bcc) == ((), (), ())
    assert request.recipients == request.xsmtpapi_to == ("ben@x.net", "joe@x.net")
    assert request.xsmtpapi == {**xsmtpapi, "to": ["ben@x.net", "joe@x.net"]}
    assert parse(xsmtpapi=json.dumps(xsmtpapi), to=None).recipients == ("ben@x.net", "joe@x.net")


def test_xsmtpapi_without_to_keeps_the_recipients_of_to():
    request = parse(xsmtpapi='{"filters": {"open_tracking": {"settings": {"enable": "0"}}}}', cc="c@x.net")
    assert request.recipients == ("a@example.net", "c@x.net")
    assert request.xsmtpapi_to == ()


def test_attachments_keep_their_bytes_and_lose_paths_and_odd_types():
    files = [
        Attachment("C:\\Users\\me\\报告.pdf", "application/pdf", b"%PDF\x00\xff"),
        Attachment("../../etc/passwd", "Text/Plain; charset=utf-8", b"root"),
        Attachment("", "", b""),
        Attachment("mail.eml", "message/rfc822", b"From: x\r\n\r\n"),
        Attachment("a\r\nb.txt", "not a type", b"x"),
    ]
    got = [(item.filename, item.content_type, item.data) for item in parse(files=files).attachments]
    assert got == [
        ("报告.pdf", "application/pdf", b"%PDF\x00\xff"),
        ("passwd", "text/plain", b"root"),
        ("attachment", "application/octet-stream", b""),
        ("mail.eml", "application/octet-stream", b"From: x\r\n\r\n"),
        ("ab.txt", "application/octet-stream", b"x"),
    ]
    assert "data" not in repr(parse(files=files).attachments[0])
