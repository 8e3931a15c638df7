"""Abuse limits end to end: rates, connection counts, AUTH lockout, timeouts, bounded memory,
and SendCloud telling an account to slow down. Each test starts its own relay with small limits."""

from __future__ import annotations

import smtplib
import socket
import sqlite3
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import PASSWORD, TRUSTED_SOURCE, USER
from tests.e2e.test_dialogs import Conversation
from tests.support.relay import wait_until


def connect(relay, listener="smtp", source="127.0.0.1") -> Conversation:
    sock = socket.create_connection(("127.0.0.1", relay.port(listener)), timeout=10, source_address=(source, 0))
    return Conversation(sock, tls=None)


def say(talk: Conversation, line: str) -> str:
    talk.send(line.encode() + b"\r\n")
    return talk.read_reply()[-1]


def closed_by_server(talk: Conversation, timeout: float = 5.0) -> bool:
    talk.sock.settimeout(timeout)
    try:
        return talk.sock.recv(1) == b""
    except ConnectionResetError:
        return True


def saved_budget(workdir: Path, key: str) -> int:
    with sqlite3.connect(workdir / "spool.db") as db:
        return db.execute("SELECT COALESCE(SUM(count), 0) FROM rate_windows WHERE key=?", (key,)).fetchone()[0]


# -- rate limits ------------------------------------------------------------------------------------


def test_user_rate_limit_is_451_and_survives_kill_9(make_relay, sendcloud, client_tls, tmp_path):
    relay = make_relay(config_patch=lambda c: c["users"][USER].update(rate_limit="3/hour"))

    def session() -> list[int]:
        with smtplib.SMTP("127.0.0.1", relay.port("submission"), timeout=20) as client:
            client.starttls(context=client_tls)
            client.login(USER, PASSWORD)
            client.mail("app@acme.com")
            codes = [client.rcpt(f"r{n}@example.net")[0] for n in range(2)]
            if 250 in codes:
                codes.append(client.data(b"Subject: budget\r\n\r\nx\r\n")[0])
            return codes

    assert session() == [250, 250, 250]
    with smtplib.SMTP("127.0.0.1", relay.port("submission"), timeout=20) as client:
        client.starttls(context=client_tls)
        client.login(USER, PASSWORD)
        client.mail("app@acme.com")
        assert client.rcpt("third@example.net")[0] == 250
        code, text = client.rcpt("fourth@example.net")
        assert (code, text[:5]) == (451, b"4.7.1"), text
        assert b"3/hour" in text
        assert client.data(b"Subject: budget\r\n\r\nthird\r\n")[0] == 250

    assert wait_until(lambda: saved_budget(tmp_path, f"user:{USER}") == 3, 10)  # saved within a second
    relay.kill()
    relay.start()
    with smtplib.SMTP("127.0.0.1", relay.port("submission"), timeout=20) as client:
        client.starttls(context=client_tls)
        client.login(USER, PASSWORD)
        client.mail("app@acme.com")
        assert client.rcpt("after-restart@example.net")[0] == 451
    assert len(sendcloud.wait_for(2)) == 2


def test_client_rate_limit_spares_trusted_networks(make_relay, sendcloud, client_tls):
    relay = make_relay(client_rate_limit="2/minute")
    with smtplib.SMTP("127.0.0.1", relay.port("submission"), timeout=20) as client:
        client.starttls(context=client_tls)
        client.login(USER, PASSWORD)
        client.mail("app@acme.com")
        assert [client.rcpt(f"c{n}@example.net")[0] for n in range(3)] == [250, 250, 451]
    with smtplib.SMTP("127.0.0.1", relay.port("smtp"), timeout=20, source_address=(TRUSTED_SOURCE, 0)) as client:
        assert client.sendmail("hub@acme.com", [f"t{n}@example.net" for n in range(5)], b"Subject: hub\r\n\r\nx\r\n") == {}


# -- connections ------------------------------------------------------------------------------------


