"""A body the main process receives from an acceptor, kept in memory up to a point, then in a file."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from relay.spool import (
    FileRegion,
    Piece,
)

# The most of one message's body the main process keeps in memory: past it, what it holds goes
# to a temporary file (smaller messages stay in memory: the quick path, and the common one).
SPILL_AT = 1024 * 1024


class ReceivedBody:
    """The pieces of one message's body as the main process receives them.

    At most ``SPILL_AT`` bytes stay in memory: each time that much is held, it is appended to
    an anonymous temporary file in the spool's directory (unlinked at once, so a crash leaves
    nothing behind, and its space comes back at ``close``), in a thread. The caller awaits each
    ``add`` before it reads the next frame, so the writes keep their order and memory stays
    bounded. No fsync: the spool's commit is the durable step, the file only a buffer before it.
    A write that fails (disk full) fails this message only, when it is stored: its acceptor
    answers ``451`` as for a spool error, and its link to the main process carries on.
    """

    def __init__(self, directory: Path):
        self._directory = directory
        self._held: list[bytes] = []
        self._held_size = 0
        self._file = None
        self._spilled = 0
        self._spilled_eight_bit = False  # found while writing: the spool need not read the file for it
        self._failed: OSError | None = None

    async def add(self, data: bytes) -> None:
        if self._failed is not None:
            return  # the rest of a body that cannot be stored
        self._held.append(data)
        self._held_size += len(data)
        if self._held_size >= SPILL_AT:
            held, self._held, self._held_size = self._held, [], 0
            try:
                await asyncio.to_thread(self._spill, held)
            except OSError as error:
                self._failed = error

    def _spill(self, held: list[bytes]) -> None:
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self._directory)
        self._file.writelines(held)
        self._file.flush()  # the spool reads the file through its descriptor, not this buffer
        self._spilled += sum(len(data) for data in held)
        self._spilled_eight_bit = self._spilled_eight_bit or not all(data.isascii() for data in held)

    def pieces(self) -> tuple[Piece, ...]:
        if self._failed is not None:
            raise OSError(f"cannot buffer the message in {self._directory}: {self._failed}")
        spilled = (FileRegion(self._file, 0, self._spilled, self._spilled_eight_bit),) if self._file is not None else ()
        return (*spilled, *self._held)

    def close(self) -> None:
        self._held = []
        if self._file is not None:
            self._file.close()

