"""The upstream DATA: the message written dot-stuffed, in chunks, without copying it whole.

aiosmtplib's ``data()`` runs two regular expressions over the whole message (line endings,
then dot-stuffing), appends the final dot (each a full copy) and writes the result at once,
so the transport buffers most of it (one more). A 10 MB message cost four copies and most
of its delivery time there. Spooled bodies are already CRLF-normalised, so here the body
is cut into chunks at line ends, each chunk is passed on as a slice of the body unless a
line in it starts with a dot (then that chunk alone is copied, stuffed), and the writer
waits for the transport to drain between chunks. aiosmtplib still holds the conversation:
its command lock, its reply parser and its exceptions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiosmtplib
from aiosmtplib.response import SMTPResponse

from relay.rewrite import normalise_line_endings

CHUNK = 256 * 1024


def dot_stuffed(body: bytes | bytearray, chunk: int = CHUNK) -> Iterator[bytes | memoryview]:
    """The DATA bytes for ``body``, ending with ``.\\r\\n``: exactly what aiosmtplib would send.

    Bare CR and LF become CRLF first (a no-op, only counted, for spooled bodies), so a
    ``\\n.\\n`` can never end the upstream DATA early; every line starting with a dot gets
    a second one; a body not ending in CRLF gets one before the final dot.
    """
    body = normalise_line_endings(body)
    view = memoryview(body)
    start = 0
    while start < len(body):
        newline = body.find(b"\n", min(start + chunk, len(body)) - 1)
        end = len(body) if newline < 0 else newline + 1  # every chunk starts a line
        if body.startswith(b".", start) or body.find(b"\r\n.", start, end) >= 0:
            stuffed = view[start:end].tobytes().replace(b"\r\n.", b"\r\n..")
            yield b"." + stuffed if stuffed.startswith(b".") else stuffed
        else:
            yield view[start:end]
        start = end
    if not body.endswith(b"\r\n"):
        yield b"\r\n"
    yield b".\r\n"


async def send_data(client: aiosmtplib.SMTP, body: bytes | bytearray, timeout: float | None) -> SMTPResponse:
    """DATA, the body, the final dot; the final reply. Raises aiosmtplib's exceptions as ``data()`` does.

    Uses aiosmtplib's protocol internals (the command lock, the "reply expected" flag and
    the flow-control wait), hence its upper bound in pyproject.toml; every e2e delivery
    goes through here, and tests/unit/test_upstream_data.py compares the bytes with its own.
    """
    protocol = client.protocol
    if protocol is None or protocol._command_lock is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    try:
        async with protocol._command_lock:
            protocol._response_pending = True
            protocol.write(b"DATA\r\n")
            start = await protocol.read_response(timeout=timeout)
            if start.code != 354:
                raise aiosmtplib.SMTPDataError(start.code, start.message)
            protocol._response_pending = True  # an early refusal mid-DATA is kept, not dropped
            for piece in dot_stuffed(body):
                protocol.write(piece)
                await _drained(protocol, timeout)
            reply = await protocol.read_response(timeout=timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        client.close()
        raise
    if reply.code != 250:
        raise aiosmtplib.SMTPDataError(reply.code, reply.message)
    return reply


async def _drained(protocol, timeout: float | None) -> None:
    """Wait until the transport's buffer is below its high-water mark, as ``StreamWriter.drain``."""
    try:
        await asyncio.wait_for(protocol._drain_helper(), timeout)
    except asyncio.TimeoutError:
        raise aiosmtplib.SMTPTimeoutError("Timed out sending the message upstream") from None
