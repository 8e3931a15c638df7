"""`server.processes`: acceptor processes in front of one spool and one scheduler keep every guarantee.

Acceptors share one accept queue, so which one takes a connection is the kernel's choice; to
make it the test's, the other acceptor is stopped (SIGSTOP) meanwhile (:func:`paused`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import smtplib
from concurrent.futures import ThreadPoolExecutor

from tests.e2e.conftest import PASSWORD, TRUSTED_SOURCE
from tests.e2e.test_crash import send_batch
from tests.e2e.test_limits import closed_by_server, connect, login, say
from tests.e2e.test_operations import scrape, value
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


@contextlib.contextmanager
def paused(pid: int):
    """While this acceptor is stopped, the others take every new connection."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


# Not trusted, and not 127.0.0.1, whose start-up port probes may still count for a moment.
CLIENT = "127.0.0.3"


def greeting(relay) -> str:
    """Open a session from CLIENT and return its first reply line."""
    talk = connect(relay, source=CLIENT)
    reply = talk.read_reply()[-1]
    if not reply.startswith("220"):
        assert closed_by_server(talk)
    talk.sock.close()
    return reply


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
    # /metrics in the main process counts what the acceptors accepted, and what it delivered.
    samples = scrape(relay)
    mailhub = {"user": "mailhub", "account": "acme_trigger", "channel": "trigger"}
    assert value(samples, "sendcloud_relay_messages_accepted_total", **mailhub) == 40
    assert value(samples, "sendcloud_relay_acceptance_seconds_count", listener="smtp") == 40
    assert value(samples, "sendcloud_relay_recipients_total", result="delivered", **mailhub) == 40
    assert value(samples, "sendcloud_relay_smtp_sessions", listener="smtp") == 0
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


def test_connection_limits_hold_across_acceptors_and_a_killed_one_frees_its_slots(make_relay, sendcloud):
    relay = make_relay(processes=2, max_connections_per_address=3)
    first, second = children(relay.process.pid)
    with paused(second):
        on_first = [connect(relay, source=CLIENT) for _ in range(2)]
        assert [talk.read_reply()[-1][:3] for talk in on_first] == ["220", "220"]
    with paused(first):
        on_second = connect(relay, source=CLIENT)
        assert on_second.read_reply()[-1].startswith("220")
        for _ in range(2):  # the limit is the relay's, not each acceptor's
            assert greeting(relay).startswith("421 4.7.1 Too many connections from your address")
    assert say(on_first[0], "QUIT").startswith("221")
    assert closed_by_server(on_first[0])  # its acceptor has told the main process (before pausing it)
    with paused(first):
        assert wait_until(lambda: greeting(relay).startswith("220"), 5)  # freed on one, taken on the other
        assert wait_until(lambda: value(scrape(relay), "sendcloud_relay_smtp_sessions", listener="smtp") == 2, 5)
        assert value(scrape(relay), "sendcloud_relay_rejected_total", listener="smtp", user="", reason="smtp_421_4.7.1") == 2

    os.kill(first, signal.SIGKILL)  # with one session open: the main process frees its slot
    assert wait_until(lambda: len(children(relay.process.pid)) == 2 and first not in children(relay.process.pid), 15)
    assert "acceptor 0: released its 1 open connection(s)" in relay.log() or "acceptor 1: released its 1" in relay.log()
    assert wait_until(lambda: value(scrape(relay), "sendcloud_relay_smtp_sessions", listener="smtp") == 1, 5)  # the dead one's are gone
    more = [connect(relay, source=CLIENT) for _ in range(3)]
    assert [talk.read_reply()[-1][:3] for talk in more] == ["220", "220", "421"]  # with on_second: 3


def test_auth_failures_on_different_acceptors_add_up_to_one_lockout(make_relay, sendcloud, client_tls):
    relay = make_relay(processes=2, auth_lockout_failures=3, auth_lockout_duration="60s", auth_failure_delay="10ms")
    first, second = children(relay.process.pid)
    with paused(second):
        assert [login(relay, client_tls, "wrong")[0] for _ in range(2)] == [535, 535]
    with paused(first):
        assert login(relay, client_tls, "wrong")[0] == 535  # the third failure, counted with the first two
        code, text = login(relay, client_tls, PASSWORD)
        assert code == 454 and text.startswith(b"4.7.0 Too many failed logins"), text
    with paused(second):
        assert login(relay, client_tls, PASSWORD)[0] == 454  # and the other acceptor knows it
    samples = scrape(relay)
    assert value(samples, "sendcloud_relay_auth_attempts_total", listener="submission", result="failure") == 3
    assert value(samples, "sendcloud_relay_auth_attempts_total", listener="submission", result="locked_out") == 2
