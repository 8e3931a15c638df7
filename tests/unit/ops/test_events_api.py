"""/api/stats and /api/suppressions of the admin endpoint, on a MemorySpool (the CLI's queries)."""

from __future__ import annotations

import time

import pytest
from aiohttp.test_utils import TestClient, TestServer

from relay.events import stats
from relay.ops.http import AdminBackend, AdminServer
from relay.spool.memory import MemorySpool
from tests.unit.helpers import BASE, config_from

CONFIG = config_from(BASE)


@pytest.fixture
async def api():
    spool = MemorySpool()
    await spool.open()

    async def reload():
        return None, []

    server = AdminServer(AdminBackend(lambda: CONFIG, spool, lambda: False, list, dict, reload))
    client = TestClient(TestServer(server._app()))
    await client.start_server()
    yield client, spool
    await client.close()


async def test_suppressions_add_list_remove(api):
    client, spool = api
    response = await client.post("/api/suppressions", json={"address": "Someone@Example.org", "expires": "30d"})
    assert response.status == 201
    added = await response.json()
    assert (added["address"], added["reason"], added["channels"], added["account"]) == (
        "someone@example.org",
        "manual",
        ["batch", "trigger"],
        None,
    )
    assert added["expires_at"].endswith("Z")
    await client.post(
        "/api/suppressions", json={"address": "someone@example.org", "reason": "unsubscribe", "account": "acme_trigger"}
    )
    listed = await (await client.get("/api/suppressions")).json()
    assert [(e["address"], e["reason"], e["account"]) for e in listed] == [
        ("someone@example.org", "manual", None),
        ("someone@example.org", "unsubscribe", "acme_trigger"),
    ]
    response = await client.delete("/api/suppressions/someone@example.org?account=acme_trigger")
    assert (response.status, (await response.json())["removed"]) == (200, 1)
    assert (await client.delete("/api/suppressions/someone@example.org?account=acme_trigger")).status == 404
    assert (await (await client.delete("/api/suppressions/SOMEONE@example.org")).json())["removed"] == 1
    assert await spool.suppressions() == []


@pytest.mark.parametrize(
    "body", [{"address": "no-at-sign"}, {"address": "a@b.org", "reason": "bored"}, {"reason": "manual"}, [1]]
)
async def test_bad_additions_are_400_and_add_nothing(api, body):
    client, spool = api
    assert (await client.post("/api/suppressions", json=body)).status == 400
    assert await spool.suppressions() == []


async def test_stats_roll_up_the_hourly_counters(api):
    client, spool = api
    hour = stats.hour_bucket(time.time())
    await spool.add_stats(
        [
            (hour, "user", "billing", "requested", 4),
            (hour, "user", "billing", "delivered", 3),
            (hour, "account", "acme_trigger", "requested", 4),
        ]
    )
    body = await (await client.get("/api/stats", params={"since": "1d", "group": "user", "by": "hour"})).json()
    (row,) = body["rows"]
    assert (row["period"], row["user"], row["requested"], row["delivered"], row["delivered_rate"]) == (
        hour,
        "billing",
        4,
        3,
        0.75,
    )
    assert (await client.get("/api/stats", params={"since": "yesterday"})).status == 400
    assert (await client.get("/api/stats", params={"by": "week"})).status == 400
