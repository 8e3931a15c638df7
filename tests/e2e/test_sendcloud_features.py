"""End to end: routing options, sender modes, hygiene, X-SMTPAPI, labels, TLS rules and DKIM,
asserted on the raw bytes that arrive at the fake SendCloud."""

from __future__ import annotations

import base64
import json
import smtplib

import dkim
import pytest

from relay.rewrite.dkim import dns_record
from tests.e2e.conftest import KEYS, PASSWORD, USER
from tests.e2e.test_relay import submit, submit_trusted
from tests.support.fake_sendcloud import FakeSendCloud
from tests.support.mail import added_fields, body, fields, parsed
from tests.support.relay import wait_until

BODY = "Hello 张三,\r\n\r\n.leading dot and 8-bit text: 中文\r\n".encode()


def newsletter_rule(config: dict) -> None:
    config["rules"][0].update(
        {"ad_marker": "prefix", "label": 12345, "tracking": {"open": True, "click": False}, "sender": {"mode": "rewrite"}}
    )


def test_rule_options_sender_rewrite_and_hygiene_reach_sendcloud(make_relay, sendcloud, client_tls):
    relay = make_relay(newsletter_rule)
    data = (
        b"From: =?utf-8?b?5byg5LiJ?= <zhang@acme.com>\r\n"
        b"To: list@example.net\r\n"
        b"Bcc: hidden@example.org\r\n"
        b"Subject: =?UTF-8?B?" + base64.b64encode("月刊".encode()) + b"?=\r\n"
        b"X-Mail-Type: newsletter\r\n"
        b"SC-Custom-Relay-User: forged\r\n"
        b"X-Keep: exactly\r\n  as sent\r\n"
        b"\r\n" + BODY
    )
    queue_id = submit(relay, client_tls, ["list@example.net", "hidden@example.org"], data, sender="zhang@acme.com")
    [received] = sendcloud.wait_for(1)
    assert received.login == "acme_batch#12345"  # the label travels in AUTH LOGIN
    assert received.mail_from == "noreply@news.acme.com"
    headers = parsed(received.data)
    assert headers["From"] == "张三 <noreply@news.acme.com>"
    assert headers["Reply-To"] == "张三 <zhang@acme.com>"
    assert headers["Subject"] == "(AD) 月刊"
    assert headers["Bcc"] is None and b"hidden@example.org" not in received.data.split(b"\r\n\r\n")[0]
    assert headers.get_all("SC-Custom-Relay-User") == [USER]
    assert headers["SC-Custom-Relay-Id"] == queue_id
    assert headers["Message-ID"].endswith("@relay.test>") and headers["Date"]
    received_line = fields(received.data)[0].decode()
    assert received_line.startswith("Received: from [127.0.0.1] (unknown [127.0.0.1])")
    assert "(Authenticated sender: billing)" in received_line and f"with ESMTPSA id {queue_id}" in received_line
    assert "(using TLSv1.3 with cipher" in received_line
    assert b"X-Keep: exactly\r\n  as sent\r\n" in received.data
    last = fields(received.data)[-1]
    assert last.startswith(b"X-SMTPAPI: ") and last.count(b"\r\n") == 1
    assert json.loads(base64.b64decode(last[len(b"X-SMTPAPI: "):])) == {"filters": {
        "open_tracking": {"settings": {"enable": "1"}}, "click_tracking": {"settings": {"enable": "0"}},
    }}
    assert body(received.data) == BODY  # 8-bit body, dot line and all, byte for byte
    shown = relay.cli("queue", "show", queue_id).stdout
    assert "label 12345" in shown and "<noreply@news.acme.com>" in shown


