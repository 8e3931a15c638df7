"""Real peers an operator would use: swaks by hand, and Postfix relaying through us as a smarthost."""

from __future__ import annotations

import shutil
import smtplib
import subprocess

from tests.e2e.conftest import PASSWORD, USER
from tests.support import require_peer
from tests.support.postfix import PostfixSmarthost, postfix_available


def swaks(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["swaks", *args], capture_output=True, text=True, timeout=60)


def test_swaks_starttls_auth_login_verified_certificate(relay, sendcloud, ca_file):
    require_peer(shutil.which("swaks") is not None, "swaks")
    result = swaks(
        "--server", f"127.0.0.1:{relay.port('submission')}", "--tls", "--tls-verify", "--tls-ca-path", str(ca_file),
        "--tls-sni", "localhost", "--auth", "LOGIN", "--auth-user", USER, "--auth-password", PASSWORD,
        "--from", "app@acme.com", "--to", "swaks@example.net", "--header", "Subject: from swaks",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 Ok: queued as" in result.stdout
    [received] = sendcloud.wait_for(1)
    assert received.rcpt_tos == ["swaks@example.net"] and b"Subject: from swaks" in received.data


def test_swaks_without_auth_is_not_relayed(relay, sendcloud):
    require_peer(shutil.which("swaks") is not None, "swaks")
    result = swaks("--server", f"127.0.0.1:{relay.port('smtp')}", "--from", "x@example.org", "--to", "victim@example.net")
    assert result.returncode != 0
    assert "554 5.7.1" in result.stdout


def test_postfix_smarthost_relays_through_us_with_sasl_over_tls(relay, sendcloud, ca_file, tmp_path):
    """A customer's Postfix with `relayhost`, SASL and `smtp_tls_security_level = encrypt`."""
    require_peer(postfix_available(), "Postfix (Debian's postfix package, run as root)")
    with PostfixSmarthost(tmp_path / "postfix", relay.port("submission"), USER, PASSWORD, ca_file) as postfix:
        with smtplib.SMTP("127.0.0.1", postfix.inject_port, timeout=30) as client:
            for number in range(3):
                client.sendmail(
                    "app@acme.com", [f"pf{number}@example.net"],
                    f"From: app@acme.com\r\nSubject: via postfix {number}\r\n\r\nhello {number}\r\n".encode(),
                )
        try:
            received = sendcloud.wait_for(3, timeout=60)
        except AssertionError as error:
            raise AssertionError(f"{error}\n--- postfix log ---\n{postfix.log()}\n--- relay log ---\n{relay.log()}") from None
        assert sorted(m.rcpt_tos[0] for m in received) == [f"pf{n}@example.net" for n in range(3)]
        assert all(m.login == "acme_trigger" for m in received)
        log = postfix.log()
        assert "status=sent" in log and "queued as" in log  # Postfix saw our 250 ... queued as ID
        assert "TLS connection established" in log
