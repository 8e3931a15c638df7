"""The SMTP front end against what a review, scanners and real clients found (issue 11).

Each test sends what a client sent and checks what matters downstream: what reached the
upstream (the fake SendCloud), what the relay logged, and whether the connection stayed open.
The replies alone are pinned by ``tests/dialogs``.
"""

from __future__ import annotations

import base64
import email
import email.policy
import smtplib
import time

import pytest

from relay.rewrite.long_lines import has_long_line
from tests.e2e.conftest import KEYS, PASSWORD, TRUSTED_SOURCE, USER, relay_config
from tests.e2e.test_limits import closed_by_server, connect, say
from tests.support import require_peer
from tests.support.fake_sendcloud import FakeSendCloud
from tests.support.postfix import PostfixSmarthost, postfix_available
from tests.support.relay import RelayProcess, wait_until


@pytest.fixture(scope="module")
def hardened(tmp_path_factory, ca, ca_file):
    """One relay with the shipped recipient and error limits (their defaults), and room for a 200 KB line."""
    workdir = tmp_path_factory.mktemp("hardening")
    with FakeSendCloud(ca, KEYS) as fake:
        config = relay_config(workdir, ca, ca_file, fake.port, max_message_size="1MiB")
        del config["server"]["max_recipients"]  # the standard test config's 5: the default (1000) here
        with RelayProcess(workdir, config, env={"SC_TRIGGER_KEY": KEYS["acme_trigger"]}) as relay:
            yield relay, fake


def _send_marker(relay, fake, name: str) -> list:
    """One clean message after the one under test: once it arrived, anything before it would have too."""
    before = len(fake.messages)
    with smtplib.SMTP("127.0.0.1", relay.port("smtp"), source_address=(TRUSTED_SOURCE, 0), timeout=10) as client:
        client.sendmail("a@acme.com", [f"{name}-marker@example.net"], f"Subject: {name} marker\r\n\r\nok\r\n".encode())
    fake.wait_for(before + 1)
    time.sleep(0.5)  # two polls: a message spooled before the marker, or a retry, would be here by now
    return [m for m in fake.messages if any(r.startswith(name) for r in m.rcpt_tos)]


def _wait_for_log(relay, text: str) -> str:
    assert wait_until(lambda: text in relay.log(), timeout=5), relay.log()[-3000:]
    return relay.log()


