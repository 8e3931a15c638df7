"""The `sendcloud-relay` command as operators type it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

from relay.policy.auth import verify_password
from tests.support import free_port
from tests.support.relay import REPO, wait_for_port, wait_until


def run(*args: str, cwd: Path, input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """The command in a fresh process; ``env`` replaces the environment, except where this code comes from."""
    if env is not None and "PYTHONPATH" in os.environ:
        env = env | {"PYTHONPATH": os.environ["PYTHONPATH"]}
    return subprocess.run(
        [sys.executable, "-m", "relay", *args], cwd=cwd, input=input, capture_output=True, text=True, timeout=60, env=env,
        check=False,
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
    leaf = trustme.CA().issue_cert("relay.example.com")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "fullchain.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "privkey.pem"))
    config.write_text(example.replace("/run/secrets/sc_batch", "sc_batch").replace("/etc/sendcloud-relay/tls/", ""))
    result = run("check-config", "-c", str(config), cwd=tmp_path, env={"SC_TRIGGER_KEY": "k", "PATH": "/usr/bin"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "billing: password" in out
    assert "trigger  -> acme_trigger (api_user acme_trigger, type trigger, domain info.acme.com)" in out
    assert "batch    -> acme_batch (api_user acme_batch, type batch, domain news.acme.com)" in out
    assert "mailhub: no password (trusted networks only); trusted networks 10.20.0.0/16" in out
    assert "submission   0.0.0.0:587" in out
    assert "batch-key" not in out and "SC_TRIGGER_KEY" not in out
    assert "  0: {header: {X-Mail-Type: newsletter}} -> batch" in out  # rules as YAML, as written


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
        assert "no config found" in (tmp_path / "demo.log").read_text()  # and it says it runs the demo
    finally:
        process.terminate()
        assert process.wait(30) == 0


QUEUE_CONFIG = """\
server:
  hostname: relay.test
  listeners:
    - {name: smtp, port: 2525, tls: none, auth: optional}
upstream: {kind: sendcloud}
admin: {token: "${RELAY_ADMIN_TOKEN}"}
spool: {path: spool.db}
accounts:
  acme_trigger: {api_user: acme_trigger, api_key: "${SC_KEY}", type: trigger, domain: acme.com}
  acme_batch: {api_user: acme_batch, api_key_file: /run/secrets/absent, type: batch, domain: acme.com}
users:
  billing: {channels: {trigger: acme_trigger}}
  crm: {channels: {trigger: acme_trigger, batch: acme_batch}}
