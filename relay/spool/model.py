"""The records of the durable queue, which every backend speaks.

A message is a row with its body and the facts routing decided (user, account); each
recipient is a row with its own state, so a partly delivered message resumes where it stopped.
The records below are what every backend speaks; :mod:`relay.spool.sqlite` is the embedded
backend.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import BinaryIO


class State(StrEnum):
    QUEUED = "queued"  # accepted, not yet tried
    DEFERRED = "deferred"  # tried, temporary failure, will be tried again
    DELIVERED = "delivered"  # upstream took it
    FAILED = "failed"  # permanent failure or lifetime exceeded; a DSN was queued

    @property
    def final(self) -> bool:
        return self in (State.DELIVERED, State.FAILED)


_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZ"  # no vowels: IDs never spell words


_SUFFIX = len(_ALPHABET) ** 5
_sequence_lock = threading.Lock()
_last_ms = -1
_sequence = 0
_partition_start, _partition_size = 0, _SUFFIX


def use_queue_id_partition(index: int, count: int) -> None:
    """Make this process's IDs come from part ``index`` of ``count`` of the sequence space.

    Processes that share one spool (``server.processes``) each get their own part, so two of
    them can never make the same ID in the same millisecond.
    """
    global _partition_start, _partition_size
    _partition_size = _SUFFIX // count
    _partition_start = index * _partition_size


def _encode(number: int, width: int = 0) -> str:
    chars = []
    while number:
        number, digit = divmod(number, len(_ALPHABET))
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars)).rjust(width, _ALPHABET[0])


def new_queue_id(now: float | None = None) -> str:
    """A short, time-ordered ID like Postfix's long queue IDs (e.g. ``3ZK7Q9M2XD4HWT``).

    Milliseconds, then a 5-character sequence: it starts at a random point in the first half
    of this process's part of the sequence space in each new millisecond (so two processes
    rarely meet, and processes of one relay never do) and counts up within it, so IDs made by
    one process in the same millisecond are distinct and sort in the order they were made.
    """
    global _last_ms, _sequence
    ms = int((now if now is not None else time.time()) * 1000)
    with _sequence_lock:
        if ms == _last_ms:
            _sequence += 1
        else:
            _last_ms, _sequence = ms, _partition_start + secrets.randbelow(_partition_size // 2)
        sequence = _sequence % _SUFFIX
    return _encode(ms) + _encode(sequence, 5)


@dataclass(frozen=True)
class FileRegion:
    """A piece of a body that waits in a file (``length`` bytes from ``offset``), not in memory.

    Read with ``pread`` in chunks by whoever needs the bytes (the spool's writer thread), so the
    file's position never matters and the piece is never whole in memory. Whoever made the
    file closes it once the spool has stored the message.
    """

    file: BinaryIO
    offset: int
    length: int
    eight_bit: bool | None = None  # found by whoever wrote the file, as it wrote it (None: read it to know)

    def __len__(self) -> int:
        return self.length


Piece = bytes | bytearray | memoryview | FileRegion
_SCAN_CHUNK = 256 * 1024
_NON_ASCII = re.compile(rb"[\x80-\xff]")


def piece_chunks(piece: Piece, size: int) -> Iterator[bytes | memoryview]:
    """A piece in slices of at most ``size`` bytes: views of a buffer, or reads of a file region."""
    if isinstance(piece, FileRegion):
        position, end = piece.offset, piece.offset + piece.length
        while position < end:
            chunk = os.pread(piece.file.fileno(), min(size, end - position), position)
            if not chunk:
                raise OSError(f"file region ends at {position}, {end - position} bytes short")
            yield chunk
            position += len(chunk)
        return
    view = memoryview(piece)
    for start in range(0, len(view), size):
        yield view[start:start + size]


def is_eight_bit(pieces: Sequence[Piece]) -> bool:
    """Whether any byte is over 127 (the upstream needs ``BODY=8BITMIME``).

    A view is searched in place, after the quick test of the whole buffer it is a view of
    (``isascii`` is ~60 times faster than the search: 0.4 against 22 ms per 10 MB); a file
    region is read and tested chunk by chunk, unless its writer found the answer on the way.
    """
    return any(_has_eight_bit(piece) for piece in pieces)


def _has_eight_bit(piece: Piece) -> bool:
    if isinstance(piece, FileRegion):
        if piece.eight_bit is not None:
            return piece.eight_bit
        return any(not chunk.isascii() for chunk in piece_chunks(piece, _SCAN_CHUNK))
    whole = piece.obj if isinstance(piece, memoryview) else piece
    if isinstance(whole, (bytes, bytearray)) and whole.isascii():
        return False
    return _NON_ASCII.search(piece) is not None


@dataclass(frozen=True)
class NewMessage:
    """What the listener hands to the spool after DATA, already routed.

    ``body`` is the text, or its pieces in order (the rewritten header, then a view of the
    body as received; with acceptor processes, what the main process received, part of it
    perhaps in a :class:`FileRegion`): the spool writes them one after the other into one
    blob, so a large message is never joined into a second copy on its way to disk.
    """

    id: str
    received_at: float
    user: str
    listener: str
    client: str
    account: str
    channel: str
    sender: str
    recipients: list[str]
    body: bytes | Sequence[Piece]
    label: int | None = None  # SendCloud label: the upstream login is api_user#label
    mail_from: str | None = None  # upstream envelope sender when the sender mode changed it

    @functools.cached_property
    def eight_bit(self) -> bool:
        """Found once, when the spool stores the message (in its writer thread), and stored with it."""
        return is_eight_bit(self.pieces)

    @property
    def pieces(self) -> Sequence[Piece]:
        return (self.body,) if isinstance(self.body, (bytes, bytearray, memoryview)) else self.body

    @property
    def size(self) -> int:
        return sum(len(piece) for piece in self.pieces)


@dataclass(frozen=True)
class Recipient:
    message_id: str
    idx: int
    address: str
    state: State
    attempts: int
    next_attempt: float
    last_reply: str | None = None
    email_id: str | None = None  # SendCloud's per-recipient emailId, once delivered


@dataclass(frozen=True)
class QueuedMessage:
    """A message as the spool holds it: metadata plus its recipients (not the body)."""

    id: str
    received_at: float
    user: str
    listener: str
    client: str
    account: str
    channel: str
    sender: str
    size: int
    label: int | None = None
    mail_from: str | None = None
    eight_bit: bool = False  # has bytes over 127: sent with BODY=8BITMIME
    recipients: list[Recipient] = field(default_factory=list)

    @property
    def upstream_sender(self) -> str:
        """MAIL FROM upstream; ``sender`` stays the original, where DSNs go."""
        return self.sender if self.mail_from is None else self.mail_from

    @property
    def state(self) -> str:
        """One word for `queue list`: the least advanced recipient's state."""
        states = {recipient.state for recipient in self.recipients}
        for state in (State.QUEUED, State.DEFERRED, State.FAILED, State.DELIVERED):
            if state in states:
                return state.value
        return "empty"


@dataclass(frozen=True)
class RecipientUpdate:
    """The outcome of one delivery attempt for one recipient, as delivery decided it."""

    message_id: str
    idx: int
    state: State
    attempts: int
    next_attempt: float
    last_reply: str
    email_id: str | None = None
    dsn_status: str | None = None  # a failed recipient's RFC 3463 status, for its DSN (not stored)
