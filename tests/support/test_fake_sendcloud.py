"""Self-test of the fake SendCloud server, driven by smtplib as a real client."""

import smtplib
import ssl

import pytest
import trustme

from tests.support.fake_sendcloud import QUEUED_REPLY, FakeSendCloud

ACCOUNTS = {"acme_trigger": "trigger-key", "acme_batch": "batch-key"}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def client_tls(ca: trustme.CA, tmp_path) -> ssl.SSLContext:
    """A verifying client context trusting only the test CA, as the relay's will."""
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return ssl.create_default_context(cafile=str(ca_file))


@pytest.fixture
def fake(ca: trustme.CA):
    with FakeSendCloud(ca, ACCOUNTS) as server:
        yield server


def connect(fake: FakeSendCloud, client_tls: ssl.SSLContext, login: str | None = None,
            password: str | None = None) -> smtplib.SMTP:
    """Connect, STARTTLS (checking the cert against 127.0.0.1) and optionally log in."""
    conn = smtplib.SMTP("127.0.0.1", fake.port, timeout=10)
    conn.starttls(context=client_tls)
    conn.ehlo()
    if login is not None:
        conn.login(login, password)
    return conn


def send(conn: smtplib.SMTP, rcpts: list[str], body: bytes) -> tuple[int, bytes]:
    """One transaction; returns the DATA reply (smtplib.sendmail would hide its text)."""
    assert conn.mail("app@acme.test")[0] == 250
    for rcpt in rcpts:
        conn.rcpt(rcpt)
    return conn.data(body)


def test_ehlo_matches_sendcloud_and_auth_is_required(fake, client_tls):
    with smtplib.SMTP("127.0.0.1", fake.port, timeout=10) as conn:
        assert conn.ehlo() == (250, b"fake-smtp.sendcloud.test\nPIPELINING\nSIZE 16000000\n8BITMIME\nSTARTTLS")
        assert conn.mail("app@acme.test") == (530, b"5.7.0 Authentication required")
        assert conn.docmd("AUTH", "LOGIN")[0] == 538  # no AUTH before STARTTLS

        conn.starttls(context=client_tls)
        assert conn.ehlo() == (250, b"fake-smtp.sendcloud.test\nPIPELINING\nSIZE 16000000\n8BITMIME\nAUTH LOGIN")
        for command in ("MAIL FROM:<app@acme.test>", "RCPT TO:<bob@example.com>", "DATA"):
            assert conn.docmd(command) == (530, b"5.7.0 Authentication required")
        assert conn.docmd("AUTH", "PLAIN AGFjbWVfdHJpZ2dlcgB0cmlnZ2VyLWtleQ==")[0] == 504

        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            conn.login("acme_trigger", "wrong-key")
        assert (failed.value.smtp_code, failed.value.smtp_error) == (535, b"5.7.8 Authentication failed")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            conn.login("acme_trigger#notanumber", "trigger-key")
    assert fake.logins == ["acme_trigger", "acme_trigger#notanumber"]
    assert fake.messages == []


def test_accepts_authenticated_mail_and_replies_with_message_id(fake, client_tls):
    body = b"Subject: one\r\n\r\n.line starting with a dot\r\nend\r\n"
    with connect(fake, client_tls, "acme_trigger#12345", "trigger-key") as conn:
        code, text = send(conn, ["bob@example.com", "carol@example.com"], body)
    assert code == 250
    first_id = QUEUED_REPLY.match(text.decode()).group("message_id")

    with connect(fake, client_tls, "acme_batch", "batch-key") as conn:
        code, text = send(conn, ["dave@example.com"], b"Subject: two\r\n\r\nbody\r\n")
    assert code == 250
    second_id = QUEUED_REPLY.match(text.decode()).group("message_id")

    first, second = fake.wait_for(2, timeout=5)
    assert first_id != second_id
    assert (first.login, first.mail_from, first.rcpt_tos, first.message_id, first.tls) == (
        "acme_trigger#12345", "app@acme.test", ["bob@example.com", "carol@example.com"], first_id, True)
    assert first.data == body  # smtplib dot-stuffed the leading dot; the fake unstuffed it
    assert first.email_ids == [f"{first_id}0$bob@example.com", f"{first_id}1$carol@example.com"]
    assert (second.login, second.rcpt_tos, second.message_id) == ("acme_batch", ["dave@example.com"], second_id)
    assert fake.logins == ["acme_trigger#12345", "acme_batch"]


def test_scripted_rcpt_and_data_replies(fake, client_tls):
    fake.rcpt_replies["nobody@example.com"] = "550 5.1.1 user unknown"
    with connect(fake, client_tls, "acme_trigger", "trigger-key") as conn:
        conn.mail("app@acme.test")
        assert conn.rcpt("nobody@example.com") == (550, b"5.1.1 user unknown")
        assert conn.rcpt("bob@example.com") == (250, b"OK")
        assert conn.data(b"Subject: partial\r\n\r\nhi\r\n")[0] == 250

        fake.data_reply = "451 4.3.0 try again"
        assert send(conn, ["bob@example.com"], b"Subject: later\r\n\r\nhi\r\n") == (451, b"4.3.0 try again")
    (message,) = fake.wait_for(1, timeout=5)
    assert message.rcpt_tos == ["bob@example.com"]
    assert len(fake.messages) == 1  # the 451 one was not recorded

    with pytest.raises(AssertionError, match="expected 2 message"):
        fake.wait_for(2, timeout=0.2)


def test_stop_and_restart_on_the_same_port(fake, client_tls):
    port = fake.port
    for round_number in range(3):
        conn = connect(fake, client_tls, "acme_trigger", "trigger-key")
        fake.stop()
        with pytest.raises(smtplib.SMTPServerDisconnected):
            conn.noop()  # the open connection was closed under it
        conn.close()
        with pytest.raises(ConnectionRefusedError):
            smtplib.SMTP("127.0.0.1", port, timeout=5)

        fake.restart()
        assert fake.port == port
        with connect(fake, client_tls, "acme_trigger", "trigger-key") as conn:
            assert send(conn, ["bob@example.com"], b"Subject: back\r\n\r\nhi\r\n")[0] == 250
        assert len(fake.wait_for(round_number + 1, timeout=5)) == round_number + 1