def test_client_x_smtpapi_is_merged_and_split_per_transaction(make_relay, sendcloud, client_tls):
    def patch(config):
        config["upstream"]["max_recipients_per_transaction"] = 2
        config["users"][USER]["tracking"] = {"unsubscribe": False}

    relay = make_relay(patch)
    recipients = ["a@example.net", "b@example.net", "c@example.net"]
    client = {"to": recipients, "sub": {"%name%": ["A", "B", "C"]}, "filters": {"open_tracking": {"settings": {"enable": "1"}}}}
    data = (
        b"From: app@info.acme.com\r\nSubject: merge\r\nX-SMTPAPI: " + base64.b64encode(json.dumps(client).encode())
        + b"\r\nX-After: yes\r\n\r\n" + BODY
    )
    submit(relay, client_tls, recipients, data, sender="app@info.acme.com")
    first, second = sendcloud.wait_for(2)
    seen = {}
    for message in (first, second):
        value = json.loads(base64.b64decode(fields(message.data)[-1][len(b"X-SMTPAPI: "):]))
        assert value["to"] == message.rcpt_tos  # each transaction names only its own recipients
        assert value["filters"] == {
            "open_tracking": {"settings": {"enable": "1"}},  # the client's, the user set nothing
            "subscription_tracking": {"settings": {"enable": "0"}},  # the user's
        }
        seen.update(zip(value["to"], value["sub"]["%name%"], strict=True))
    assert seen == {"a@example.net": "A", "b@example.net": "B", "c@example.net": "C"}
    assert sorted(len(m.rcpt_tos) for m in (first, second)) == [1, 2]


def test_retry_after_partial_delivery_names_only_the_remaining_recipient(relay, sendcloud, client_tls):
    """SendCloud sends to X-SMTPAPI "to", not to the envelope: a retry must not resend to everyone."""
    sendcloud.rcpt_replies["b@example.net"] = "451 4.2.0 try again later"
    client = {"to": ["a@example.net", "b@example.net"]}
    data = b"From: app@info.acme.com\r\nX-SMTPAPI: " + base64.b64encode(json.dumps(client).encode()) + b"\r\n\r\nbody\r\n"
    submit(relay, client_tls, ["a@example.net", "b@example.net"], data, sender="app@info.acme.com")
    [first] = sendcloud.wait_for(1)
    assert first.rcpt_tos == ["a@example.net"]  # b was refused with 451 and is deferred
    sendcloud.rcpt_replies.clear()
    retried = sendcloud.wait_for(2, timeout=30)[1]
    assert retried.rcpt_tos == ["b@example.net"]
    assert json.loads(base64.b64decode(fields(retried.data)[-1][len(b"X-SMTPAPI: "):]))["to"] == ["b@example.net"]


@pytest.mark.parametrize("value, reply", [
    ({"to": ["a@example.net", "victim@example.org"]}, b'5.7.1 X-SMTPAPI "to" names <victim@example.org>'),
    ({"to": ["a@example.net"], "sub": {"%x%": ["1", "2"]}}, b"5.6.0 Invalid X-SMTPAPI header"),
])
def test_client_x_smtpapi_violating_policy_is_refused_at_data(relay, sendcloud, client_tls, value, reply):
    data = b"From: app@info.acme.com\r\nX-SMTPAPI: " + base64.b64encode(json.dumps(value).encode()) + b"\r\n\r\nbody\r\n"
    with smtplib.SMTP("127.0.0.1", relay.port("submission"), timeout=20) as client:
        client.starttls(context=client_tls)
        client.login(USER, PASSWORD)
        client.mail("app@info.acme.com")
        client.rcpt("a@example.net")
        code, text = client.data(data)
    assert code == 550 and text.startswith(reply)
    assert "NOQUEUE: reject=DATA" in relay.log()
    assert sendcloud.messages == []


def test_tls_rules_split_transactions_and_unmet_tls_waits_with_its_reason(make_relay, sendcloud):
    """Without ca_file the fake's certificate does not verify: `verify` recipients wait,
    the `encrypt` recipient (TLS without authentication) goes, in its own transaction."""
    def patch(config):
        del config["upstream"]["ca_file"]
        config["tls_rules"] = [{"account": "acme_trigger", "domains": ["ok.example"], "rule": "encrypt"}]

    relay = make_relay(patch)
    data = b"From: app@info.acme.com\r\nSubject: tls\r\n\r\nbody\r\n"
    submit_trusted(relay, ["a@ok.example", "b@strict.example"], data, sender="app@info.acme.com")
    [received] = sendcloud.wait_for(1)
    assert received.rcpt_tos == ["a@ok.example"] and received.tls
    queue_id = relay.log().split(": client=[127.0.0.2]")[0].rsplit("\n", 1)[-1].split()[-1]
    assert wait_until(lambda: "certificate verify failed" in relay.cli("queue", "show", queue_id).stdout, 10)
    shown = relay.cli("queue", "show", queue_id).stdout
    assert "<b@strict.example>  deferred" in shown and "<a@ok.example>  delivered" in shown
    assert len(sendcloud.messages) == 1


