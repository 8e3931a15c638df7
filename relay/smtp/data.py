"""The DATA reader: the message text of one DATA, read in blocks, lines cut at any LF."""

from __future__ import annotations

import asyncio

from relay.errors import SMTPReply

# The refusals of a message read to its end (RFC 5321 4.2.5: after the final dot).
TOO_MUCH_DATA = SMTPReply(552, "5.3.4", "Message size exceeds fixed maximum message size")
LINE_TOO_LONG = SMTPReply(552, "5.3.4", "Message has a line over the maximum line length")
# RFC 5322 2.3 allows no NUL in a message, and an upstream that drops NULs would read
# "\r\n\0.\r\n" as the end of DATA: a second message smuggled inside the first.
NUL_IN_DATA = SMTPReply(554, "5.6.0", "Message contains a NUL character (RFC 5322 2.3)")

_END = b"\r\n.\r\n"  # the end of DATA, with the CRLF that ends the line before the dot
# How what was read may end while the end of DATA could still be starting there.
_END_STARTS = (b"\r", b"\r\n", b"\r\n.", b"\r\n.\r")


def _first_refusal(lengths: list[int], size: int, size_limit: int | None, line_limit: int) -> SMTPReply | None:
    """Which limit the first offending line (lengths without the LF) breaks, checked line by line."""
    for length in lengths:
        size += length + 1
        if length + 1 > line_limit:
            return LINE_TOO_LONG
        if size_limit and size > size_limit:
            return TOO_MUCH_DATA
    return None


async def read_message(reader: asyncio.StreamReader, size_limit: int | None, line_limit: int) -> bytearray | SMTPReply:
    """The message text of one DATA, dot-unstuffed; or the reply refusing it.

    ``line_limit`` counts a line with its line end. A NUL anywhere refuses the message
    (:data:`NUL_IN_DATA`), unless a limit refused it already.

    Only ``CRLF.CRLF`` ends the message (a ``\\n.\\n`` is content, so nothing can be smuggled),
    and only a dot that starts a line after a CRLF is unstuffed. Unlike aiosmtpd, which splits
    on CRLF alone, a line is cut at any LF for the length limit: a legacy application sending
    bare-LF text longer than 1,000 bytes has short lines, not one line "too long".

    The text is read in blocks, not lines: ``readuntil`` the end, or what has arrived so far,
    with bytes-level searches for the dots to unstuff and the lines too long (a loop per line
    cost ~0.1 s per 10 MB on the event loop). Nothing after the final dot is consumed: the
    client may have pipelined its next commands. ``readuntil`` stops at the end; where what
    was read could be the start of it (``_END_STARTS``; at the start of DATA, which follows a
    CRLF) the next bytes are read one by one and held back, so the end is never split between
    two searches. The text grows in one buffer, returned as it is: a message is held once
    while it arrives. A message over a limit is read to its end and discarded, then refused,
    as RFC 5321 4.2.5 implies.
    """
    content = bytearray()
    size = 0
    refusal = None
    nul = False  # a NUL was read
    line_length = 0  # of the line not yet ended
    read = b"\r\n"  # the last bytes read (up to 5): DATA starts as if after a CRLF
    before = read  # the two bytes before the next text: do they end a line?
    held = b""  # read, but perhaps the start of the end
    while True:
        if read.endswith(_END_STARTS):
            piece = await reader.readexactly(1)
        else:
            try:
                piece = await reader.readuntil(_END)
            except asyncio.LimitOverrunError as error:  # no end yet: what cannot hold its start
                piece = await reader.readexactly(error.consumed)
        read = (read + piece[-5:])[-5:]
        held = held + piece if held else piece
        ended = read == _END
        if not ended and read.endswith(_END_STARTS):
            continue
        text, held = (held[:-3] if ended else held), b""  # the final ".\r\n" is not content
        lengths = list(map(len, text.split(b"\n")))  # without their LF
        lengths[0] += line_length  # the first continues the line not yet ended ...
        line_length = lengths.pop()  # ... and the last is not ended yet
        added = sum(lengths) + len(lengths)
        if refusal is None and lengths and (max(lengths) >= line_limit or size_limit and size + added > size_limit):
            refusal = _first_refusal(lengths, size, size_limit, line_limit)
        if refusal is None and line_length >= line_limit:  # too long already: not kept until it ends
            refusal = LINE_TOO_LONG
        size += added
        nul = nul or b"\0" in text
        if refusal is not None or nul:
            content.clear()
        elif b"\r\n." in text or b"\r\n." in before + text[:2]:  # dot-stuffed lines
            # Each match's dot is at index 2 or later: cutting the two bytes of context off
            # after the replacement leaves exactly the text, unstuffed.
            content += memoryview((before + text).replace(b"\r\n.", b"\r\n"))[2:]
        else:
            content += text
        if ended:
            return refusal or (NUL_IN_DATA if nul else content)
        before = (before + text[-2:])[-2:]