def test_connections_per_address_and_in_total(make_relay, sendcloud):
    relay = make_relay(max_connections_per_address=2, max_connections=4)
    time.sleep(0.3)  # let the relay see the start-up port probes close
    first, second = connect(relay), connect(relay)
    for talk in (first, second):
        assert talk.read_reply()[-1].startswith("220")
    third = connect(relay)
    assert third.read_reply()[-1].startswith("421 4.7.1 Too many connections from your address")
    assert closed_by_server(third)

    # The trusted network is exempt from the per-address limit, not from the total.
    trusted = [connect(relay, source=TRUSTED_SOURCE) for _ in range(2)]
    for talk in trusted:
        assert talk.read_reply()[-1].startswith("220")
    over = connect(relay, source=TRUSTED_SOURCE)
    assert over.read_reply()[-1].startswith("421 4.3.2 Too many connections")

    assert say(first, "QUIT").startswith("221")
    assert wait_until(lambda: connect(relay).read_reply()[-1].startswith("220"), 5)  # a slot came free
    assert "NOQUEUE: reject=CONNECT, client=[127.0.0.1], listener=smtp (421 4.7.1" in relay.log()


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_clients_that_hang_up_without_quit_free_their_slots(make_relay, sendcloud, event_loop):
    """Regression: under uvloop a client closing without QUIT kept its connection (and its
    slot in the limits) for ever, because aiosmtpd asks to keep the transport half-open."""
    relay = make_relay(max_connections_per_address=2, event_loop=event_loop)
    for _ in range(5):
        socket.create_connection(("127.0.0.1", relay.port("smtp"))).close()

    def two_sessions_greeted() -> bool:
        talks = [connect(relay), connect(relay)]
        greeted = all(talk.read_reply()[-1].startswith("220") for talk in talks)
        for talk in talks:
            talk.sock.close()
        return greeted

    assert wait_until(two_sessions_greeted, 5)
    assert f"event loop: {event_loop}" in relay.log()


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_a_failed_starttls_handshake_frees_its_slot_once(make_relay, sendcloud, event_loop):
    """Both the TLS layer and aiosmtpd report the loss of a connection whose handshake failed:
    counted twice, it would free a slot it never held and let the total limit be exceeded."""
    relay = make_relay(max_connections=2, event_loop=event_loop)
    time.sleep(0.3)  # let the relay see the start-up port probes close
    for _ in range(3):
        talk = connect(relay, "submission")
        assert talk.read_reply()[-1].startswith("220")
        assert say(talk, "EHLO client.test").startswith("250")
        assert say(talk, "STARTTLS").startswith("220")
        talk.send(b"this is not a TLS ClientHello\r\n" * 4)
        assert closed_by_server(talk)
    talks = [connect(relay) for _ in range(2)]
    assert all(talk.read_reply()[-1].startswith("220") for talk in talks)
    assert connect(relay).read_reply()[-1].startswith("421 4.3.2 Too many connections")


# -- AUTH lockout ----------------------------------------------------------------------------------


def login(relay, client_tls, password: str, source: str = "127.0.0.1") -> tuple[int, bytes]:
    """One AUTH PLAIN as USER on the submission port (smtplib's login() would try each mechanism in turn)."""
    with smtplib.SMTP("127.0.0.1", relay.port("submission"), timeout=20, source_address=(source, 0)) as client:
        client.starttls(context=client_tls)
        client.ehlo()
        client.user, client.password = USER, password
        try:
            return client.auth("PLAIN", client.auth_plain)
        except smtplib.SMTPAuthenticationError as error:
            return error.smtp_code, error.smtp_error


def test_failed_logins_lock_out_the_address_and_the_username_for_a_while(make_relay, sendcloud, client_tls):
    relay = make_relay(auth_lockout_failures=3, auth_lockout_duration="3s", auth_failure_delay="10ms")
    assert [login(relay, client_tls, "wrong")[0] for _ in range(3)] == [535, 535, 535]
    code, text = login(relay, client_tls, PASSWORD)  # the right password no longer helps
    assert code == 454 and text.startswith(b"4.7.0 Too many failed logins"), text
    assert login(relay, client_tls, PASSWORD, source=TRUSTED_SOURCE)[0] == 454  # the username is locked from anywhere new
    assert "locked out of AUTH" in relay.log()
    time.sleep(3.2)
    assert login(relay, client_tls, PASSWORD)[0] == 235


# -- timeouts and memory ------------------------------------------------------------------------------


def test_idle_client_is_told_421_and_disconnected(make_relay, sendcloud):
    relay = make_relay(idle_timeout="1s")
    talk = connect(relay)
    talk.read_reply()
    started = time.monotonic()
    assert talk.read_reply()[-1].startswith("421 4.4.2 relay.test Error: timeout exceeded")
    assert closed_by_server(talk)
    assert time.monotonic() - started < 5


