"""End to end: real clients → relay process → fake SendCloud, asserting on what arrives there."""

from __future__ import annotations

import base64
import email
import email.policy
import smtplib
import socket
import ssl
import threading

import pytest

from tests.e2e.conftest import PASSWORD, TRUSTED_SOURCE, USER
from tests.support.mail import added_fields
from tests.support.relay import wait_until


def message(subject: str = "hello", extra_headers: str = "", body: str = "Body line one.\r\nBody line two.\r\n") -> bytes:
    return (
        f"From: App <app@acme.com>\r\nTo: someone@example.net\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@acme.com>\r\n{extra_headers}\r\n{body}"
    ).encode()


def submit(relay, client_tls, rcpts, data, sender="app@acme.com", listener="submission") -> str:
    """STARTTLS + AUTH on the submission port, as an application does; returns the queue ID."""
    with smtplib.SMTP("127.0.0.1", relay.port(listener), timeout=20) as client:
        client.starttls(context=client_tls)
        client.login(USER, PASSWORD)
        client.mail(sender)
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250
        code, reply = client.data(data)
    assert code == 250, reply
    assert reply.startswith(b"2.0.0 Ok: queued as ")
    return reply.decode().rsplit(" ", 1)[1]


def submit_trusted(relay, rcpts, data, sender="app@acme.com") -> None:
    """No AUTH, from the trusted network: a legacy app or an internal mail hub."""
    with smtplib.SMTP("127.0.0.1", relay.port("smtp"), timeout=20, source_address=(TRUSTED_SOURCE, 0)) as client:
        assert client.sendmail(sender, rcpts, data) == {}


def read_reply(stream) -> bytes:
    """The last line of one (possibly multi-line) SMTP reply."""
    while True:
        line = stream.readline()
        if line[3:4] != b"-":
            return line


def test_starttls_auth_relays_to_the_trigger_account(relay, sendcloud, client_tls):
    data = message("transactional").replace(b"app@acme.com", b"app@info.acme.com")  # aligned From
    queue_id = submit(relay, client_tls, ["someone@example.net", "other@example.org"], data, sender="app@info.acme.com")
    [received] = sendcloud.wait_for(1)
    assert received.login == "acme_trigger"
    assert received.tls
    assert received.mail_from == "app@info.acme.com"
    assert received.rcpt_tos == ["someone@example.net", "other@example.org"]
    # The client's headers and body pass byte for byte; the relay only adds its own.
    assert added_fields(data, received.data) == [
        "Received", "Date", "SC-Custom-Relay-Id", "SC-Custom-Relay-User",
    ]
    # SendCloud's messageId and the per-recipient emailIds are kept for its webhook events.
    assert wait_until(lambda: "SendCloud emailId" in relay.cli("queue", "show", queue_id).stdout, 10)
    shown = relay.cli("queue", "show", queue_id).stdout
    for email_id in received.email_ids:
        assert email_id in shown
    assert f"{queue_id}: to=<someone@example.net>" in relay.log()


class ResumingContext(ssl.SSLContext):
    """Offers the saved TLS session on the next connection, as a smarthost's session cache does."""

    session: ssl.SSLSession | None = None

    def wrap_socket(self, sock, *args, **kwargs):
        return super().wrap_socket(sock, *args, session=self.session, **kwargs)


def test_a_resumed_tls_session_still_needs_auth(relay, sendcloud, ca_file):
    context = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(ca_file)
    resumed = []
    for n in range(2):
        with smtplib.SMTP("127.0.0.1", relay.port("submission"), timeout=20) as client:
            client.starttls(context=context)
            resumed.append(client.sock.session_reused)
            client.ehlo()
            code, text = client.mail("app@acme.com")
            assert (code, text[:5]) == (530, b"5.7.0"), text  # resuming TLS is not logging in
            client.login(USER, PASSWORD)
            assert client.sendmail("app@acme.com", ["someone@example.net"], message(f"resumed {n}")) == {}
            context.session = client.sock.session  # TLS 1.3: the ticket came after the handshake
    assert resumed == [False, True]
    assert [r.tls for r in sendcloud.wait_for(2)] == [True, True]


