"""Raw message bytes as every stage reads them: line endings and the header section.

A leaf shared by the rewrite stage (normalising what a client sent), the spool (reading a
body through its header section) and delivery (dot-stuffing upstream).
"""

from __future__ import annotations

import re

_LONE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def normalise_line_endings(data: bytes) -> bytes:
    """Turn every bare CR and bare LF into CRLF.

    Legacy applications send bare LF; passed on unchanged, a ``\\n.\\n`` could end the DATA of
    a lenient upstream early and smuggle a second message. Normalised, it becomes an ordinary
    line that the upstream client dot-stuffs, so one DATA stays exactly one message.
    """
    if b"\r" not in data:
        return data.replace(b"\n", b"\r\n")
    pairs = data.count(b"\r\n")
    if data.count(b"\r") == pairs and data.count(b"\n") == pairs:
        return data  # the usual case, and ten times faster to confirm than to search
    return _LONE_CR_OR_LF.sub(b"\r\n", data)


def header_length(data: bytes) -> int | None:
    """How many bytes the header section and the empty line ending it take; None if ``data`` stops before."""
    if data.startswith(b"\r\n"):
        return 2
    end = data.find(b"\r\n\r\n")
    return None if end < 0 else end + 4


def header_block(data: bytes) -> bytes:
    """The header section of a message (up to the first empty line)."""
    length = header_length(data)
    return data if length is None else data[: length - 2]