def test_a_bare_cr_in_ehlo_never_becomes_a_header_upstream(hardened):
    relay, fake = hardened
    talk = connect(relay, source=TRUSTED_SOURCE)
    talk.read_reply()
    assert say(talk, 'EHLO x\rX-SMTPAPI: {"to": ["victim@example.net"]}').startswith("501 5.5.2")
    # The client goes on as if EHLO had worked: without a HELO name, no transaction starts.
    assert say(talk, "MAIL FROM:<a@acme.com>").startswith("503")
    say(talk, "RCPT TO:<bare-cr@example.net>")
    say(talk, "DATA")
    talk.send(b"Subject: injected\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    talk.sock.close()
    arrived = _send_marker(relay, fake, "bare-cr")
    assert [m.rcpt_tos for m in arrived] == [["bare-cr-marker@example.net"]]
    assert not any(b"victim@example.net" in m.data for m in fake.messages)


def test_a_nul_in_mail_from_is_refused_not_queued_and_retried(hardened):
    relay, fake = hardened
    talk = connect(relay, source=TRUSTED_SOURCE)
    talk.read_reply()
    say(talk, "EHLO mailhub.test")
    assert say(talk, "MAIL FROM:<a\x00b@acme.com>").startswith("553 5.1.7")
    assert say(talk, "RCPT TO:<nul-sender@example.net>").startswith("503")
    assert say(talk, "QUIT").startswith("221")
    arrived = _send_marker(relay, fake, "nul-sender")
    assert [m.rcpt_tos for m in arrived] == [["nul-sender-marker@example.net"]]
    log = relay.log()
    assert "Traceback" not in log and "\x00" not in log
    assert relay.cli("queue", "list").stdout.count("nul-sender") == 0


def test_an_auth_username_with_crlf_cannot_forge_a_log_line(hardened, client_tls):
    relay, _ = hardened
    forged = "billing\r\n2026-12-01 10:00:00,000 INFO relay.delivery: FORGED9QUEUEID: to=<x@y>, status=sent"
    talk = connect(relay, listener="smtps")
    talk.sock = client_tls.wrap_socket(talk.sock, server_hostname="localhost")
    talk.read_reply()
    say(talk, "EHLO client.test")
    blob = base64.b64encode(f"\0{forged}\0{PASSWORD}".encode()).decode()
    assert say(talk, f"AUTH PLAIN {blob}").startswith("501 5.5.2")
    say(talk, "QUIT")
    log = _wait_for_log(relay, "AUTH refused: 501 5.5.2")
    assert "FORGED9QUEUEID" not in log  # not even escaped: the name is never logged


def test_a_password_sent_after_538_appears_nowhere_in_the_log(hardened):
    relay, _ = hardened
    username, password = base64.b64encode(USER.encode()).decode(), base64.b64encode(PASSWORD.encode()).decode()
    talk = connect(relay, listener="smtp")
    talk.read_reply()
    say(talk, "EHLO client.test")
    assert say(talk, "AUTH LOGIN").startswith("538")
    assert say(talk, username).startswith("502 5.5.2")  # the client goes on with its exchange
    assert say(talk, password).startswith("502 5.5.2")
    say(talk, "XCLIENT ADDR=192.0.2.1")  # a known verb: logged, as the proof the log was written
    say(talk, "QUIT")
    log = _wait_for_log(relay, "command=XCLIENT")
    for secret in (username, password, PASSWORD):
        assert secret.lower() not in log.lower()


def test_too_many_errors_closes_the_connection_and_runs_nothing_pipelined_after(hardened):
    relay, fake = hardened
    talk = connect(relay, source=TRUSTED_SOURCE)
    talk.read_reply()
    say(talk, "EHLO mailhub.test")
    assert say(talk, "MAIL FROM:<a@acme.com>").startswith("250")
    for _ in range(20):
        assert say(talk, "RCPT TO:<nobody>").startswith("501")
    # The 21st error, with a transaction pipelined behind it: 421, and the rest is never run.
    talk.send(b"RCPT TO:<nobody>\r\nRCPT TO:<errors@example.net>\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    assert talk.read_reply() == ["421 4.7.0 Too many errors"]
    assert closed_by_server(talk)
    assert _send_marker(relay, fake, "errors")[0].rcpt_tos == ["errors-marker@example.net"]
    assert len([m for m in fake.messages if "errors@example.net" in m.rcpt_tos]) == 0


def test_a_failed_starttls_handshake_logs_one_line_and_no_traceback(hardened):
    relay, _ = hardened
    talk = connect(relay, listener="smtp")
    talk.read_reply()
    say(talk, "EHLO scanner.test")
    assert say(talk, "STARTTLS").startswith("220")
    talk.send(b"this is not a TLS ClientHello\r\n" * 4)
    assert closed_by_server(talk)
    log = _wait_for_log(relay, "STARTTLS handshake failed")
    assert log.count("STARTTLS handshake failed") == 1
    assert "Traceback" not in log


def test_a_nul_in_the_body_never_reaches_upstream(hardened):
    relay, fake = hardened
    talk = connect(relay, source=TRUSTED_SOURCE)
    talk.read_reply()
    for command in ("EHLO mailhub.test", "MAIL FROM:<a@acme.com>", "RCPT TO:<nulbody@example.net>", "DATA"):
        say(talk, command)
    talk.send(b"Subject: nul\r\n\r\nfirst\r\n\x00.\r\nMAIL FROM:<a@acme.com>\r\nRCPT TO:<nulbody-smuggled@example.net>\r\n.\r\n")
    assert talk.read_reply()[-1].startswith("554 5.6.0")
    assert say(talk, "NOOP").startswith("250")
    arrived = _send_marker(relay, fake, "nulbody")
    assert [m.rcpt_tos for m in arrived] == [["nulbody-marker@example.net"]]
    assert not any(b"\x00" in m.data for m in fake.messages)


def test_150_recipients_arrive_upstream_as_100_and_50_each_once(hardened):
    relay, fake = hardened
    recipients = [f"many{n:03d}@example.net" for n in range(150)]
    with smtplib.SMTP("127.0.0.1", relay.port("smtp"), source_address=(TRUSTED_SOURCE, 0), timeout=10) as client:
        refused = client.sendmail("a@acme.com", recipients, b"Subject: many\r\n\r\nhello\r\n")
    assert refused == {}
    assert wait_until(lambda: sum(len(m.rcpt_tos) for m in fake.messages if m.rcpt_tos[0].startswith("many")) >= 150, 20)
    time.sleep(0.5)  # a duplicate transaction would be here by now
    transactions = [m.rcpt_tos for m in fake.messages if m.rcpt_tos[0].startswith("many")]
    assert sorted(map(len, transactions)) == [50, 100]
    assert sorted(r for t in transactions for r in t) == recipients


def test_a_one_line_html_and_a_long_to_arrive_within_998_and_decode_to_the_original(hardened):
    relay, fake = hardened
    html = ("<html><body>" + "".join(f"<p>paragraph {n} caf\u00e9</p>" for n in range(9000)) + "</body></html>").encode()
    assert len(html) > 200_000 and b"\n" not in html
    to = ", ".join(f"long-to-{n:03d}@example.net" for n in range(90))
    assert len(to) > 2000
    message = (
        f"From: a@acme.com\r\nTo: {to}\r\nSubject: legacy\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode() + html + b"\r\n"
    with smtplib.SMTP("127.0.0.1", relay.port("smtp"), source_address=(TRUSTED_SOURCE, 0), timeout=10) as client:
        client.sendmail("a@acme.com", ["long-lines@example.net"], message)
    assert wait_until(lambda: any(m.rcpt_tos == ["long-lines@example.net"] for m in fake.messages), 20)
    (received,) = [m for m in fake.messages if m.rcpt_tos == ["long-lines@example.net"]]
    assert not has_long_line(bytes(received.data))
    parsed = email.message_from_bytes(bytes(received.data), policy=email.policy.compat32)
    assert "".join(parsed["To"].split()) == "".join(to.split())  # folded at whitespace only
    assert parsed.get_payload(decode=True).rstrip(b"\r\n") == html


class _VerbosePostfix(PostfixSmarthost):
    """A smarthost that logs its SMTP client's view of the relay (Postfix's debug_peer_list)."""

    def _main_cf(self) -> str:
        return super()._main_cf() + "debug_peer_list = 127.0.0.1\ndebug_peer_level = 2\n"


def test_postfix_as_smarthost_pipelines_and_every_recipient_arrives_once(hardened, ca_file, tmp_path):
    """Postfix pipelines MAIL, every RCPT and DATA once PIPELINING is offered; the replies come in order."""
    require_peer(postfix_available(), "Postfix (Debian's postfix package, run as root)")
    relay, fake = hardened
    recipients = [f"pipelined{n}@example.net" for n in range(5)]
    with _VerbosePostfix(tmp_path / "postfix", relay.port("submission"), USER, PASSWORD, ca_file) as postfix:
        with smtplib.SMTP("127.0.0.1", postfix.inject_port, timeout=30) as client:
            client.sendmail("app@acme.com", recipients, b"From: app@acme.com\r\nSubject: pipelined\r\n\r\nhello\r\n")

        def delivered() -> list[str]:
            return [r for m in fake.messages for r in m.rcpt_tos if r.startswith("pipelined")]

        assert wait_until(lambda: len(delivered()) >= 5, 60), f"{postfix.log()}\n--- relay ---\n{relay.log()[-3000:]}"
        log = postfix.log()
    time.sleep(0.5)
    assert sorted(delivered()) == recipients
    assert "Using ESMTP PIPELINING" in log, log[-5000:]
    assert "status=sent" in log