def test_plaintext_pipelined_after_starttls_is_discarded(relay, sendcloud, client_tls):
    """RFC 3207 section 5 (CVE-2011-0411): a command injected behind STARTTLS must not run inside TLS."""
    with socket.create_connection(("127.0.0.1", relay.port("submission")), timeout=10) as sock:
        stream = sock.makefile("rb")
        assert read_reply(stream).startswith(b"220")
        sock.sendall(b"EHLO client.test\r\n")
        assert read_reply(stream).startswith(b"250 ")
        sock.sendall(b"STARTTLS\r\nMAIL FROM:<evil@example.com>\r\n")
        assert read_reply(stream).startswith(b"220")
        with client_tls.wrap_socket(sock, server_hostname="localhost") as tls:
            tls_stream = tls.makefile("rb")
            tls.sendall(b"NOOP\r\n")
            assert tls_stream.readline() == b"250 2.0.0 OK\r\n"  # NOOP's reply, not the injected MAIL's
            tls.sendall(b"QUIT\r\n")
            assert tls_stream.readline().startswith(b"221")


def test_newsletter_header_routes_to_the_batch_account(relay, sendcloud, client_tls):
    submit(relay, client_tls, ["a@example.net"], message("news", "X-Mail-Type: Newsletter\r\n"))
    [received] = sendcloud.wait_for(1)
    assert received.login == "acme_batch"  # key came from api_key_file


def test_many_recipients_rule_routes_to_batch(relay, sendcloud, client_tls):
    submit(relay, client_tls, [f"r{i}@example.net" for i in range(4)], message("many"))
    [received] = sendcloud.wait_for(1)
    assert received.login == "acme_batch"


def test_implicit_tls_listener(relay, sendcloud, client_tls):
    with smtplib.SMTP_SSL("127.0.0.1", relay.port("smtps"), context=client_tls, timeout=20) as client:
        client.login(USER, PASSWORD)
        client.sendmail("app@acme.com", ["x@example.net"], message("implicit"))
    assert sendcloud.wait_for(1)[0].rcpt_tos == ["x@example.net"]


def test_trusted_network_relays_without_auth(relay, sendcloud):
    submit_trusted(relay, ["t@example.net"], message("trusted"), sender="cron@anywhere.example")
    [received] = sendcloud.wait_for(1)
    # From app@acme.com is outside the account's domain info.acme.com: `align` rewrites it.
    assert received.login == "acme_trigger" and received.mail_from == "noreply@info.acme.com"


def test_bare_lf_is_normalised_and_cannot_smuggle_a_second_message(relay, sendcloud):
    """A `\\n.\\n` inside DATA must not end the message upstream: exactly one message arrives."""
    smuggled = (
        b"Subject: smuggle\n\nfirst part\n.\nMAIL FROM:<evil@example.org>\nRCPT TO:<victim@example.net>\n"
        b"DATA\nSubject: second\n\nsmuggled\n.\n"
    )
    with socket.create_connection(("127.0.0.1", relay.port("smtp")), source_address=(TRUSTED_SOURCE, 0), timeout=10) as sock:
        stream = sock.makefile("rwb")
        assert read_reply(stream).startswith(b"220")
        for command, expected in ((b"EHLO x", b"250"), (b"MAIL FROM:<a@acme.com>", b"250"),
                                  (b"RCPT TO:<b@example.net>", b"250"), (b"DATA", b"354")):
            stream.write(command + b"\r\n")
            stream.flush()
            assert read_reply(stream).startswith(expected)
        stream.write(smuggled + b"\r\n.\r\n")
        stream.flush()
        assert read_reply(stream).startswith(b"250 2.0.0")
    [received] = sendcloud.wait_for(1)
    assert b"\r\n..\r\nMAIL FROM:<evil@example.org>" not in received.data  # dot-unstuffed by the fake
    assert b"first part\r\n.\r\nMAIL FROM:<evil@example.org>\r\n" in received.data
    assert b"\n" not in received.data.replace(b"\r\n", b"")
    assert wait_until(lambda: len(sendcloud.messages) > 1, 1.5) is False