def test_no_mail_and_no_credentials_over_a_plaintext_upstream(tmp_path, make_relay, ca):
    with FakeSendCloud(ca, KEYS, starttls=False) as plaintext:
        def patch(config):
            config["upstream"].update({"kind": "smtp", "port": plaintext.port, "tls": "starttls"})
            config["tls_rules"] = [{"domains": ["strict.example"], "rule": "encrypt"}, {"rule": "may"}]

        relay = make_relay(patch)
        data = b"From: app@info.acme.com\r\nSubject: plain\r\n\r\nbody\r\n"
        submit_trusted(relay, ["a@may.example", "b@strict.example"], data, sender="app@info.acme.com")
        assert wait_until(lambda: "offers no STARTTLS" in relay.log() and "credentials never cross" in relay.log(), 15)
        assert plaintext.messages == [] and plaintext.logins == []
        queue_id = relay.log().split(": to=<a@may.example>")[0].rsplit("\n", 1)[-1].split()[-1]
        shown = relay.cli("queue", "show", queue_id).stdout
        assert "waits: " in shown and "credentials never cross in plaintext" in shown
        assert "TLS required by tls_rules (encrypt)" in shown


def test_dkim_signature_from_keygen_verifies_after_every_rewrite(make_relay, sendcloud, client_tls, tmp_path):
    keys = {}
    for algorithm, domain in (("rsa", "info.acme.com"), ("ed25519", "news.acme.com")):
        out = relay_cli_keygen(tmp_path, domain, algorithm)
        assert f's1._domainkey.{domain}. IN TXT "v=DKIM1; k={algorithm}' in out
        keys[domain] = (tmp_path / f"{domain}.s1.key").read_bytes()

    def patch(config):
        config["dkim"] = {domain: {"selector": "s1", "key_file": f"{domain}.s1.key"} for domain in keys}
        newsletter_rule(config)

    relay = make_relay(patch)
    submit(relay, client_tls, ["x@example.net"], b"From: App <app@info.acme.com>\r\nSubject: signed\r\n\r\n" + BODY,
           sender="app@info.acme.com")
    submit(relay, client_tls, ["y@example.net"],
           b"From: App <app@acme.com>\r\nX-Mail-Type: newsletter\r\nSubject: news\r\n\r\n" + BODY, sender="app@acme.com")
    messages = sendcloud.wait_for(2)
    published = {f"s1._domainkey.{domain}.".encode(): dns_record(key).encode() for domain, key in keys.items()}
    for message in messages:
        assert message.data.startswith(b"DKIM-Signature: ")
        assert dkim.verify(message.data, dnsfunc=lambda name, timeout=5: published.get(name))
    by_domain = {parsed(m.data)["DKIM-Signature"].split("d=")[1].split(";")[0]: m for m in messages}
    assert parsed(by_domain["news.acme.com"].data)["Subject"] == "(AD) news"  # signed after the rewrite
    assert "a=ed25519-sha256" in parsed(by_domain["news.acme.com"].data)["DKIM-Signature"]


def relay_cli_keygen(folder, domain: str, algorithm: str) -> str:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "relay", "dkim", "keygen", domain, "--selector", "s1", "--algorithm", algorithm,
         "--bits", "1024", "--out", str(folder)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_aligned_message_passes_unchanged_but_for_added_headers(relay, sendcloud, client_tls):
    data = (b"From: App <app@info.acme.com>\r\nTo: t@example.net\r\nSubject: plain\r\n"
            b"Message-ID: <m1@acme.com>\r\nDate: Mon, 3 Mar 2025 10:00:00 +0000\r\n\r\n" + BODY)
    submit(relay, client_tls, ["t@example.net"], data, sender="app@info.acme.com")
    [received] = sendcloud.wait_for(1)
    assert added_fields(data, received.data) == ["Received", "SC-Custom-Relay-Id", "SC-Custom-Relay-User"]
    assert b"X-SMTPAPI" not in received.data
