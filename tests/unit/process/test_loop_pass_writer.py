"""The acceptor's link writer: what one pass of the event loop writes goes to the main process in one write, in order."""

from __future__ import annotations

import asyncio

from relay.process.acceptor import LoopPassWriter
from relay.process.ipc import JOINED_WRITE


class Recording:
    def __init__(self):
        self.writes: list[bytes] = []
        self.closing = False
        self.drains = 0

    def write(self, data) -> None:
        self.writes.append(bytes(data))

    def writelines(self, buffers) -> None:  # one send() on a socket
        self.writes.append(b"".join(bytes(buffer) for buffer in buffers))

    def is_closing(self) -> bool:
        return self.closing

    async def drain(self) -> None:
        self.drains += 1

    def close(self) -> None:
        self.closing = True


async def test_frames_of_one_pass_are_one_write_and_the_next_pass_another():
    link = Recording()
    writer = LoopPassWriter(link)
    writer.write(b"ask;")
    writer.write(memoryview(b"message;"))
    await writer.drain()  # a drain waits for a full buffer only: the small frames stay together
    writer.write(b"release;")
    assert link.writes == []
    await asyncio.sleep(0)
    assert link.writes == [b"ask;message;release;"] and link.drains == 1
    writer.write(b"next;")
    await asyncio.sleep(0)
    assert link.writes[1:] == [b"next;"]


async def test_large_data_goes_at_once_after_what_was_held():
    link = Recording()
    writer = LoopPassWriter(link)
    large = b"x" * JOINED_WRITE
    writer.write(b"head;")
    writer.write(large)
    writer.write(b"message;")
    assert link.writes == [b"head;", large]
    await asyncio.sleep(0)
    assert link.writes == [b"head;", large, b"message;"]


async def test_close_writes_what_is_held_and_nothing_goes_to_a_closed_link():
    link = Recording()
    writer = LoopPassWriter(link)
    writer.write(b"release;")
    writer.close()
    assert link.writes == [b"release;"] and link.closing
    writer.write(b"late;")
    await asyncio.sleep(0)
    assert link.writes == [b"release;"]


async def test_a_message_of_several_buffers_joins_the_pass_and_a_large_one_goes_through():
    link = Recording()
    writer = LoopPassWriter(link)
    writer.write(b"ask;")
    writer.writelines([b"head;", memoryview(b"body;"), b"message;"])
    await asyncio.sleep(0)
    assert link.writes == [b"ask;head;body;message;"]
    large = [b"head;", b"x" * JOINED_WRITE]
    writer.write(b"release;")
    writer.writelines(large)
    assert link.writes[1:] == [b"release;", b"head;" + b"x" * JOINED_WRITE]
