"""relay.listener.read_message, the DATA reader, against a reference that reads line by line.

The reference is the simple form of the same rules (one ``readuntil(b"\\n")`` per line); the
real reader works on blocks for speed. Both must give the same text or refusal, and leave the
same bytes (pipelined commands) in the stream, for any input and any way it is cut into
packets.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from relay.smtp.data import LINE_TOO_LONG, NUL_IN_DATA, TOO_MUCH_DATA, read_message

LINE_LIMIT = 20  # small, so long lines and block boundaries are easy to reach


async def reference(reader: asyncio.StreamReader, size_limit: int | None, line_limit: int):
    content, size, refusal, nul, at_line_start = bytearray(), 0, None, False, True
    while True:
        line = await reader.readuntil(b"\n")
        if at_line_start and line == b".\r\n":
            return refusal or (NUL_IN_DATA if nul else bytes(content))
        size += len(line)
        nul = nul or b"\0" in line
        if len(line) > line_limit:
            refusal = refusal or LINE_TOO_LONG
        elif size_limit and size > size_limit:
            refusal = refusal or TOO_MUCH_DATA
        content += line[1:] if at_line_start and line.startswith(b".") else line
        at_line_start = line.endswith(b"\r\n")


async def run(reader_function, stream: bytes, packets: list[int], size_limit: int | None, limit: int):
    reader = asyncio.StreamReader(limit=limit)

    async def feed():
        position = 0
        for size in packets:
            reader.feed_data(stream[position:position + size])
            position += size
            await asyncio.sleep(0)
        reader.feed_data(stream[position:])
        reader.feed_eof()

    feeder = asyncio.create_task(feed())
    try:
        result = await reader_function(reader, size_limit, LINE_LIMIT)
    except asyncio.IncompleteReadError:
        result = "EOF"
    await feeder
    rest = await reader.read()
    return (bytes(result) if isinstance(result, bytearray) else result), rest


def outcome(stream: bytes, packets: list[int], size_limit: int | None = None, limit: int = 1 << 16):
    real = asyncio.run(run(read_message, stream, packets, size_limit, limit))
    expected = asyncio.run(run(reference, stream, packets, size_limit, 1 << 20))
    return real, expected


CASES = {
    "empty message": b".\r\nQUIT\r\n",
    "one line": b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n",
    "stuffed dots": b"..\r\n...x\r\n.a\r\nb\r\n.\r\nNOOP\r\n",
    "dot after bare LF is kept": b"a\n.b\n.\nstill content\r\n.\r\nRSET\r\n",
    "bare-LF end is content": b"a\n.\nMAIL FROM:<x@y>\r\n.\r\nQUIT\r\n",
    "CR dot CR is content": b"a\r.\rb\r\n.\r\n",
    "end split everywhere": b"\r\n\r\n.\r\n\r\n.\r\nNOOP\r\n",
    "long line": b"x" * 50 + b"\r\nshort\r\n.\r\nQUIT\r\n",
    "line of exactly the limit": b"y" * (LINE_LIMIT - 2) + b"\r\n" + b"z" * (LINE_LIMIT - 1) + b"\r\n.\r\n",
    "first line is a dot line": b".\r\n",
    "crlf then end": b"\r\n.\r\n",
    "NUL before a dot line": b"a\r\n\x00.\r\nMAIL FROM:<x@y>\r\n.\r\nQUIT\r\n",
    "NUL and a long line": b"\x00\r\n" + b"x" * 50 + b"\r\n.\r\n",
}


@pytest.mark.parametrize("stream", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("packet", [1, 2, 3, 5, 7, 1000])
def test_same_as_line_by_line_for_every_packet_size(stream, packet):
    real, expected = outcome(stream, [packet] * (len(stream) // packet))
    assert real == expected


def test_a_line_without_end_is_refused_without_being_kept():
    """Megabytes with no LF: refused as too long, and the buffer stays empty while they arrive."""
    async def scenario():
        reader = asyncio.StreamReader(limit=1001)
        reader.feed_data(b"x" * 100_000)
        task = asyncio.create_task(read_message(reader, None, 1001))
        await asyncio.sleep(0.01)
        assert not task.done()
        reader.feed_data(b"\r\n.\r\n")
        return await task

    assert asyncio.run(scenario()) is LINE_TOO_LONG


def test_same_as_line_by_line_on_random_streams():
    alphabet = [b"\r", b"\n", b".", b"\r\n", b"\r\n.", b"a", b"bc", b"\r\n.\r\n", b"xxxxxxxxxx", b"\x00"]
    for seed in range(400):
        rng = random.Random(seed)
        stream = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60)))
        stream += b"\r\n.\r\nQUIT\r\n"
        packets = [rng.randrange(1, 12) for _ in range(len(stream))]
        size_limit = rng.choice([None, 10, 40])
        real, expected = outcome(stream, packets, size_limit, limit=rng.choice([5, 21, 1 << 16]))
        assert real == expected, (seed, stream, packets, size_limit)


def test_a_nul_refuses_the_message_and_leaves_the_next_command():
    """``\\r\\n\\0.\\r\\n`` is content to us but could end DATA for an upstream that drops NULs."""
    real, _ = outcome(b"a\r\n\x00.\r\nMAIL FROM:<x@y>\r\n.\r\nQUIT\r\n", [1000])
    assert real == (NUL_IN_DATA, b"QUIT\r\n")