"""


def spool_with(path: Path, messages: list[tuple[str, str, list[str]]]) -> None:
    from relay.spool import NewMessage
    from relay.spool.sqlite import open_store

    store = open_store(path)
    for number, (queue_id, user, recipients) in enumerate(messages):
        store.insert(NewMessage(queue_id, 1_700_000_000.0 + number, user, "smtp", "10.0.0.5", "acme_trigger",
                                "trigger", "app@acme.com", recipients, b"Subject: x\r\n\r\nx\r\n"))
    store.conn.close()


def test_queue_list_filters_and_pages_without_any_secret_in_the_environment(tmp_path):
    """`${SC_KEY}` unset and a key file absent: `queue` needs no secret, so it still works."""
    config = tmp_path / "relay.yaml"
    config.write_text(QUEUE_CONFIG)
    spool_with(tmp_path / "spool.db", [("M1", "billing", ["a@x.org"]), ("M2", "crm", ["b@x.org"]),
                                       ("M3", "crm", ["c@x.org", "B@X.org"]), ("M4", "crm", ["d@x.org"])])
    env = {"PATH": "/usr/bin:/bin"}
    first = run("queue", "list", "--user", "crm", "--limit", "2", "--json", "-c", str(config), cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    page = json.loads(first.stdout)
    assert [m["id"] for m in page["messages"]] == ["M2", "M3"] and page["next_after"] == "M3"
    rest = run("queue", "list", "--user", "crm", "--after", "M3", "-c", str(config), cwd=tmp_path, env=env)
    assert rest.returncode == 0 and "M4" in rest.stdout and "M2" not in rest.stdout, rest.stderr
    assert rest.stdout.rstrip().endswith("-- 1 message(s)")
    by_recipient = run("queue", "list", "--to", "b@x.org", "--json", "-c", str(config), cwd=tmp_path, env=env)
    assert [m["id"] for m in json.loads(by_recipient.stdout)["messages"]] == ["M2", "M3"]
    shown = run("queue", "show", "M3", "--json", "-c", str(config), cwd=tmp_path, env=env)
    assert [r["address"] for r in json.loads(shown.stdout)["recipients"]] == ["c@x.org", "B@X.org"]
    assert run("queue", "flush", "-c", str(config), cwd=tmp_path, env=env).returncode == 0
    refused = run("queue", "list", "--since", "yesterday", "-c", str(config), cwd=tmp_path, env=env)
    assert refused.returncode == 2 and "since 'yesterday'" in refused.stderr


def test_queue_on_a_missing_spool_says_so_and_creates_nothing(tmp_path):
    config = tmp_path / "relay.yaml"
    config.write_text(QUEUE_CONFIG)
    result = run("queue", "list", "-c", str(config), cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert "no spool at spool.db" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "spool.db").exists()


def test_commands_find_their_config_in_the_environment_and_only_serve_falls_back_to_the_demo(tmp_path):
    config = tmp_path / "relay.yaml"
    config.write_text(QUEUE_CONFIG.replace("api_key_file: /run/secrets/absent", 'api_key: "${SC_KEY}"'))
    env = {"PATH": "/usr/bin:/bin", "SC_KEY": "k", "RELAY_ADMIN_TOKEN": "t"}
    found = run("check-config", cwd=tmp_path, env=env | {"SENDCLOUD_RELAY_CONFIG": str(config)})
    assert found.returncode == 0 and f"config {config}: ok" in found.stdout, found.stderr
    for command in (["check-config"], ["queue", "list"], ["reload"]):
        missing = run(*command, cwd=tmp_path, env=env)
        assert missing.returncode == 1 and "no config found" in missing.stderr, (command, missing.stderr)
        assert "Traceback" not in missing.stderr


def test_queue_help_is_per_action(tmp_path):
    listing = run("queue", "list", "--help", cwd=tmp_path)
    assert listing.returncode == 0 and "--since" in listing.stdout and "--after" in listing.stdout
    show = run("queue", "show", "--help", cwd=tmp_path)
    assert "ID" in show.stdout and "--since" not in show.stdout


def serve_config(tmp_path: Path, ports: list[int], tls: str = "") -> Path:
    listeners = "".join(
        f"    - {{name: l{index}, bind: 127.0.0.1, port: {port}, tls: {'starttls' if tls else 'none'}, auth: optional}}\n"
        for index, port in enumerate(ports)
    )
    config = tmp_path / "relay.yaml"
    config.write_text(
        f"server:\n  hostname: relay.test\n  processes: 1\n  listeners:\n{listeners}{tls}"
        "upstream: {kind: capture}\nadmin: {listen: null}\nspool: {path: spool.db}\n"
        "accounts:\n  a: {api_user: a, type: trigger, domain: acme.com}\n"
        "users:\n  billing: {channels: {trigger: a}}\n"
    )
    return config


@pytest.mark.parametrize("processes", ["1", "2"])
def test_serve_on_a_port_in_use_says_which_in_one_line_before_serving_any(tmp_path, processes):
    first = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        config = serve_config(tmp_path, [first, busy])
        config.write_text(config.read_text().replace("processes: 1", f"processes: {processes}"))
        result = run("serve", "-c", str(config), cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"fatal: cannot listen on 127.0.0.1:{busy} (listener l1): "), result.stderr
    assert "Traceback" not in result.stderr
    assert "listening on" not in result.stderr  # the free port was bound, never served


TLS_FILES = "  tls: {cert: cert.pem, key: key.pem}\n"


def test_serve_and_check_config_name_a_missing_or_mismatched_certificate(tmp_path):
    config = serve_config(tmp_path, [free_port()], tls=TLS_FILES)
    for command in ("serve", "check-config"):
        result = run(command, "-c", str(config), cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert "server.tls.cert: cannot read cert.pem: No such file or directory" in result.stderr
    ca = trustme.CA()
    ca.issue_cert("relay.test").cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    ca.issue_cert("other.test").private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    for command in ("serve", "check-config"):
        result = run(command, "-c", str(config), cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert "server.tls: cert.pem and key.pem do not load together" in result.stderr


def test_queue_list_piped_into_head_ends_quietly(tmp_path):
    config = tmp_path / "relay.yaml"
    config.write_text(QUEUE_CONFIG)
    spool_with(tmp_path / "spool.db", [(f"M{n:05d}", "billing", ["a@x.org"]) for n in range(3000)])
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        f'"{sys.executable}" -m relay queue list -c "{config}" | head -1; echo "relay exited ${{PIPESTATUS[0]}}" >&2',
        shell=True, executable="/bin/bash", cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env, check=False,
    )
    assert result.stdout.startswith("ID ") and len(result.stdout.splitlines()) == 1
    assert result.stderr == "relay exited 141\n"  # as a process killed by SIGPIPE: no traceback, no noise
