"""relay.observe.logs: the maillog line shapes, JSON lines, masking and secret scrubbing."""

from __future__ import annotations

import json
import logging

import pytest

from relay.observe.logs import Formatter, event, mask_addresses, render

MASKS = {
    "plain": ("john.doe@example.com", "j***@example.com"),
    "in_brackets": ("from=<john@example.com>", "from=<j***@example.com>"),
    "key_kept": ("sasl_username=ops@acme.com", "sasl_username=o***@acme.com"),
    "email_id_kept": ("1426390015358_15.sc-inbound0$john@x.com", "1426390015358_15.sc-inbound0$j***@x.com"),
    "in_reply": ("550 5.1.1 <bob@qq.com>: user unknown", "550 5.1.1 <b***@qq.com>: user unknown"),
    "one_letter": ("a@b.cn", "a***@b.cn"),
    "two_addresses": ("a1@x.org, b2@y.org", "a***@x.org, b***@y.org"),
    "null_sender_untouched": ("from=<>", "from=<>"),
    "no_address": ("listening on 127.0.0.1:25", "listening on 127.0.0.1:25"),
    "json_escape_survives": ('"x\\njohn@x.com"', '"x\\n***@x.com"'),
}


@pytest.mark.parametrize("text, masked", MASKS.values(), ids=MASKS.keys())
def test_mask_addresses(text, masked):
    assert mask_addresses(text) == masked


RENDERS = {
    "transaction": (
        "238CDPP1K3S5NL",
        {"client": "10.0.0.5", "user": "billing", "from": "a@acme.com", "size": 120, "rule": None, "status": "queued"},
        None,
        "238CDPP1K3S5NL: client=[10.0.0.5], user=billing, from=<a@acme.com>, size=120, status=queued",
    ),
    "delivery": (
        "238CDPP1K3S5NL",
        {"to": "b@example.net", "delay": 1.23456, "attempts": 2, "status": "deferred"},
        "451 4.7.1 later",
        "238CDPP1K3S5NL: to=<b@example.net>, delay=1.23, attempts=2, status=deferred (451 4.7.1 later)",
    ),
    "refusal": (
        "NOQUEUE", {"reject": "RCPT", "from": "", "to": "x@y.org"}, "554 5.7.1 denied",
        "NOQUEUE: reject=RCPT, from=<>, to=<x@y.org> (554 5.7.1 denied)",
    ),
    "no_prefix": (None, {"client": "::1", "sasl_username": "ops"}, "authenticated",
                  "client=[::1], sasl_username=ops (authenticated)"),
}


@pytest.mark.parametrize("prefix, fields, note, line", RENDERS.values(), ids=RENDERS.keys())
def test_render(prefix, fields, note, line):
    assert render(prefix, fields, note) == line


def _record(**fields) -> logging.LogRecord:
    records = []
    logger = logging.getLogger("test.logs")
    logger.propagate = False
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        event(logger, "238CDPP1K3S5NL", fields, "250 ok key-9f8e7d")
    finally:
        logger.removeHandler(handler)
    return records[0]


def test_json_lines_carry_the_fields_scrubbed_and_masked():
    record = _record(to="john@example.net", relay="smtp.sendcloud.net[587]", attempts=1, status="sent")
    entry = json.loads(Formatter(json_lines=True, mask=True, secrets=["key-9f8e7d"]).format(record))
    assert entry["queue_id"] == "238CDPP1K3S5NL" and entry["logger"] == "test.logs" and entry["level"] == "info"
    assert entry["to"] == "j***@example.net" and entry["attempts"] == 1 and entry["status"] == "sent"
    assert entry["detail"] == "250 ok ***"
    assert entry["message"].startswith("238CDPP1K3S5NL: to=<j***@example.net>") and "key-9f8e7d" not in entry["message"]


def test_plain_lines_are_scrubbed_whatever_logged_them():
    record = logging.LogRecord("aiosmtplib", logging.DEBUG, __file__, 1, "sent %r", ("AUTH key-9f8e7d",), None)
    line = Formatter(secrets=["key-9f8e7d", "ab"]).format(record)  # too-short "secrets" are ignored
    assert line.endswith("aiosmtplib: sent 'AUTH ***'")
