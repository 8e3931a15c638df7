"""Several relay nodes on one PostgreSQL spool, end to end (issue 14).

Two `sendcloud-relay serve` processes, each with its own ports, work directory and
``spool.node``, share one database of the private test cluster and deliver to one fake
SendCloud. What the spec promises is checked from the outside, as an operator would see it:
mail injected into either node is delivered, queue IDs are unique across nodes, a node killed
with ``kill -9`` mid-delivery loses nothing (the other delivers its mail once the dead node's
leases expire, with duplicates only for the transactions it had in flight), rate budgets and
the suppression list hold across nodes, ``queue`` commands on either node see the whole queue,
and a webhook event received by one node updates a message the other delivered.
"""

from __future__ import annotations

import json
import smtplib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.conftest import KEYS, PASSWORD, TRUSTED_SOURCE, USER, relay_config
from tests.e2e.test_events import post, rcpt_reply, signed, with_events
from tests.support import free_port
from tests.support.mail import parsed
from tests.support.relay import RelayProcess, wait_until

LEASE = 3.0
"""``spool.lease`` in these tests: how long a dead node's claims outlive it."""


@pytest.fixture
def make_node(tmp_path, ca, ca_file, sendcloud, postgres_dsn):
    """Factory: ``make_node(name, config_patch=None)`` → a started relay on the shared database.

    The first call applies the schema (``sendcloud-relay migrate``), as an operator does once.
    """
    started: list[RelayProcess] = []

    def make(name: str, config_patch=None) -> RelayProcess:
        workdir = tmp_path / name
        workdir.mkdir()
        config = relay_config(workdir, ca, ca_file, sendcloud.port)
        config["server"]["hostname"] = f"{name}.relay.test"  # its EHLO name: the fake tells the nodes apart
        config["spool"] = {
            "backend": "postgres", "dsn": postgres_dsn, "node": name, "lease": f"{LEASE}s",
            "retry": ["1s", "2s"], "max_lifetime": "1h", "poll_interval": "200ms",
        }
        with_events(free_port())(config)
        if config_patch:
            config_patch(config)
        node = RelayProcess(workdir, config, env={"SC_TRIGGER_KEY": KEYS["acme_trigger"]})
        if not started:
            migrated = node.cli("migrate", "-c", str(node.config_path))
            assert migrated.returncode == 0, migrated.stderr
        started.append(node)
        return node.start()

    yield make
    for node in started:
        node.__exit__(None, None, None)


def mail(tag: str) -> bytes:
    return f"From: app@acme.com\r\nTo: user@example.net\r\nSubject: {tag}\r\nMessage-ID: <{tag}@nodes.test>\r\n\r\n{tag}\r\n".encode()


def inject(node: RelayProcess, tags: list[str]) -> list[str]:
    """One trusted-network connection, one message per tag (a smarthost's habit); the queue IDs."""
    ids = []
    with smtplib.SMTP("127.0.0.1", node.port("smtp"), timeout=30, source_address=(TRUSTED_SOURCE, 0)) as client:
        client.ehlo()
        for tag in tags:
            client.mail("app@acme.com")
            client.rcpt(f"{tag}@example.net")
            code, reply = client.data(mail(tag))
            assert code == 250, reply
            ids.append(reply.decode().rsplit(" ", 1)[1])
    return ids


def inject_into_both(a: RelayProcess, b: RelayProcess, per_node: int) -> dict[str, str]:
    """``per_node`` messages into each node at the same time; tag → queue ID."""
    plan = {a: [f"a{n}" for n in range(per_node)], b: [f"b{n}" for n in range(per_node)]}
    with ThreadPoolExecutor(2) as pool:
        ids = dict(zip(plan, pool.map(inject, plan, plan.values()), strict=True))
    return {tag: queue_id for node, tags in plan.items() for tag, queue_id in zip(tags, ids[node], strict=True)}


def arrived(sendcloud) -> Counter:
    """How many times each Message-ID reached the fake SendCloud."""
    return Counter(parsed(m.data)["Message-ID"].strip("<>").split("@")[0] for m in list(sendcloud.messages))


