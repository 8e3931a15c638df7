"""SpoolClient.store keeps its own sequence across its awaits: another session's store may run meanwhile."""

from __future__ import annotations

import asyncio

import pytest

from relay.process.acceptor import SpoolClient, SpoolUnreachable
from relay.spool import NewMessage


class StallingWriter:
    """A socketpair writer whose first drain waits for the test, then fails as a broken pipe."""

    def __init__(self):
        self.release = asyncio.Event()
        self.drains = 0

    def write(self, data) -> None:
        pass

    def writelines(self, data) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    async def drain(self) -> None:
        self.drains += 1
        if self.drains == 1:
            await self.release.wait()
            raise ConnectionResetError("broken pipe")


def message(queue_id: str) -> NewMessage:
    return NewMessage(queue_id, 0.0, "billing", "smtp", "10.0.0.5", "acct", "trigger", "a@acme.com",
                      ["b@example.net"], b"Subject: x\r\n\r\nbody\r\n")


def test_a_failed_store_forgets_its_own_sequence_not_the_latest():
    async def scenario():
        writer = StallingWriter()
        client = SpoolClient(asyncio.StreamReader(), writer, reconfigure=None, answered=None)
        first = asyncio.create_task(client.store(message("FIRST")))
        await asyncio.sleep(0)  # first is in its drain
        second = asyncio.create_task(client.store(message("SECOND")))
        await asyncio.sleep(0)  # second has taken sequence 2 and waits for its answer
        writer.release.set()
        with pytest.raises(SpoolUnreachable):
            await first
        assert set(client._waiting) == {2}  # the second's answer still has a taker
        client._waiting[2].set_result(None)  # as _read_replies does for "(2, None)"
        await asyncio.wait_for(second, 1)
        client._replies.cancel()

    asyncio.run(scenario())
