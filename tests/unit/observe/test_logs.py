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


# -- escaping: no client-supplied value forges a line or reaches the terminal raw -----------------

from relay.observe.logs import escape

ESCAPES = {
    "plain_unchanged": ("billing", "billing"),
    "utf8_unchanged": ("运维 é", "运维 é"),
    "crlf": ("x\r\ny", "x\\x0d\\x0ay"),
    "nul_tab_del": ("\x00\t\x7f", "\\x00\\x09\\x7f"),
    "ansi_escape": ("\x1b[31mred", "\\x1b[31mred"),
    "c1_csi_and_nel": ("\x9b2J\x85", "\\x9b2J\\x85"),
    "unicode_line_separators": ("a\u2028b\u2029c", "a\\u2028b\\u2029c"),
    "bidi_override": ("\u202etxt.exe", "\\u202etxt.exe"),
    "undecodable_byte": ("x\udcff", "x\\udcff"),
    "backslash_doubled_so_escapes_stay_unambiguous": ("a\\x0ab", "a\\\\x0ab"),
}


@pytest.mark.parametrize("value, escaped", ESCAPES.values(), ids=ESCAPES.keys())
def test_escape(value, escaped):
    assert escape(value) == escaped


FORGED = "x\r\n2025-03-04 05:06:07,000 INFO relay.delivery: 238CDPP1K3S5NL: to=<a@b.c>, status=sent"


def test_username_with_a_newline_renders_on_one_line():
    line = render("NOQUEUE", {"client": "10.0.0.5", "sasl_username": FORGED, "reject": "AUTH"}, "535 5.7.8\r\nforged")
    assert "\n" not in line and "\r" not in line
    assert line.startswith("NOQUEUE: client=[10.0.0.5], sasl_username=x\\x0d\\x0a2025-03-04")
    assert line.endswith("(535 5.7.8\\x0d\\x0aforged)")


def test_ansi_escapes_are_neutralised_in_fields_and_in_any_logger_s_message():
    assert "\x1b" not in render(None, {"helo": "\x1b]0;pwned\x07\x1b[2J"})
    record = logging.LogRecord("aiosmtpd", logging.INFO, __file__, 1, "client said %s", ("\x1b[31m\x9b1m\r\nx",), None)
    line = Formatter().format(record)
    assert line.endswith("aiosmtpd: client said \\x1b[31m\\x9b1m\\x0d\\x0ax")
    assert record.getMessage() == "client said \x1b[31m\x9b1m\r\nx"  # other handlers see the record as it was


def test_rendered_escapes_are_not_escaped_twice_by_the_formatter():
    record = _record(sasl_username="a\\b\nc")
    assert Formatter().format(record).endswith("sasl_username=a\\\\b\\x0ac (250 ok key-9f8e7d)")


def test_traceback_keeps_its_lines_but_cannot_start_a_forged_one():
    try:
        raise ValueError(f"bad address {FORGED}")
    except ValueError:
        import sys
        record = logging.LogRecord("relay", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    lines = Formatter().format(record).split("\n")
    assert lines[1].startswith("    Traceback") and all(line.startswith("    ") for line in lines[1:])
    assert not any(line.startswith("2025-03-04") for line in lines)


@pytest.mark.parametrize("value", [FORGED, "\x7f\x85\x9b[2J", "a\u2028b\u2029c", "\udcff", "\x1b[31m"])
def test_json_lines_stay_one_line_and_escape_what_json_dumps_leaves_raw(value):
    record = _record(sasl_username=value, helo=value)
    line = Formatter(json_lines=True).format(record)
    assert len(line.splitlines()) == 1
    assert not any(char in line for char in "\x7f\x85\x9b\u2028\u2029\udcff\x1b\r\n")
    entry = json.loads(line)
    assert entry["sasl_username"] == value  # escaped for the line, exact for the reader
    line.encode("utf-8")  # stderr can write it: no lone surrogate


@pytest.mark.parametrize("created", [1764596700.0, 1764596700.123, 1764596700.9995, 1764596701.004, 1764596759.5])
def test_timestamps_are_the_standard_formatters_even_when_the_second_is_kept(created):
    ours, standard = Formatter(), logging.Formatter("%(asctime)s")
    for at in (created - 1.5, created, created):  # another second first, then the same one twice
        record = logging.LogRecord("relay", logging.INFO, __file__, 1, "m", (), None)
        record.created, record.msecs = at, (at - int(at)) * 1000
        assert ours.formatTime(record) == standard.formatTime(record)
    assert ours.formatTime(record, "%H") == standard.formatTime(record, "%H")
