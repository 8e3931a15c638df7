"""The upstream DATA writer (relay.delivery.data) against aiosmtplib's own encoding, as a table."""

from __future__ import annotations

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from relay.delivery.data import dot_stuffed


def aiosmtplib_data(body: bytes) -> bytes:
    """What aiosmtplib's ``execute_data_command`` writes after ``DATA``."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(body)) + b".\r\n"


BODIES = {
    "empty": b"",
    "one line": b"Subject: x\r\n\r\nhello\r\n",
    "no final CRLF": b"Subject: x\r\n\r\nhello",
    "starts with a dot": b".hidden\r\nnext\r\n",
    "a lone dot line": b"a\r\n.\r\nb\r\n",
    "two dots": b"a\r\n..\r\n",
    "ends with a dot": b"a\r\n.",
    "dot after bare LF": b"a\n.\nb\n",
    "dot after bare CR": b"a\r.\rb\r",
    "mixed endings": b"a\r\r\n.\n\r.\r\n",
    "dots everywhere": b".\r\n.\r\n..\r\n...x\r\n.",
    "8-bit": "Grüße\r\n.Grüße\r\n".encode(),
    "long line": b"x" * 5000 + b"\r\n." + b"y" * 3000 + b"\r\n",
}


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 18])
@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
def test_same_bytes_as_aiosmtplib_at_any_chunk_size(body, chunk):
    assert b"".join(dot_stuffed(body, chunk)) == aiosmtplib_data(body)
    assert b"".join(dot_stuffed(bytearray(body), chunk)) == aiosmtplib_data(body)


def test_large_body_with_dot_lines_matches_and_stays_in_bounded_chunks():
    line = b"An ordinary line of a large message, seventy-odd characters long....\r\n"
    body = (line * 700 + b".a dot line\r\n" + b"..\r\n") * 100
    pieces = list(dot_stuffed(body, 4096))
    assert b"".join(pieces) == aiosmtplib_data(body)
    assert max(len(piece) for piece in pieces) < 4096 + 2 * len(line)  # cut at the next line end


def test_chunks_without_a_dot_line_are_views_of_the_body_not_copies():
    body = b"line\r\n" * 10_000
    pieces = list(dot_stuffed(body, 1024))
    assert all(isinstance(piece, memoryview) and piece.obj is body for piece in pieces[:-1])
    assert pieces[-1] == b".\r\n"