def show(node: RelayProcess, queue_id: str) -> dict:
    result = node.cli("queue", "show", queue_id, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_mail_into_both_nodes_is_delivered_once_with_queue_ids_unique_across_nodes(make_node, sendcloud):
    a, b = make_node("a"), make_node("b")
    ids = inject_into_both(a, b, 15)
    assert len(set(ids.values())) == 30
    sendcloud.wait_for(30, timeout=60)
    assert arrived(sendcloud) == Counter({tag: 1 for tag in ids})  # nothing lost, nothing twice
    for node in (a, b):
        assert wait_until(lambda n=node: "0 message(s)" in n.cli("queue", "list").stdout, 15)


def test_queue_commands_on_either_node_see_the_whole_queue(make_node, sendcloud):
    a, b = make_node("a"), make_node("b")
    sendcloud.stop()
    ids = inject_into_both(a, b, 3)
    for node in (a, b):
        assert wait_until(lambda n=node: n.cli("queue", "list").stdout.count("deferred") == 6, 15), node.cli("queue", "list").stdout
        listing = node.cli("queue", "list").stdout
        assert all(queue_id in listing for queue_id in ids.values()), listing
    assert show(b, ids["a0"])["recipients"][0]["address"] == "a0@example.net"  # accepted by a, read on b
    assert b.cli("queue", "delete", ids["a1"]).returncode == 0
    assert ids["a1"] not in a.cli("queue", "list").stdout
    sendcloud.restart()
    assert "deferred recipient(s)" in a.cli("queue", "flush").stdout
    sendcloud.wait_for(5, timeout=30)
    assert wait_until(lambda: "0 message(s)" in b.cli("queue", "list").stdout, 15)
    assert sorted(arrived(sendcloud)) == sorted(tag for tag in ids if tag != "a1")


def test_kill_9_of_a_node_mid_delivery_loses_nothing_and_duplicates_stay_within_its_in_flight(make_node, sendcloud):
    """The upstream answers each DATA 0.4 s after taking the message, so each node nearly always
    has transactions whose message has arrived but whose outcome it does not know yet; node a
    dies with ``kill -9`` at such a moment. Every message either node accepted arrives (b takes
    a's over once a's leases expire), and only what a had in flight arrives twice: at least the
    one it was waiting for, at most ``connections_per_account`` × accounts (docs/scale-out.md)."""
    a, b = make_node("a"), make_node("b")
    sendcloud.data_delay = 0.4
    ids = inject_into_both(a, b, 30)
    assert wait_until(lambda: len(sendcloud.messages) >= 8 and sendcloud.unanswered["a.relay.test"] >= 1, 30, 0.01)
    a.kill()
    in_flight_bound = a.config["upstream"]["connections_per_account"] * len(a.config["accounts"])
    killed_at = len(sendcloud.messages)
    assert wait_until(lambda: set(arrived(sendcloud)) >= set(ids), 60 + LEASE), sorted(set(ids) - set(arrived(sendcloud)))
    assert wait_until(lambda: "0 message(s)" in b.cli("queue", "list").stdout, 15), b.cli("queue", "list").stdout
    counts = arrived(sendcloud)
    duplicates = sum(counts.values()) - len(counts)
    print(f"\nkill -9 mid-delivery: accepted {len(ids)}, arrived before the kill {killed_at}, "
          f"delivered {len(counts)}, duplicates {duplicates} (bound {in_flight_bound})")
    assert set(counts) == set(ids)
    assert 1 <= duplicates <= in_flight_bound, counts.most_common(in_flight_bound + 1)


def test_a_rate_budget_spent_on_one_node_holds_on_the_other(make_node, sendcloud, client_tls):
    def limit(config: dict) -> None:
        config["users"][USER].update(rate_limit="3/hour")

    a, b = make_node("a", limit), make_node("b", limit)
    with smtplib.SMTP("127.0.0.1", a.port("submission"), timeout=20) as client:
        client.starttls(context=client_tls)
        client.login(USER, PASSWORD)
        client.mail("app@acme.com")
        assert [client.rcpt(f"r{n}@example.net")[0] for n in range(3)] == [250, 250, 250]
        assert client.data(mail("budget"))[0] == 250
    # The budget is shared through the database, not at once: a saves its counts every second
    # (relay.policy.rates.PersistentRates) and b reads the totals back at its own next save, so
    # b may say 250 for up to about two seconds. A RCPT without DATA charges nothing: ask again.
    replies = []

    def b_answered_other_than_250() -> bool:
        replies.append(rcpt_reply(b, client_tls, "elsewhere@example.net"))
        return replies[-1][0] != 250

    assert wait_until(b_answered_other_than_250, 10, 0.1), replies[-1]
    code, text = replies[-1]
    assert (code, text[:5]) == (451, b"4.7.1"), text
    sendcloud.wait_for(1)


def test_a_suppression_added_on_one_node_refuses_at_the_other(make_node, sendcloud, client_tls):
    a, b = make_node("a"), make_node("b")
    added = a.cli("suppression", "add", "gone@example.net", "-c", str(a.config_path))
    assert added.returncode == 0, added.stderr
    assert wait_until(lambda: rcpt_reply(b, client_tls, "gone@example.net")[0] == 550, 15)
    assert rcpt_reply(b, client_tls, "here@example.net")[0] == 250


def test_an_event_received_by_one_node_updates_a_message_the_other_delivered(make_node, sendcloud):
    b = make_node("b")
    [queue_id] = inject(b, ["evented"])
    [received] = sendcloud.wait_for(1)
    assert wait_until(lambda: show(b, queue_id)["recipients"][0]["state"] == "delivered", 15)
    a = make_node("a")  # started after b delivered it: a never held this message
    email_id = show(a, queue_id)["recipients"][0]["email_id"]
    assert email_id == received.email_ids[0]
    events_port = int(a.config["events"]["listen"].rpartition(":")[2])
    event = {"event": "open", "apiUser": "acme_trigger", "emailId": email_id, "recipient": "evented@example.net"}
    assert post(events_port, signed(event)) == 200
    assert wait_until(lambda: [e["event"] for e in show(b, queue_id)["recipients"][0]["events"]] == ["open"], 15)

