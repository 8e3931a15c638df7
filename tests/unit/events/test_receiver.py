"""relay.events.receiver and applier on a MemorySpool, through aiohttp's test client.

The answer SendCloud gets (200, 403, 400), what is stored before it, and what applying then
changes: status, history, suppression, statistics, the team's outbox row.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from urllib.parse import urlencode

import pytest
from aiohttp.test_utils import TestClient, TestServer

from relay.events import applier as applier_module
from relay.events.applier import Applier
from relay.events.receiver import Receiver, app_key_for
from relay.events.webhook import to_event
from relay.spool import State
from relay.spool.events_model import ReceivedEvent
from relay.spool.memory import MemorySpool
from tests.unit.helpers import config_from
from tests.unit.spool.test_protocol import message, update

CONFIG = config_from(
    "server:\n  hostname: relay.test\n  listeners:\n    - {name: smtp, port: 2525, tls: none, auth: optional}\n"
    "upstream: {kind: capture}\n"
    "accounts:\n"
    "  acme_trigger: {api_user: acme_trigger, type: trigger, domain: acme.com, app_key: trigger-app-key}\n"
    "  acme_batch: {api_user: acme_batch, type: batch, domain: acme.com}\n"
    "users:\n  billing:\n    channels: {trigger: acme_trigger, batch: acme_batch}\n"
    "    events_url: https://billing.example/hook\n    events_secret: s3cret\n"
    "events: {listen: 127.0.0.1:8026, app_key: global-app-key}\n"
)
EMAIL_ID = "1_2_3_4.sc-10_10_127_51-inbound0$a@example.org"


def signed(fields: dict, key: str = "trigger-app-key", timestamp: str | None = None) -> dict:
    timestamp = timestamp or str(int(time.time() * 1000))
    token = hashlib.sha256(json.dumps(fields, sort_keys=True).encode() + timestamp.encode()).hexdigest()[:50]
    return {
        **fields,
        "timestamp": timestamp,
        "token": token,
        "signature": hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest(),
    }


@pytest.fixture
async def setup():
    spool = MemorySpool()
    await spool.open()
    await spool.store(message("Q1", recipients=("a@example.org", "b@example.org")))
    await spool.record([update("Q1", 0, State.DELIVERED, email_id=EMAIL_ID), update("Q1", 1, State.DELIVERED)])
    applier = Applier(lambda: CONFIG, spool)
    receiver = Receiver(lambda: CONFIG, spool, applier)
    client = TestClient(TestServer(receiver.app()))
    await client.start_server()
    await applier.start()
    yield client, spool, applier
    await applier.stop()
    await client.close()


async def post(client, fields: dict, as_json: bool = False) -> int:
    if as_json:
        response = await client.post(
            "/webhooks/sendcloud", data=json.dumps(fields), headers={"Content-Type": "application/json"}
        )
    else:
        response = await client.post(
            "/webhooks/sendcloud", data=urlencode(fields), headers={"Content-Type": "application/x-www-form-urlencoded"}
        )
    return response.status


EVENT = {"event": "deliver", "apiUser": "acme_trigger", "emailId": EMAIL_ID, "recipient": "a@example.org"}


async def test_probes_are_answered_and_store_nothing(setup):
    client, spool, _ = setup
    assert (await client.get("/webhooks/sendcloud")).status == 200
    assert await post(client, {}) == 200
    assert await spool.unapplied_events(10) == []


REFUSED = {
    "wrong_key": (signed(EVENT, key="global-app-key"), 403),  # acme_trigger has its own key
    "no_signature": ({k: v for k, v in signed(EVENT).items() if k != "signature"}, 403),
    "stale": (signed(EVENT, timestamp=str(int((time.time() - 7200) * 1000))), 403),
    "future": (signed(EVENT, timestamp=str(int(time.time() + 7200))), 403),
    "no_timestamp": ({**signed(EVENT), "timestamp": ""}, 403),
}


@pytest.mark.parametrize("fields, status", REFUSED.values(), ids=REFUSED.keys())
async def test_refused_events_change_nothing(setup, fields, status):
    client, spool, applier = setup
    assert await post(client, fields) == status
    await applier.idle()
    assert await spool.fates("Q1") == {}
    assert spool.commits == 2  # the message and its outcome only: nothing was written


async def test_unreadable_bodies_are_400(setup):
    client, _, _ = setup
    response = await client.post("/webhooks/sendcloud", data=b"[1, 2]", headers={"Content-Type": "application/json"})
    assert response.status == 400


def test_app_key_is_the_accounts_else_the_global_one():
    assert app_key_for(CONFIG, "acme_trigger") == "trigger-app-key"
    assert app_key_for(CONFIG, "acme_batch") == "global-app-key"
    assert app_key_for(CONFIG, "somebody_else") == "global-app-key"
    assert app_key_for(CONFIG, None) == "global-app-key"


async def test_an_event_is_stored_answered_then_applied(setup):
    client, spool, applier = setup
    assert await post(client, signed(EVENT)) == 200
    await applier.idle()
    fate = (await spool.fates("Q1"))[0]
    assert fate.status == "delivered" and [e.event for e in fate.events] == ["deliver"]
    (row,) = await spool.due_fanout(time.time() + 1, 10)
    body = json.loads(row.body)
    assert (body["event"], body["queue_id"], body["recipient"], body["user"], body["email_id"]) == (
        "deliver",
        "Q1",
        "a@example.org",
        "billing",
        EMAIL_ID,
    )
    assert body["id"].startswith("sc-")
    counters = {(group, counter): count for _, group, _, counter, count in await spool.stats("2000-01-01T00")}
    assert counters[("user", "delivered")] == 1 and counters[("domain", "delivered")] == 1


async def test_a_redelivery_is_200_and_applied_once(setup):
    client, spool, applier = setup
    fields = signed({**EVENT, "event": "open"})
    assert await post(client, fields) == 200
    assert await post(client, fields, as_json=True) == 200
    await applier.idle()
    assert [e.event for e in (await spool.fates("Q1"))[0].events] == ["open"]


async def test_opens_count_unique_once_per_recipient(setup):
    client, spool, applier = setup
    for n in range(3):
        assert (
            await post(
                client, signed({**EVENT, "event": "open", "ip": f"10.0.0.{n}"}, timestamp=str(int(time.time()) - n))
            )
            == 200
        )
    await applier.idle()
    counters = {counter: count for _, group, _, counter, count in await spool.stats("2000-01-01T00") if group == "user"}
    assert counters == {"open": 3, "unique_open": 1}


async def test_mapping_by_relay_id_and_recipient(setup):
    client, spool, applier = setup
    headers = json.dumps({"SC-Custom-Relay-Id": "Q1"})
    fields = {
        "event": "invalid",
        "apiUser": "acme_trigger",
        "recipient": "B@example.org",
        "userHeaders": headers,
        "subStat": "406",
    }
    assert await post(client, signed(fields), as_json=True) == 200
    await applier.idle()
    fate = (await spool.fates("Q1"))[1]
    assert fate.status == "invalid" and fate.events[0].sub_stat == "406"
    (entry,) = await spool.suppressions()
    assert entry[:4] == ("b@example.org", "invalid", frozenset({"batch", "trigger"}), None)


async def test_unknown_messages_are_answered_and_still_suppress(setup):
    client, spool, applier = setup
    fields = {"event": "report_spam", "apiUser": "acme_trigger", "emailId": "9_9_9_9.sc-1-inbound0$x@example.org"}
    assert await post(client, signed(fields)) == 200
    await applier.idle()
    assert await spool.unapplied_events(10) == []
    assert [row[:2] for row in await spool.suppressions()] == [("x@example.org", "report_spam")]
    assert await spool.due_fanout(time.time() + 1, 10) == []


async def test_events_left_unapplied_are_applied_at_the_next_start(setup):
    client, spool, applier = setup
    await applier.stop()
    assert await post(client, signed(EVENT)) == 200
    assert len(await spool.unapplied_events(10)) == 1
    restarted = Applier(lambda: CONFIG, spool)
    await restarted.start()
    try:
        for _ in range(100):
            if not await spool.unapplied_events(10):
                break
            await asyncio.sleep(0.01)
        assert (await spool.fates("Q1"))[0].status == "delivered"
    finally:
        await restarted.stop()


async def test_a_batch_sees_its_own_earlier_events(setup):
    """Three opens of one recipient decided in one batch: one unique open, three history lines."""
    _, spool, applier = setup
    await applier.stop()
    batch = []
    for n in range(3):
        fields = signed({**EVENT, "event": "open"}, timestamp=str(int(time.time()) - n))
        event_id = await spool.store_event(ReceivedEvent(time.time(), "open", json.dumps(fields), (f"token:{n}",)))
        batch.append((event_id, to_event(fields)))
    await applier.apply(batch)
    counters = {counter: count for _, group, _, counter, count in await spool.stats("2000-01-01T00") if group == "user"}
    assert counters == {"open": 3, "unique_open": 1}
    assert len((await spool.fates("Q1"))[0].events) == 3
    assert await spool.unapplied_events(10) == []


async def test_an_event_both_left_unapplied_and_queued_at_start_is_applied_once(setup):
    """The receiver answers while the applier is still working through the backlog."""
    _, spool, applier = setup
    await applier.stop()
    fields = signed({**EVENT, "event": "open"})
    event_id = await spool.store_event(ReceivedEvent(time.time(), "open", json.dumps(fields), ("token:x",)))
    restarted = Applier(lambda: CONFIG, spool)
    restarted.submit(event_id, to_event(fields))  # queued before the backlog is read
    await restarted.start()
    try:
        await restarted.idle()
        assert [e.event for e in (await spool.fates("Q1"))[0].events] == ["open"]
    finally:
        await restarted.stop()


async def test_events_whose_write_failed_are_applied_once_the_spool_works_again(setup, monkeypatch):
    client, spool, applier = setup
    monkeypatch.setattr("relay.events.applier._RETRY_AFTER", 0.05)
    real_apply_event = spool.apply_event

    async def disk_full(applied):
        raise OSError("disk full")

    spool.apply_event = disk_full
    assert await post(client, signed(EVENT)) == 200  # stored: the answer does not wait for applying
    await applier.idle()
    assert len(await spool.unapplied_events(10)) == 1
    spool.apply_event = real_apply_event
    for _ in range(100):
        if not await spool.unapplied_events(10):
            break
        await asyncio.sleep(0.01)
    assert [e.event for e in (await spool.fates("Q1"))[0].events] == ["deliver"]


async def test_an_event_that_cannot_be_decided_does_not_hold_up_the_others(setup, monkeypatch):
    _, spool, applier = setup
    await applier.stop()

    real_decide = applier_module.decide

    def decide(config, event_id, event, *rest):
        if event.event == "click":
            raise KeyError("a bug")
        return real_decide(config, event_id, event, *rest)

    monkeypatch.setattr(applier_module, "decide", decide)
    batch = []
    for n, name in enumerate(("open", "click", "deliver")):
        fields = signed({**EVENT, "event": name})
        event_id = await spool.store_event(ReceivedEvent(time.time(), name, json.dumps(fields), (f"token:{n}",)))
        batch.append((event_id, to_event(fields)))
    await applier.apply(batch)
    assert [e.event for e in (await spool.fates("Q1"))[0].events] == ["open", "deliver"]
    assert [e.event for e in await spool.unapplied_events(10)] == ["click"]


async def test_an_event_stored_but_never_applied_by_its_node_is_applied_by_a_running_one(setup, monkeypatch):
    """Several nodes: one stored an event and died before applying it; a running applier finds
    it at its next look at the spool, without a restart."""
    _, spool, applier = setup
    await applier.stop()
    monkeypatch.setattr("relay.events.applier._BACKLOG_EVERY", 0.05)
    running = Applier(lambda: CONFIG, spool)
    await running.start()
    try:
        await asyncio.sleep(0.1)  # past its start-up pass: only a later look can find the event
        fields = signed({**EVENT, "event": "open"})
        await spool.store_event(ReceivedEvent(time.time(), "open", json.dumps(fields), ("token:orphan",)))
        for _ in range(100):
            if await spool.unapplied_events(10) == []:
                break
            await asyncio.sleep(0.02)
        assert await spool.unapplied_events(10) == []
        assert [e.event for e in (await spool.fates("Q1"))[0].events] == ["open"]
    finally:
        await running.stop()
