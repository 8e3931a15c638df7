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
import re
from collections.abc import AsyncIterable
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.response import SMTPResponse

from relay.lines import normalise_line_endings

Piece = bytes | bytearray
COALESCE = 64 * 1024  # DATA pieces up to this size are joined into one write (one send() per small message)


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
    protocol = _protocol(client)
    try:
        async with protocol._command_lock:
            protocol._response_pending = True
            protocol.write(b"DATA\r\n")
            start = await protocol.read_response(timeout=timeout)
            if start.code != 354:
                raise aiosmtplib.SMTPDataError(start.code, start.message)
            reply = await _message(protocol, pieces, timeout, final_timeout)
    except BaseException as error:
        if not isinstance(error, aiosmtplib.SMTPDataError):  # no final dot was sent: the upstream must drop it
            client.close()
        raise
    if reply.code != 250:
        raise aiosmtplib.SMTPDataError(reply.code, reply.message)
    return reply


# A dot-atom mailbox at a host name (RFC 5321's common case): quote_address gives it back as it is.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ADDRESS = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\Z")


def quoted(address: str) -> str:
    """``<address>`` for MAIL FROM and RCPT TO, exactly as aiosmtplib's ``quote_address``, which
    runs the email package's ``parseaddr`` (~0.1 ms a call, two per message at least): a plain
    address is taken as it is, anything else (quotes, brackets, the empty sender) goes through it."""
    return f"<{address}>" if _PLAIN_ADDRESS.match(address) else quote_address(address)


@dataclass(frozen=True)
class Pipelined:
    """The replies of one pipelined transaction, in the order the commands were sent."""

    mail: SMTPResponse
    rcpts: list[SMTPResponse]  # one per recipient
    data: SMTPResponse | None  # DATA's refusal, or the final dot's reply; None: nobody to send to


async def send_pipelined(client: aiosmtplib.SMTP, sender: str, options: list[str], recipients: list[str],
                         pieces: AsyncIterable[Piece], timeout: float | None,
                         final_timeout: float | None = None) -> Pipelined:
    """MAIL, every RCPT and DATA in one write (RFC 2920: DATA ends the group), their replies read
    in order; then, after a 354 with a recipient accepted, the message and the final reply.

    SMTP replies are returned, not raised. A 421 ends the session: commands it left unanswered
    get it too. Anything else that goes wrong closes the connection (before any final dot) and
    propagates, as in :func:`send_data`.
    """
    protocol = _protocol(client)
    commands = [b"MAIL FROM:" + b" ".join([quoted(sender).encode("ascii"), *(o.encode("ascii") for o in options)])]
    commands += [b"RCPT TO:" + quoted(address).encode("ascii") for address in recipients]
    commands.append(b"DATA")
    try:
        async with protocol._command_lock:
            replies = await _replies(protocol, b"".join(command + b"\r\n" for command in commands), len(commands), timeout)
            mail, rcpts, start = replies[0], replies[1:-1], replies[-1]
            accepted = mail.code == 250 and any(200 <= reply.code < 300 for reply in rcpts)
            if start.code != 354:
                return Pipelined(mail, rcpts, start if accepted else None)
            if not accepted:  # a server that says 354 with nobody to deliver to gets an empty message
                protocol._response_pending = True
                protocol.write(b".\r\n")
                await protocol.read_response(timeout=timeout)
                return Pipelined(mail, rcpts, None)
            return Pipelined(mail, rcpts, await _message(protocol, pieces, timeout, final_timeout))
    except BaseException:
        client.close()
        raise


class _Collector:
    """Stands in for aiosmtplib's one-shot response waiter while pipelined replies arrive.

    aiosmtplib parses one reply per read into a future and drops what arrives until the future
    is replaced, which would lose replies that come in separate segments; this keeps each reply
    and parses what is already buffered, until ``expected`` replies are in.
    """

    def __init__(self, protocol, expected: int):
        self._protocol = protocol
        self._expected = expected
        self.replies: list[SMTPResponse] = []
        self.complete: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def done(self) -> bool:
        return self.complete.done()

    def set_result(self, reply: SMTPResponse) -> None:
        try:
            while reply is not None:
                self.replies.append(reply)
                if len(self.replies) == self._expected:
                    break
                reply = self._protocol._read_response_from_buffer()
        except Exception as error:  # noqa: BLE001 - a malformed reply ends the collection
            self.set_exception(error)
            return
        if len(self.replies) == self._expected and not self.complete.done():
            self.complete.set_result(None)

    def set_exception(self, error: BaseException) -> None:
        """The connection ended (or a reply was malformed); after a 421 that is the server closing."""
        if self.complete.done():
            return
        if self.replies and self.replies[-1].code == 421:
            self.complete.set_result(None)
        else:
            self.complete.set_exception(error)

    def exception(self) -> BaseException | None:
        return self.complete.exception() if self.complete.done() and not self.complete.cancelled() else None


async def _replies(protocol, commands: bytes, expected: int, timeout: float | None) -> list[SMTPResponse]:
    """Write ``commands`` at once and read ``expected`` replies; if the server closes after a 421,
    the commands it left unanswered share that 421."""
    collector = _Collector(protocol, expected)
    protocol._response_waiter, protocol._response_pending = collector, True
    try:
        protocol.write(commands)
        await asyncio.wait_for(asyncio.shield(collector.complete), timeout)
    except TimeoutError:
        raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for the pipelined replies") from None
    finally:
        protocol._response_pending = False
        if protocol.transport is not None:
            protocol._response_waiter = asyncio.get_running_loop().create_future()
    replies = collector.replies
    return replies + [replies[-1]] * (expected - len(replies))


async def _message(protocol, pieces: AsyncIterable[Piece], timeout: float | None,
                   final_timeout: float | None) -> SMTPResponse:
    """After the 354: the message, dot-stuffed, the final dot, and its reply (within ``final_timeout``).

    Pieces under ``COALESCE`` bytes are held and written together: a small message (its
    header, its body chunk, the final dot) is one ``send()`` instead of four, the costliest
    step of a delivery in the main process's profile. A larger piece is written as it is.
    """
    stuffer = DotStuffer()
    protocol._response_pending = True  # an early refusal mid-DATA is kept, not dropped
    held: list[bytes] = []
    held_size = 0
    async for piece in pieces:
        for out in stuffer.feed(piece):
            if held and held_size + len(out) > COALESCE:
                protocol.write(b"".join(held))
                held, held_size = [], 0
                await _drained(protocol, timeout)
            if len(out) > COALESCE:
                protocol.write(out)
                await _drained(protocol, timeout)
            else:  # a copy if it is not bytes: the source may reuse its buffer for the next piece
                held.append(out if isinstance(out, bytes) else bytes(out))
                held_size += len(out)
    protocol.write(b"".join([*held, *stuffer.end()]))
    return await protocol.read_response(timeout=final_timeout if final_timeout is not None else timeout)


def _protocol(client: aiosmtplib.SMTP):
    protocol = client.protocol
    if protocol is None or protocol._command_lock is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    return protocol


async def _drained(protocol, timeout: float | None) -> None:
    """Wait until the transport's buffer is below its high-water mark, as ``StreamWriter.drain``."""
    try:
        await asyncio.wait_for(protocol._drain_helper(), timeout)
    except TimeoutError:
        raise aiosmtplib.SMTPTimeoutError("Timed out sending the message upstream") from None