def test_upstream_down_still_accepts_and_delivers_when_it_returns(relay, sendcloud, client_tls):
    sendcloud.stop()
    queue_id = submit(relay, client_tls, ["later@example.net"], message("outage"))
    assert wait_until(lambda: "deferred" in relay.cli("queue", "show", queue_id).stdout, 10)
    shown = relay.cli("queue", "show", queue_id).stdout
    assert "waits: connect to 127.0.0.1" in shown
    sendcloud.restart()
    [received] = sendcloud.wait_for(1, timeout=30)
    assert received.rcpt_tos == ["later@example.net"]


def test_temporary_4xx_is_retried(relay, sendcloud, client_tls):
    sendcloud.data_reply = "451 4.3.0 try again later"
    queue_id = submit(relay, client_tls, ["retry@example.net"], message("tempfail"))
    assert wait_until(lambda: "451 4.3.0 try again later" in relay.cli("queue", "show", queue_id).stdout, 10)
    sendcloud.data_reply = None
    assert sendcloud.wait_for(1, timeout=30)[0].rcpt_tos == ["retry@example.net"]


def test_permanent_5xx_fails_the_recipient_and_sends_a_dsn(relay, sendcloud, client_tls):
    sendcloud.rcpt_replies["nobody@example.net"] = "550 5.1.1 <nobody@example.net>: user unknown"
    queue_id = submit(relay, client_tls, ["ok@example.net", "nobody@example.net"], message("partly"))
    original, dsn = sendcloud.wait_for(2)
    assert original.rcpt_tos == ["ok@example.net"]
    assert dsn.mail_from == "<>" and dsn.rcpt_tos == ["app@acme.com"]  # aiosmtpd's null sender
    report = email.message_from_bytes(dsn.data, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    status = report.get_payload()[1].as_string()
    assert "Final-Recipient: rfc822; nobody@example.net" in status
    assert "Status: 5.1.1" in status and "Action: failed" in status
    assert "ok@example.net" not in status
    assert "Subject: partly" in report.get_payload()[2].as_string()
    assert str(report["From"]).endswith("@info.acme.com>")  # aligned with the account's domain
    shown = relay.cli("queue", "show", queue_id).stdout
    assert "<nobody@example.net>  failed" in shown and "<ok@example.net>  delivered" in shown


def test_queue_commands_while_running(make_relay, sendcloud, client_tls):
    """list / show / delete / retry / flush against the live spool of a running relay."""
    relay = make_relay(config_patch=lambda c: c["spool"].update(retry=["1h"]))
    sendcloud.stop()
    first = submit(relay, client_tls, ["one@example.net"], message("first"))
    second = submit(relay, client_tls, ["two@example.net"], message("second"))
    third = submit(relay, client_tls, ["three@example.net"], message("third"))
    assert wait_until(lambda: relay.cli("queue", "list").stdout.count("deferred") == 3, 15), relay.cli("queue", "list").stdout
    listing = relay.cli("queue", "list").stdout
    for queue_id in (first, second, third):
        assert queue_id in listing
    assert f"{USER}" in listing and "acme_trigger" in listing

    deleted = relay.cli("queue", "delete", second)
    assert deleted.returncode == 0 and second not in relay.cli("queue", "list").stdout
    assert relay.cli("queue", "delete", second).returncode == 1

    sendcloud.restart()
    assert relay.cli("queue", "retry", first).returncode == 0  # retry is 1h away: only this makes it go
    [received] = sendcloud.wait_for(1, timeout=15)
    assert received.rcpt_tos == ["one@example.net"]

    assert "1 deferred recipient(s)" in relay.cli("queue", "flush").stdout
    received = sendcloud.wait_for(2, timeout=15)
    assert sorted(m.rcpt_tos[0] for m in received) == ["one@example.net", "three@example.net"]
    assert wait_until(lambda: "0 message(s)" in relay.cli("queue", "list").stdout, 10)
    assert "delivered" in relay.cli("queue", "list", "--all").stdout
    assert relay.cli("queue", "show", "NOSUCHID").returncode == 1


def test_sigterm_shuts_down_cleanly_and_restart_resumes(make_relay, sendcloud, client_tls):
    relay = make_relay()
    sendcloud.stop()
    queue_id = submit(relay, client_tls, ["resume@example.net"], message("resume"))
    assert relay.stop() == 0
    assert "spool closed cleanly" in relay.log()
    sendcloud.restart()
    relay.start()
    assert sendcloud.wait_for(1, timeout=30)[0].rcpt_tos == ["resume@example.net"]
    assert wait_until(lambda: "delivered" in relay.cli("queue", "show", queue_id).stdout, 10)


def test_send_test_command_prints_each_reply(relay, sendcloud, ca_file):
    result = relay.cli(
        "send-test", "--server", f"127.0.0.1:{relay.port('submission')}", "--user", USER,
        "--password", PASSWORD, "--from", "app@acme.com", "--to", "st@example.net", "--ca-file", str(ca_file),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for step in ("EHLO", "STARTTLS", "AUTH as billing", "MAIL FROM:<app@acme.com>", "RCPT TO:<st@example.net>", "DATA"):
        assert step in result.stdout
    assert "250 2.0.0 Ok: queued as" in result.stdout
    assert sendcloud.wait_for(1)[0].rcpt_tos == ["st@example.net"]


def test_no_secret_reaches_the_log(make_relay, sendcloud, client_tls):
    """A full run at debug level: AUTH PLAIN and LOGIN (good and bad), both accounts' upstream
    logins, a reload and admin requests with the token. No secret, plain or base64, is logged."""
    token = "admin-token-3c9d"
    relay = make_relay(lambda config: config.update(logging={"level": "debug"}, admin={**config["admin"], "token": token}))
    submit(relay, client_tls, ["s@example.net"], message("secret"))  # smtplib: AUTH PLAIN
    submit(relay, client_tls, ["n@example.net"], message("news", "X-Mail-Type: newsletter\r\n"))
    sendcloud.wait_for(2)
    for mechanism in ("LOGIN", "PLAIN"):
        with smtplib.SMTP("127.0.0.1", relay.port("submission"), timeout=20) as client:
            client.starttls(context=client_tls)
            client.ehlo()
            client.user, client.password = USER, "wrong-password-xyz"
            try:
                client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
            except smtplib.SMTPAuthenticationError:
                pass
    assert relay.cli("reload").returncode == 0
    assert relay.http("/metrics", token=token)[0] == 200
    assert relay.http("/api/queue", token=token)[0] == 200
    assert wait_until(lambda: "config reloaded" in relay.log(), 10)
    log = relay.log()
    secrets = [PASSWORD, "wrong-password-xyz", "trigger-key-123", "batch-key-456", token]
    encoded = [base64.b64encode(s.encode()).decode() for s in secrets]
    encoded += [base64.b64encode(f"\0{USER}\0{s}".encode()).decode() for s in (PASSWORD, "wrong-password-xyz")]
    for secret in secrets + encoded:
        assert secret not in log, secret
    assert "DEBUG" in log and log.count("authentication failed") == 2


def test_sigterm_lets_a_transaction_in_progress_finish_and_says_421_to_idle_sessions(make_relay, sendcloud):
    relay = make_relay()
    busy = smtplib.SMTP("127.0.0.1", relay.port("smtp"), timeout=20, source_address=(TRUSTED_SOURCE, 0))
    idle = smtplib.SMTP("127.0.0.1", relay.port("smtp"), timeout=20, source_address=(TRUSTED_SOURCE, 0))
    busy.ehlo()
    idle.ehlo()
    busy.mail("app@acme.com")
    busy.rcpt("inflight@example.net")
    relay.process.terminate()
    assert wait_until(lambda: "shutting down" in relay.log(), 10)
    assert idle.noop()[0] == 421  # told to come back later, not cut off silently
    code, reply = busy.data(b"Subject: in flight\r\n\r\nfinished during shutdown\r\n")
    assert code == 250, reply
    busy.close()
    assert relay.process.wait(30) == 0
    relay.process = None
    relay.start()
    [received] = sendcloud.wait_for(1, timeout=30)
    assert received.rcpt_tos == ["inflight@example.net"]


def test_a_5_mb_message_arrives_byte_for_byte_dot_lines_included(make_relay, sendcloud):
    """The large-message path (one receive buffer, blob pieces, chunked dot-stuffed DATA upstream)
    loses, adds and reorders nothing; lines starting with a dot arrive as sent."""
    relay = make_relay(max_message_size="8MiB")
    line = b"0123456789" * 7 + b"\r\n"
    body = b"".join([
        b".a first line starting with a dot\r\n", line * 30_000, b".\r\n..\r\n...three\r\n",
        bytes(range(32, 127)) * 2 + b"\r\n", line * 40_000, b". last\r\n",
    ])
    assert len(body) > 5_000_000
    submit_trusted(relay, ["large@example.net"], message("large", body="") + body)
    [received] = sendcloud.wait_for(1, timeout=60)
    assert received.data.endswith(b"\r\n\r\n" + body)  # the relay only adds header fields
    assert received.data.count(b"\r\n\r\n" + body) == 1


@pytest.mark.parametrize("processes", [1, 2])
def test_dot_lines_at_every_spool_chunk_boundary_arrive_byte_for_byte(make_relay, sendcloud, processes):
    """Dot-lines of mixed lengths throughout, so every 256 KB boundary (of the acceptor's hand-off
    pieces, of the main process's spill file past 1 MiB, and of the spool reads) falls among
    them, at some offset within a line."""
    relay = make_relay(max_message_size="8MiB", processes=processes)
    body = (b".\r\n" + b"..y\r\n" + b".zz\r\n" + b"plain\r\n" + b".\r\n.\r\n") * 100_000  # 3 MB: two spills, a rest held
    submit_trusted(relay, ["dots@example.net"], message("dots", body="") + body)
    [received] = sendcloud.wait_for(1, timeout=60)
    assert received.data.endswith(b"\r\n\r\n" + body)
    assert received.data.count(b"\r\n\r\n" + body) == 1


def test_a_message_deleted_during_its_delivery_is_dropped_upstream_not_sent(make_relay, sendcloud, client_tls):
    """`queue delete` while the relay is in the upstream transaction: the next chunk read finds the
    message gone, the connection closes before the final dot, and the relay carries on."""
    relay = make_relay(max_message_size="8MiB", config_patch=lambda c: c["upstream"].update(timeout="60s"))
    in_transaction, deleted = threading.Event(), threading.Event()

    def hold_rcpt(address: str) -> None:  # runs in the fake's loop: the relay waits for this reply
        if address == "deleted@example.net":
            in_transaction.set()
            deleted.wait(20)

    sendcloud.rcpt_hook = hold_rcpt
    queue_id = submit(relay, client_tls, ["deleted@example.net"], message("doomed") + (b"y" * 98 + b"\r\n") * 10_000)
    assert in_transaction.wait(20)
    assert relay.cli("queue", "delete", queue_id).returncode == 0
    deleted.set()
    assert wait_until(lambda: "deleted from the queue while it was sent" in relay.log(), 20), relay.log()
    submit(relay, client_tls, ["after@example.net"], message("after"))
    [received] = sendcloud.wait_for(1, timeout=20)
    assert received.rcpt_tos == ["after@example.net"]  # the deleted one never arrived, the next did
    assert queue_id not in relay.cli("queue", "list", "--all").stdout


def test_dsn_for_a_large_message_quotes_its_header_section_only(make_relay, sendcloud, client_tls):
    """RFC 3464 text/rfc822-headers, as Postfix past bounce_size_limit: a 2 MB message bounces small."""
    relay = make_relay(max_message_size="8MiB")
    sendcloud.rcpt_replies["nobody@example.net"] = "550 5.1.1 <nobody@example.net>: user unknown"
    submit(relay, client_tls, ["nobody@example.net"], message("big bounce", body="z" * 70 + "\r\n") + (b"w" * 98 + b"\r\n") * 20_000)
    [dsn] = sendcloud.wait_for(1, timeout=30)
    assert dsn.mail_from == "<>" and len(dsn.data) < 10_000
    report = email.message_from_bytes(dsn.data, policy=email.policy.default)
    quoted = report.get_payload()[2]
    assert quoted.get_content_type() == "text/rfc822-headers"
    assert "Subject: big bounce" in quoted.as_string() and "zzzz" not in quoted.as_string()
