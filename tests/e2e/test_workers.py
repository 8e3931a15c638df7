"""`server.processes`: acceptor processes in front of one spool and one scheduler keep every guarantee."""

from __future__ import annotations

import os
import signal
import smtplib
from concurrent.futures import ThreadPoolExecutor

from tests.e2e.conftest import TRUSTED_SOURCE
from tests.e2e.test_crash import send_batch
from tests.support.mail import parsed
from tests.support.relay import wait_until


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listing:
            return [int(child) for child in listing.read().split()]
    except FileNotFoundError:
        return []


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_two_acceptors_deliver_every_message_exactly_once_and_stop_on_sigterm(make_relay, sendcloud):
    relay = make_relay(processes=2)
    acceptors = children(relay.process.pid)
    assert len(acceptors) == 2, relay.log()
    port = relay.port("smtp")
    with ThreadPoolExecutor(4) as pool:  # several connections, so both acceptors take some
        ids = [i for chunk in pool.map(lambda n: send_batch(port, range(n, n + 10)), range(0, 40, 10)) for i in chunk]
    assert len(set(ids)) == 40
    received = sendcloud.wait_for(40, timeout=30)
    subjects = [parsed(m.data)["Subject"] for m in received]
    assert sorted(subjects) == sorted(f"crash test {n}" for n in range(40))  # no duplicates
    assert wait_until(lambda: "0 message(s)" in relay.cli("queue", "list").stdout, 15)
    assert relay.stop() == 0
    assert not any(alive(pid) for pid in acceptors)
    assert "acceptor 0 started" in relay.log() and "acceptor 1 started" in relay.log()


def test_a_killed_acceptor_is_replaced(make_relay, sendcloud):
    relay = make_relay(processes=2)
    victim = children(relay.process.pid)[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: len(children(relay.process.pid)) == 2 and victim not in children(relay.process.pid), 15), relay.log()
    for number in range(6):  # new connections land on either acceptor: all are served
        with smtplib.SMTP("127.0.0.1", relay.port("smtp"), timeout=10, source_address=(TRUSTED_SOURCE, 0)) as client:
            client.sendmail("app@acme.com", [f"after{number}@example.net"], b"Subject: after\r\n\r\nstill here\r\n")
    sendcloud.wait_for(6, timeout=30)
    assert "starting it again" in relay.log()


def test_kill_9_of_the_main_process_stops_the_acceptors_and_loses_nothing(make_relay, sendcloud):
    relay = make_relay(processes=2)
    sendcloud.stop()
    acceptors = children(relay.process.pid)
    ids = send_batch(relay.port("smtp"), range(20))
    relay.kill()
    # Without the spool they must not accept (nor hold the port): they exit on their own.
    assert wait_until(lambda: not any(alive(pid) for pid in acceptors), 15)
    sendcloud.restart()
    relay.start()
    received = sendcloud.wait_for(20, timeout=30)
    assert len(set(ids)) == 20 and len(received) == 20


def test_a_reload_reaches_every_acceptor(make_relay, sendcloud):
    relay = make_relay(processes=2, max_recipients=5)
    relay.config["server"]["max_recipients"] = 1
    relay.write_config(relay.config)
    relay.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "config reloaded" in relay.log(), 10), relay.log()
    for _ in range(6):  # new connections land on either acceptor: each has the new limit
        with smtplib.SMTP("127.0.0.1", relay.port("smtp"), timeout=10, source_address=(TRUSTED_SOURCE, 0)) as client:
            client.ehlo()
            client.mail("app@acme.com")
            assert client.rcpt("one@example.net")[0] == 250
            assert client.rcpt("two@example.net")[0] == 452
