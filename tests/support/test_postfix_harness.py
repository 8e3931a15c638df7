"""Self-test of the Postfix smarthost harness.

The relay is not what is tested here, so a tiny aiosmtpd server stands in for it: STARTTLS
with a certificate from the test CA, AUTH PLAIN/LOGIN for one user, recording what it
receives. Mail goes in through smtplib and must come out of Postfix, authenticated over TLS.
"""

import hashlib
import pathlib
import smtplib
import ssl
import threading
import time
from email.message import EmailMessage

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.support import free_port, require_peer
from tests.support.postfix import PostfixSmarthost, postfix_available

USERNAME = "customer@acme.test"
PASSWORD = "s3cret:with colon"


class RecordingHandler:
    """Accepts (after AUTH) and records (login, TLS in effect, envelope) of each message."""

    def __init__(self):
        self.received: list[tuple[str, bool, str, list[str], bytes]] = []
        self.lock = threading.Lock()

    def authenticate(self, server, session, envelope, mechanism, auth_data: LoginPassword) -> AuthResult:
        ok = (auth_data.login, auth_data.password) == (USERNAME.encode(), PASSWORD.encode())
        return AuthResult(success=ok, auth_data=auth_data.login.decode() if ok else None, handled=False)

    async def handle_DATA(self, server, session, envelope) -> str:
        with self.lock:
            self.received.append((session.auth_data, session.ssl is not None, envelope.mail_from,
                                  list(envelope.rcpt_tos), envelope.original_content))
        return "250 OK queued"


def tree_digest(root: pathlib.Path) -> str:
    """Digest of every file's path and content under root, to prove it was left alone."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_postfix_relays_through_smarthost_with_sasl_over_tls(tmp_path):
    require_peer(postfix_available(), "Postfix (/usr/sbin/postfix and postmap, run as root)")
    etc_postfix_before = tree_digest(pathlib.Path("/etc/postfix"))

    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_tls)

    handler = RecordingHandler()
    upstream = Controller(handler, hostname="127.0.0.1", port=free_port(), server_hostname="relay.test",
                          tls_context=server_tls, auth_required=True, authenticator=handler.authenticate)
    upstream.start()
    try:
        with PostfixSmarthost(tmp_path, upstream.port, USERNAME, PASSWORD, ca_file) as postfix:
            with smtplib.SMTP("127.0.0.1", postfix.inject_port, timeout=10) as client:
                for n in range(3):
                    message = EmailMessage()
                    message["From"] = "app@customer.test"
                    message["To"] = f"user{n}@example.com"
                    message["Subject"] = f"message {n}"
                    message.set_content(f"body {n}\n")
                    client.send_message(message)

            arrived = wait_until(lambda: len(handler.received) >= 3, timeout=30)
            assert arrived, f"upstream got {len(handler.received)} of 3 messages; maillog:\n{postfix.log()}"
            envelopes = sorted((login, tls, sender, rcpts) for login, tls, sender, rcpts, _ in handler.received)
            assert envelopes == [(USERNAME, True, "app@customer.test", [f"user{n}@example.com"]) for n in range(3)]
            assert all(b"Subject: message" in data for *_, data in handler.received)
            assert wait_until(postfix.queue_is_empty, timeout=10), postfix.log()
            assert f"Trusted TLS connection established to 127.0.0.1[127.0.0.1]:{upstream.port}" in postfix.log()
    finally:
        upstream.stop()

    assert "status=sent" in postfix.log()
    assert not postfix.maillog_file.exists()  # moved into tmp_path by stop()
    assert tree_digest(pathlib.Path("/etc/postfix")) == etc_postfix_before


def test_require_peer_fails_instead_of_skipping_when_peers_are_required(monkeypatch):
    monkeypatch.setenv("RELAY_REQUIRE_PEERS", "1")
    with pytest.raises(pytest.fail.Exception, match="RELAY_REQUIRE_PEERS=1"):
        require_peer(False, "something")
    monkeypatch.delenv("RELAY_REQUIRE_PEERS")
    with pytest.raises(pytest.skip.Exception, match="something is not available"):
        require_peer(False, "something")
    require_peer(True, "something")
