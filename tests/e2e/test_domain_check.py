"""`sendcloud-relay domain check` against a local DNS server holding the records the test writes."""

from __future__ import annotations

import json
import subprocess
import sys

from relay.rewrite.dkim import dns_record, generate
from tests.support.dns_server import DNSServer

GOOD = {
    ("acme.com", "TXT"): ['"v=spf1 include:spf.sendcloud.org ~all"', '"google-site-verification=abc"'],
    ("mail._domainkey.acme.com", "TXT"): ['"k=rsa;p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQC" "qGKukO1De7zhZj6"'],
    ("acme.com", "MX"): ["10 mx.sendcloud.org."],
    ("_dmarc.acme.com", "TXT"): ['"v=DMARC1; p=none; rua=mailto:d@acme.com"'],
}


def check(port: int, *args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "relay", "domain", "check", *args, "--nameserver", f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=60, cwd=cwd,
    )


def test_all_records_in_place(tmp_path):
    with DNSServer(GOOD) as dns:
        result = check(dns.port, "acme.com", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    records = {record["name"]: record for record in json.loads(result.stdout)["records"]}
    assert {name: record["status"] for name, record in records.items()} == {"SPF": "ok", "DKIM": "ok", "MX": "ok", "DMARC": "ok"}
    assert records["SPF"]["found"] == ["v=spf1 include:spf.sendcloud.org ~all"]
    assert records["DKIM"]["host"] == "mail._domainkey.acme.com"
    assert records["DKIM"]["found"] == ["k=rsa;p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQCqGKukO1De7zhZj6"]  # strings joined
    assert records["MX"]["found"] == ["mx.sendcloud.org"] and records["DMARC"]["required"] is False


def test_missing_and_wrong_records_fail_with_a_table(tmp_path):
    records = {
        ("acme.com", "TXT"): ['"v=spf1 include:_spf.google.com ~all"'],
        ("acme.com", "MX"): ["10 mx.other.example."],
    }
    with DNSServer(records) as dns:
        result = check(dns.port, "acme.com")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATUS", "REQUIRED", "TYPE", "HOST", "VALUE", "NEEDED"]
    rows = {line.split()[0]: line.split() for line in lines[1:] if not line.startswith(" ")}
    assert rows["SPF"][1:5] == ["wrong", "yes", "TXT", "acme.com"]
    assert rows["DKIM"][1] == "missing" and rows["MX"][1] == "wrong" and rows["DMARC"][1:3] == ["missing", "no"]
    assert "found: v=spf1 include:_spf.google.com ~all" in result.stdout
    assert "required record(s) not in place: SPF, DKIM, MX" in result.stderr


def test_only_dmarc_missing_still_passes(tmp_path):
    records = {key: value for key, value in GOOD.items() if key[0] != "_dmarc.acme.com"}
    with DNSServer(records) as dns:
        result = check(dns.port, "acme.com")
    assert result.returncode == 0, result.stdout


def test_own_dkim_key_from_the_config_must_match_the_published_one(tmp_path):
    key = generate("ed25519")
    (tmp_path / "s1.key").write_bytes(key)
    (tmp_path / "relay.yaml").write_text(
        "server: {hostname: relay.test, listeners: [{name: smtp, port: 2525, tls: none}]}\n"
        "upstream: {kind: capture}\n"
        "accounts: {t: {api_user: t_user, type: trigger, domain: acme.com}}\n"
        "users: {u: {channels: {trigger: t}}}\n"
        "dkim: {acme.com: {selector: s1, key_file: s1.key}}\n"
        "resolver: {nameservers: [127.0.0.1], timeout: 2s}\n"
    )
    published = {**GOOD, ("s1._domainkey.acme.com", "TXT"): [f'"{dns_record(key)}"']}
    with DNSServer(published) as dns:
        ok = check(dns.port, "acme.com", "-c", "relay.yaml", "--json", cwd=tmp_path)
        stale = {**GOOD, ("s1._domainkey.acme.com", "TXT"): [f'"{dns_record(generate("ed25519"))}"']}
        dns.serve_records(stale)
        wrong = check(dns.port, "acme.com", "-c", "relay.yaml", "--json", cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    dkim_row = json.loads(ok.stdout)["records"][1]
    assert dkim_row["host"] == "s1._domainkey.acme.com" and dkim_row["needed"] == dns_record(key)
    assert wrong.returncode == 1 and json.loads(wrong.stdout)["records"][1]["status"] == "wrong"
