"""relay.events.fanout_worker against a real HTTP endpoint (aiohttp's test server) and a MemorySpool."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from relay.events import fanout
from relay.events.fanout_worker import FanoutWorker
from relay.spool.events_model import OutboxRow
from relay.spool.memory import MemorySpool
from tests.unit.helpers import BASE, config_from


class Team:
    def __init__(self):
        self.answers: list[int] = []  # statuses to give, in order; then 204
        self.received: list[tuple[bytes, str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append((await request.read(), request.headers.get("X-Relay-Signature", "")))
        return web.Response(status=self.answers.pop(0) if self.answers else 204)


@pytest.fixture
async def team():
    endpoint = Team()
    app = web.Application()
    app.router.add_post("/hook", endpoint.handle)
    server = TestServer(app)
    await server.start_server()
    endpoint.url = str(server.make_url("/hook"))
    yield endpoint
    await server.close()


def config_for(url: str):
    return config_from(BASE + f"    events_url: {url}\n    events_secret: team-secret\n")


async def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


async def test_a_row_is_posted_signed_and_then_removed(team):
    spool = MemorySpool()
    config = config_for(team.url)
    now = time.time()
    await spool.enqueue_fanout([OutboxRow("billing", "https://stale.example/old", b'{"id":"sc-1"}', now, now)])
    worker = FanoutWorker(lambda: config, spool, interval=0.01)
    await worker.start()
    try:
        await wait_for(lambda: empty(spool))
    finally:
        await worker.stop()
    ((body, header),) = team.received  # posted to the current events_url, not the stored one
    assert body == b'{"id":"sc-1"}'
    assert fanout.verify(header, b"team-secret", body, time.time())


async def retried_once(spool) -> bool:
    return [row.attempts for row in await outbox(spool)] == [1]


async def test_a_failed_post_is_retried_later_with_its_attempts_counted(team):
    team.answers = [500]
    spool = MemorySpool()
    config = config_for(team.url)
    now = time.time()
    await spool.enqueue_fanout([OutboxRow("billing", team.url, b"{}", now, now)])
    worker = FanoutWorker(lambda: config, spool, interval=0.01)
    await worker.start()
    try:
        await wait_for(lambda: retried_once(spool))
    finally:
        await worker.stop()
    (row,) = await outbox(spool)
    assert now + 3.5 < row.next_attempt < now + 6.5  # 5 s ± 20 %, never before
    assert await spool.due_fanout(now + 1, 10) == []


async def test_rows_past_the_retry_window_are_dropped(team):
    team.answers = [503]
    spool = MemorySpool()
    config = config_for(team.url)
    long_ago = time.time() - fanout.KEEP_FOR - 1
    await spool.enqueue_fanout([OutboxRow("billing", team.url, b"{}", long_ago, long_ago, attempts=40)])
    worker = FanoutWorker(lambda: config, spool, interval=0.01)
    await worker.start()
    try:
        await wait_for(lambda: empty(spool))
    finally:
        await worker.stop()
    assert len(team.received) == 1


async def test_rows_of_a_user_without_events_url_are_dropped_unsent(team):
    spool = MemorySpool()
    config = config_from(BASE)
    now = time.time()
    await spool.enqueue_fanout([OutboxRow("billing", team.url, b"{}", now, now)])
    worker = FanoutWorker(lambda: config, spool, interval=0.01)
    await worker.start()
    try:
        await wait_for(lambda: empty(spool))
    finally:
        await worker.stop()
    assert team.received == []


async def outbox(spool) -> list[OutboxRow]:
    return await spool.due_fanout(time.time() + 10**6, 100)


async def empty(spool) -> bool:
    return not await outbox(spool)
