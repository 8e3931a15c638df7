"""relay.rewrite.xsmtpapi.for_transaction: each upstream transaction's X-SMTPAPI names only its recipients."""

from __future__ import annotations

import base64
import json

from relay.rewrite.xsmtpapi import for_transaction

BODY = b"\r\nbody\r\n"


def message(value: dict) -> bytes:
    return b"From: a@acme.com\r\nX-SMTPAPI: " + base64.b64encode(json.dumps(value).encode()) + b"\r\n" + BODY


def smtpapi(data: bytes) -> dict:
    line = [line for line in data.split(b"\r\n") if line.startswith(b"X-SMTPAPI: ")][0]
    return json.loads(base64.b64decode(line[len(b"X-SMTPAPI: "):]))


def test_to_and_sub_follow_the_transaction_recipients():
    data = message({"to": ["a@x.net", "B@x.net", "c@x.net"], "sub": {"%n%": ["A", "B", "C"]}, "filters": {}})
    part = for_transaction(data, ["c@x.net", "b@x.net"])
    assert smtpapi(part) == {"to": ["B@x.net", "c@x.net"], "sub": {"%n%": ["B", "C"]}, "filters": {}}
    assert part.endswith(BODY) and part.startswith(b"From: a@acme.com\r\n")


def test_unchanged_when_the_transaction_carries_everyone_or_there_is_no_to():
    everyone = message({"to": ["a@x.net"]})
    assert for_transaction(everyone, ["a@x.net"]) is everyone
    no_to = message({"filters": {"open_tracking": {"settings": {"enable": "1"}}}})
    assert for_transaction(no_to, ["a@x.net"]) is no_to
    plain = b"From: a@acme.com\r\n" + BODY
    assert for_transaction(plain, ["a@x.net"]) is plain


def test_the_header_is_found_whatever_its_case():
    data = message({"to": ["a@x.net", "b@x.net"]}).replace(b"X-SMTPAPI:", b"x-SmtpApi:")
    part = for_transaction(data, ["b@x.net"])
    assert smtpapi(part.replace(b"x-SmtpApi:", b"X-SMTPAPI:")) == {"to": ["b@x.net"]}
