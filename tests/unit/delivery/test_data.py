"""The upstream DATA writer (relay.delivery.transport.data) against aiosmtplib's own encoding, as a table."""

from __future__ import annotations

import random

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from aiosmtplib.response import SMTPResponse

from relay.delivery.transport.data import COALESCE, DotStuffer, _message


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


def stuffed(pieces) -> bytes:
    stuffer = DotStuffer()
    return b"".join([*(out for piece in pieces for out in stuffer.feed(piece)), *stuffer.end()])


def cut(body: bytes, size: int) -> list[bytes]:
    return [body[start:start + size] for start in range(0, len(body), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1 << 18])
@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
def test_same_bytes_as_aiosmtplib_whatever_the_pieces(body, size):
    assert stuffed(cut(body, size)) == aiosmtplib_data(body)
    assert stuffed(map(bytearray, cut(body, size))) == aiosmtplib_data(body)


@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
def test_same_bytes_wherever_one_boundary_falls(body):
    """Spool chunks end anywhere: inside a CRLF, between a line end and its dot, ..."""
    for split in range(len(body) + 1):
        assert stuffed([body[:split], body[split:]]) == aiosmtplib_data(body), split


def test_random_pieces_of_dot_heavy_text_match():
    rng = random.Random(6)
    for _ in range(300):
        body = bytes(rng.choice(b".\r\nab") for _ in range(rng.randrange(0, 60)))
        cuts = sorted(rng.sample(range(len(body) + 1), min(len(body) + 1, rng.randrange(0, 6))))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]
        assert stuffed(pieces) == aiosmtplib_data(body), (body, cuts)


def test_pieces_without_a_dot_line_pass_unchanged_not_copied():
    pieces = [b"line\r\n" * 1000, b"more\r\n" * 1000]
    stuffer = DotStuffer()
    assert [out for piece in pieces for out in stuffer.feed(piece)] == pieces
    assert all(out is piece for out, piece in zip((o for p in pieces for o in DotStuffer().feed(p)), pieces))


class RecordingProtocol:
    """The parts of aiosmtplib's protocol that ``_message`` uses; records every write."""

    def __init__(self):
        self.writes: list[bytes] = []

    def write(self, data) -> None:
        self.writes.append(bytes(data))

    async def _drain_helper(self) -> None:
        pass

    async def read_response(self, timeout=None):
        return SMTPResponse(250, "ok")


async def _sent(pieces: list) -> list[bytes]:
    async def source():
        for piece in pieces:
            yield piece

    protocol = RecordingProtocol()
    assert (await _message(protocol, source(), 5, 5)).code == 250
    return protocol.writes


async def test_a_small_message_is_one_write_with_its_final_dot():
    body = BODIES["dots everywhere"] + BODIES["one line"]
    writes = await _sent([b"Subject: x\r\n\r\n", bytearray(body)])
    assert writes == [aiosmtplib_data(b"Subject: x\r\n\r\n" + body)]


async def test_large_pieces_go_alone_and_small_ones_together():
    big = b"x" * (COALESCE + 1) + b"\r\n"
    pieces = [b"H: 1\r\n\r\n", b"a\r\n", big, b"b\r\n" * 10, b".c\r\n"]
    writes = await _sent(pieces)
    assert b"".join(writes) == aiosmtplib_data(b"".join(pieces))
    assert writes[0] == b"H: 1\r\n\r\na\r\n" and writes[1] == big and len(writes) == 3


async def test_held_pieces_never_exceed_the_limit():
    pieces = [b"y" * 1000 + b"\r\n"] * 200
    writes = await _sent(pieces)
    assert b"".join(writes) == aiosmtplib_data(b"".join(pieces))
    assert all(len(write) <= COALESCE + 3 for write in writes) and len(writes) == 4
