"""The socketpair between the main process and an acceptor: frame format and the messages on it.

Frames are an 8-byte header (metadata length, data length), then a pickle of the metadata,
then the data bytes (sent without re-encoding). Pickle is safe here: both ends are this
program, and the socketpair is reachable by nobody else (see :mod:`relay.process.supervisor`
for the whole protocol).
"""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
import struct

from relay.spool import (
    NewMessage,
    piece_chunks,
)

FRAME_HEADER = struct.Struct("!II")  # metadata length, data length
PIECE_SIZE = 256 * 1024  # the most of a body one frame carries
READY = "ready"  # an acceptor's first frame: its listeners are serving


@dataclasses.dataclass(frozen=True)
class LimitsCall:
    """Acceptor → main: a :class:`relay.policy.anvil.SharedLimits` method; ``sequence`` None: no answer wanted."""

    sequence: int | None
    method: str
    args: tuple


@dataclasses.dataclass(frozen=True)
class LimitsAnswer:
    """Main → acceptor: what the method returned (a LimitsUnavailable: what it raised)."""

    sequence: int
    value: object


ASKED_METHODS = frozenset({"admit", "admit_address", "auth_locked_for", "auth_failed"})
TOLD_METHODS = frozenset({"release", "auth_succeeded"})
PER_CONNECTION_METHODS = frozenset({"admit", "admit_address", "release"})  # first argument: a connection key


# -- frames ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BodyPiece:
    """Frame metadata: the frame's data is the next piece of the body of message ``sequence``."""

    sequence: int


def write_frame(writer: asyncio.StreamWriter, meta: object, data: bytes | memoryview = b"") -> None:
    """One whole frame, written at once (never interleaved with another); ``data`` at most a piece."""
    encoded = pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(FRAME_HEADER.pack(len(encoded), len(data)) + encoded)
    if data:
        writer.write(data)


async def write_message(writer: asyncio.StreamWriter, sequence: int, message: NewMessage) -> None:
    """A message's body as piece frames, draining after each, then the message without its body."""
    for piece in message.pieces:
        for chunk in piece_chunks(piece, PIECE_SIZE):
            write_frame(writer, BodyPiece(sequence), chunk)
            await writer.drain()
    write_frame(writer, (sequence, dataclasses.replace(message, body=())))


async def read_frame(reader: asyncio.StreamReader) -> tuple[object, bytes]:
    """The next frame; ``asyncio.IncompleteReadError`` when the other side is gone."""
    meta_length, data_length = FRAME_HEADER.unpack(await reader.readexactly(FRAME_HEADER.size))
    meta = pickle.loads(await reader.readexactly(meta_length))
    data = await reader.readexactly(data_length) if data_length else b""
    return meta, data