def test_slowloris_command_line_is_cut_by_the_idle_timeout(make_relay, sendcloud):
    """Bytes of a command trickling in never reset the idle timer; only whole commands do."""
    relay = make_relay(idle_timeout="1s")
    talk = connect(relay)
    talk.read_reply()
    talk.sock.settimeout(5)
    started = time.monotonic()
    try:
        for char in b"EHLO slow.example":
            talk.sock.send(bytes([char]))
            time.sleep(0.2)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert talk.read_reply()[-1].startswith("421 4.4.2")
    assert time.monotonic() - started < 4


def test_slow_data_upload_is_bounded_by_data_timeout(make_relay, sendcloud):
    relay = make_relay(idle_timeout="30s", data_timeout="1500ms")
    talk = connect(relay, source=TRUSTED_SOURCE)
    talk.read_reply()
    for command in ("EHLO x", "MAIL FROM:<a@acme.com>", "RCPT TO:<b@example.net>"):
        assert say(talk, command).startswith("250")
    assert say(talk, "DATA").startswith("354")
    started = time.monotonic()
    try:
        while time.monotonic() - started < 6:  # a line every 0.2 s: never idle, never done
            talk.send(b"still uploading\r\n")
            time.sleep(0.2)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert talk.read_reply()[-1].startswith("421 4.4.2")
    assert time.monotonic() - started < 4
    assert sendcloud.messages == []


def test_session_time_limit_ends_a_client_that_keeps_itself_busy(make_relay, sendcloud):
    relay = make_relay(idle_timeout="30s", session_timeout="2s")
    talk = connect(relay)
    talk.read_reply()
    replies = []
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        reply = say(talk, "NOOP")
        replies.append(reply)
        if not reply.startswith("250"):
            break
        time.sleep(0.2)
    assert replies[-1].startswith("421 4.4.2 relay.test Error: session time limit exceeded")


def peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


def test_oversize_data_is_drained_in_bounded_memory(make_relay, sendcloud):
    """32 MiB into a 64 KiB limit: 552 at the end, and the relay's peak RSS barely moves."""
    relay = make_relay()
    talk = connect(relay, source=TRUSTED_SOURCE)
    talk.read_reply()
    for command in ("EHLO x", "MAIL FROM:<a@acme.com>", "RCPT TO:<b@example.net>"):
        assert say(talk, command).startswith("250")
    before = peak_rss_kib(relay.process.pid)
    assert say(talk, "DATA").startswith("354")
    line = b"y" * 998 + b"\r\n"
    chunk = line * 1024
    for _ in range(32):
        talk.send(chunk)
    assert say(talk, ".").startswith("552 5.3.4")
    assert peak_rss_kib(relay.process.pid) - before < 8 * 1024
    assert say(talk, "NOOP").startswith("250")  # the session goes on


# -- SendCloud asking an account to slow down -----------------------------------------------------


def test_frequency_limited_pauses_the_account_without_spending_retries(make_relay, sendcloud, client_tls):
    relay = make_relay(config_patch=lambda c: c["upstream"].update(throttle_pause="2s", throttle_max_pause="2s"))
    sendcloud.data_reply = "536 Frequency limited"
    with smtplib.SMTP("127.0.0.1", relay.port("smtp"), timeout=20, source_address=(TRUSTED_SOURCE, 0)) as client:
        for n in range(6):
            client.sendmail("app@acme.com", [f"q{n}@example.net"], f"Subject: q{n}\r\n\r\nx\r\n".encode())
    assert wait_until(lambda: "asked to slow down" in relay.log(), 10)
    time.sleep(1.0)
    # Two workers may each have had a transaction in flight when the pause began; the other
    # messages waited instead of each being tried and deferred on its own retry schedule.
    assert sendcloud.data_attempts <= 2
    listing = relay.cli("queue", "list").stdout
    assert listing.count("acme_trigger") == 6
    sendcloud.data_reply = None
    received = sendcloud.wait_for(6, timeout=20)
    assert sorted(m.rcpt_tos[0] for m in received) == sorted(f"q{n}@example.net" for n in range(6))
    ids = [line.split()[0] for line in listing.splitlines() if "acme_trigger" in line]
    for queue_id in ids:  # the 536 replies were not counted: only the attempt that delivered
        assert wait_until(lambda q=queue_id: "delivered, 1 attempt(s)" in relay.cli("queue", "show", q).stdout, 10)
    assert "resuming" in relay.log()
