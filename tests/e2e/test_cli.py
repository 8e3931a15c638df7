"""The `sendcloud-relay` command as operators type it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from relay.policy.auth import verify_password
from tests.support.relay import REPO, wait_for_port, wait_until


def run(*args: str, cwd: Path, input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args], cwd=cwd, input=input, capture_output=True, text=True, timeout=60, env=env
    )


def test_hash_password_reads_stdin_and_prints_a_verifiable_hash(tmp_path):
    result = run("hash-password", cwd=tmp_path, input="correct horse\n")
    assert result.returncode == 0
    password_hash = result.stdout.strip()
    assert password_hash.startswith("$argon2id$")
    assert verify_password(password_hash, "correct horse")
    assert not verify_password(password_hash, "correct horse\n")
    assert "correct horse" not in result.stdout + result.stderr


def test_check_config_prints_the_routing_table_of_the_example(tmp_path, monkeypatch):
    example = (REPO / "config" / "relay.example.yaml").read_text()
    (tmp_path / "sc_batch").write_text("batch-key\n")
    config = tmp_path / "relay.yaml"
    config.write_text(example.replace("/run/secrets/sc_batch", "sc_batch"))
    result = run("check-config", "-c", str(config), cwd=tmp_path, env={"SC_TRIGGER_KEY": "k", "PATH": "/usr/bin"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "billing: password" in out
    assert "trigger  -> acme_trigger (api_user acme_trigger, type trigger, domain info.acme.com)" in out
    assert "batch    -> acme_batch (api_user acme_batch, type batch, domain news.acme.com)" in out
    assert "mailhub: no password (trusted networks only); trusted networks 10.20.0.0/16" in out
    assert "submission   0.0.0.0:587" in out
    assert "batch-key" not in out and "SC_TRIGGER_KEY" not in out


def test_check_config_names_file_line_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "server:\n  listeners:\n    - {name: a, port: 2525, tls: none}\n"
        "accounts:\n  news: {api_user: news_user, type: batch, domain: x.test}\n"
        "upstream: {kind: capture}\n"
        "users:\n  team:\n    channels: {trigger: news}\n    alowed_senders: []\n"
    )
    result = run("check-config", "-c", str(bad), cwd=tmp_path)
    assert result.returncode == 1
    assert f"{bad}:10: users.team.alowed_senders: unknown key" in result.stderr


def test_demo_starts_with_no_config_and_captures_mail(tmp_path):
    """The README's first command: `serve` on the embedded demo, self-signed cert, capture."""
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve"], cwd=tmp_path, stdout=open(tmp_path / "demo.log", "wb"), stderr=subprocess.STDOUT
    )
    try:
        assert wait_for_port("127.0.0.1", 2587, 20, process), (tmp_path / "demo.log").read_text()
        assert (tmp_path / "var/tls/cert.pem").exists() and (tmp_path / "var/tls/key.pem").stat().st_mode & 0o077 == 0
        sent = run(
            "send-test", "--server", "127.0.0.1:2587", "--user", "demo", "--password", "demo-password",
            "--insecure", "--from", "me@example.com", "--to", "you@example.net", cwd=tmp_path,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        capture = tmp_path / "var/capture"
        assert wait_until(lambda: list(capture.glob("*.json")), 10)
        envelope = json.loads(next(capture.glob("*.json")).read_text())
        assert envelope["rcpt_to"] == ["you@example.net"] and envelope["api_user"] == "demo_trigger"
        assert "acceptor 1 started" in (tmp_path / "demo.log").read_text()  # the default: processes auto
    finally:
        process.terminate()
        assert process.wait(30) == 0
