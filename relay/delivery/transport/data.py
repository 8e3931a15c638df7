"""The upstream DATA: the message written dot-stuffed, piece by piece, as it is read from the spool.

aiosmtplib's ``data()`` takes the whole message, runs two regular expressions over it (line
endings, then dot-stuffing), appends the final dot (each a full copy) and writes the result
at once, so the transport buffers most of it (one more): four copies of a 10 MB message.
Here the message arrives in pieces (the header, then chunks of the spooled blob): each is
passed on as it is unless a line in it starts with a dot (then that piece alone is copied,
stuffed), and the writer waits for the transport to drain before asking for the next, so
only a chunk or two is ever in memory. aiosmtplib still holds the conversation: its command
lock, its reply parser and its exceptions.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable

import aiosmtplib
from aiosmtplib.response import SMTPResponse

from relay.lines import normalise_line_endings

Piece = bytes | bytearray


class DotStuffer:
    """The DATA bytes for a message given in pieces: exactly what aiosmtplib would send for it whole.

    Bare CR and LF become CRLF (a no-op, only counted, for spooled bodies), so a ``\\n.\\n``
    can never end the upstream DATA early; every line starting with a dot gets a second one;
    a message not ending in CRLF gets one before the final dot. What straddles two pieces is
    settled as if they were one: a CR ending a piece is held back until the next shows
    whether an LF follows, and a piece after a line end that starts with a dot is stuffed.
    """

    def __init__(self) -> None:
        self._held = b""  # a CR that ended the last piece
        self._line_start = True  # the next byte starts a line (DATA starts with one) ...
        self._ends_crlf = False  # ... but an empty message still needs its CRLF before the dot

    def feed(self, piece: Piece) -> list[Piece]:
        if self._held:
            piece, self._held = self._held + piece, b""
        if piece.endswith(b"\r"):
            piece, self._held = piece[:-1], b"\r"
        return self._stuffed(normalise_line_endings(piece)) if piece else []

    def end(self) -> list[Piece]:
        """The last bytes: a held CR (a line end of its own), the final CRLF if missing, the dot."""
        tail = self._stuffed(normalise_line_endings(self._held)) if self._held else []
        self._held = b""
        if not self._ends_crlf:
            tail.append(b"\r\n")
        return [*tail, b".\r\n"]

    def _stuffed(self, piece: Piece) -> list[Piece]:
        leading = self._line_start and piece.startswith(b".")
        self._line_start = self._ends_crlf = piece.endswith(b"\n")
        if not leading and b"\n." not in piece:
            return [piece]
        stuffed = piece.replace(b"\n.", b"\n..")  # after normalising, every LF ends a CRLF
        return [b"." + stuffed if leading else stuffed]


async def send_data(client: aiosmtplib.SMTP, pieces: AsyncIterable[Piece], timeout: float | None,
                    final_timeout: float | None = None) -> SMTPResponse:
    """DATA, the message, the final dot; the final reply. Raises aiosmtplib's exceptions as ``data()`` does.

    ``final_timeout`` bounds the wait for the reply to the final dot (``upstream.data_timeout``,
    as Postfix's smtp_data_done_timeout): the upstream may scan the message before it answers,
    and giving up early makes a message it then accepts a duplicate at the next try.

    An exception from ``pieces`` (the message deleted from the spool while it was sent) closes
    the connection before the final dot, so the upstream discards what it got, and propagates.

    Uses aiosmtplib's protocol internals (the command lock, the "reply expected" flag and
    the flow-control wait), hence its upper bound in pyproject.toml; every e2e delivery
    goes through here, and tests/unit/delivery/test_data.py compares the bytes with its own.
    """
    protocol = client.protocol
    if protocol is None or protocol._command_lock is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    stuffer = DotStuffer()
    try:
        async with protocol._command_lock:
            protocol._response_pending = True
            protocol.write(b"DATA\r\n")
            start = await protocol.read_response(timeout=timeout)
            if start.code != 354:
                raise aiosmtplib.SMTPDataError(start.code, start.message)
            protocol._response_pending = True  # an early refusal mid-DATA is kept, not dropped
            async for piece in pieces:
                for out in stuffer.feed(piece):
                    protocol.write(out)
                    await _drained(protocol, timeout)
            for out in stuffer.end():
                protocol.write(out)
            reply = await protocol.read_response(timeout=final_timeout if final_timeout is not None else timeout)
    except BaseException as error:
        if not isinstance(error, aiosmtplib.SMTPDataError):  # no final dot was sent: the upstream must drop it
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
