"""SIGKILL loses no accepted message: every `250` is on disk before it is sent."""

from __future__ import annotations

import smtplib
from concurrent.futures import ThreadPoolExecutor

from tests.e2e.conftest import TRUSTED_SOURCE
from tests.support.mail import parsed
from tests.support.relay import wait_until


def send_batch(port: int, numbers: range) -> list[str]:
    """One connection, many messages (a smarthost's habit); returns the queue IDs."""
    ids = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(TRUSTED_SOURCE, 0)) as client:
        client.ehlo()
        for number in numbers:
            client.mail("app@acme.com")
            client.rcpt(f"user{number}@example.net")
            code, reply = client.data(f"Subject: crash test {number}\r\n\r\nmessage {number}\r\n".encode())
            assert code == 250, reply
            ids.append(reply.decode().rsplit(" ", 1)[1])
    return ids


def test_kill_9_with_100_queued_then_restart_delivers_all(make_relay, sendcloud):
    relay = make_relay()
    sendcloud.stop()
    port = relay.port("smtp")
    with ThreadPoolExecutor(4) as pool:
        ids = [i for chunk in pool.map(lambda n: send_batch(port, range(n, n + 25)), range(0, 100, 25)) for i in chunk]
    assert len(set(ids)) == 100

    relay.kill()
    sendcloud.restart()
    relay.start()  # queued and deferred mail left by the dead process is picked up again
    received = sendcloud.wait_for(100, timeout=60)
    subjects = [parsed(m.data)["Subject"] for m in received]
    assert sorted(set(subjects)) == sorted(f"crash test {n}" for n in range(100))
    duplicates = len(subjects) - len(set(subjects))
    assert duplicates == 0  # upstream was down before the kill: nothing was in flight
    assert wait_until(lambda: "0 message(s)" in relay.cli("queue", "list").stdout, 15)
