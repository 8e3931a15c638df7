"""relay.rewrite: line-ending normalisation (no SMTP smuggling) and lazy header access."""

from __future__ import annotations

import re

import pytest

from relay.lines import header_block, normalise_line_endings
from relay.rewrite.message import header_reader

LINE_ENDINGS = {
    "bare_lf": (b"a\nb\n", b"a\r\nb\r\n"),
    "bare_cr": (b"a\rb\r", b"a\r\nb\r\n"),
    "crlf_untouched": (b"a\r\nb\r\n", b"a\r\nb\r\n"),
    "mixed": (b"a\r\nb\nc\rd\r\n", b"a\r\nb\r\nc\r\nd\r\n"),
    "lf_dot_lf_smuggling": (b"Subject: x\n\nhello\n.\nMAIL FROM:<evil@x>\n", b"Subject: x\r\n\r\nhello\r\n.\r\nMAIL FROM:<evil@x>\r\n"),
    "lf_dot_lf_among_crlf": (b"a\r\nhello\n.\nrest\r\n", b"a\r\nhello\r\n.\r\nrest\r\n"),
    "cr_dot_cr": (b"a\r\nhello\r.\rrest\r\n", b"a\r\nhello\r\n.\r\nrest\r\n"),
    "cr_before_crlf": (b"a\r\r\n", b"a\r\n\r\n"),
    "lf_then_cr": (b"a\n\rb", b"a\r\n\r\nb"),
    "no_line_ending": (b"abc", b"abc"),
    "empty": (b"", b""),
}


@pytest.mark.parametrize("raw, expected", LINE_ENDINGS.values(), ids=LINE_ENDINGS.keys())
def test_normalise_line_endings(raw, expected):
    """Every bare CR and bare LF becomes CRLF, so one DATA is exactly one message upstream."""
    result = normalise_line_endings(raw)
    assert result == expected
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", result) is None


def test_crlf_body_is_returned_unchanged():
    """A well-formed message keeps every byte (DKIM signatures stay valid)."""
    body = b"From: a@acme.com\r\nSubject: hi\r\n\r\nline one\r\n\r\n..dot-stuffed\r\n"
    assert normalise_line_endings(body) == body


def test_normalising_twice_changes_nothing():
    once = normalise_line_endings(b"a\nb\rc\r\nd")
    assert normalise_line_endings(once) == once


HEADER_BLOCKS = {
    "headers_and_body": (b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\nmore\r\n", b"A: 1\r\nB: 2\r\n"),
    "headers_only": (b"A: 1\r\nB: 2\r\n", b"A: 1\r\nB: 2\r\n"),
    "empty_body": (b"A: 1\r\n\r\n", b"A: 1\r\n"),
    "no_headers": (b"\r\nbody only\r\n", b""),
}


@pytest.mark.parametrize("message, expected", HEADER_BLOCKS.values(), ids=HEADER_BLOCKS.keys())
def test_header_block(message, expected):
    """The header section: everything before the first empty line (and nothing of the body)."""
    assert header_block(message) == expected


MESSAGE = (
    b"From: =?utf-8?b?5byg5LiJ?= <zhang@acme.com>\r\n"
    b"Subject: =?UTF-8?Q?Caf=C3=A9_news?=\r\n"
    b"X-Mail-Type: newsletter\r\n"
    b"X-Folded: first part\r\n"
    b" second part\r\n"
    b"\r\n"
    b"X-In-Body: not a header\r\n"
)

HEADERS = {
    "plain": ("X-Mail-Type", "newsletter"),
    "name_case_insensitive": ("x-mail-type", "newsletter"),
    "rfc2047_base64": ("From", "张三 <zhang@acme.com>"),
    "rfc2047_quoted_printable": ("Subject", "Café news"),
    "folded": ("X-Folded", "first part second part"),
    "missing": ("X-Missing", None),
    "body_is_not_headers": ("X-In-Body", None),
}


@pytest.mark.parametrize("name, value", HEADERS.values(), ids=HEADERS.keys())
def test_header_reader(name, value):
    """Header values come back decoded and unfolded; a missing header is None."""
    assert header_reader(MESSAGE)(name) == value


def test_header_reader_parses_lazily_and_once(monkeypatch):
    import relay.rewrite.message

    calls = []
    real = relay.rewrite.message.header_block
    monkeypatch.setattr(relay.rewrite.message, "header_block", lambda data: calls.append(1) or real(data))
    header = header_reader(MESSAGE)
    assert calls == []
    header("Subject")
    header("From")
    assert calls == [1]
