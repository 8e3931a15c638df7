"""Running it in production: metrics, probes, the queue API, reload and PROXY protocol, end to end.

Everything goes through real SMTP clients into a relay process and is read back from its
admin endpoint, its CLI and its log.
"""

from __future__ import annotations

import json
import signal
import smtplib
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.policy.auth import hash_password
from tests.e2e.conftest import PASSWORD, TRUSTED_SOURCE, USER
from tests.e2e.test_relay import message, submit
from tests.support import free_port, require_peer
from tests.support.relay import REPO, wait_until

TOKEN = "admin-token-7f3a9c"


def scrape(relay, token: str | None = None) -> dict[tuple, float]:
    status, text = relay.http("/metrics", token=token)
    assert status == 200, text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# -- metrics and the queue API ------------------------------------------------------------------


def test_metrics_follow_mail_through_real_smtp(relay, sendcloud, client_tls):
    before = scrape(relay)
    trigger = {"user": USER, "account": "acme_trigger", "channel": "trigger"}

    submit(relay, client_tls, ["m1@example.net", "m2@example.net"], message("metrics"))
    with smtplib.SMTP("127.0.0.1", relay.port("smtp"), timeout=20) as client:  # unknown client: no relay
        client.starttls(context=client_tls)
        client.ehlo()
        client.mail("x@acme.com")
        assert client.rcpt("victim@example.net")[0] == 554
    with smtplib.SMTP("127.0.0.1", relay.port("submission"), timeout=20) as client:
        client.starttls(context=client_tls)
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login(USER, "not-the-password")
    sendcloud.wait_for(1)
    assert wait_until(lambda: value(scrape(relay), "sendcloud_relay_recipients_total", result="delivered", **trigger)
                      - value(before, "sendcloud_relay_recipients_total", result="delivered", **trigger) == 2, 10)
    after = scrape(relay)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("sendcloud_relay_messages_accepted_total", **trigger) == 1
    assert delta("sendcloud_relay_acceptance_seconds_count", listener="submission") == 1
    assert delta("sendcloud_relay_delivery_delay_seconds_count", account="acme_trigger") == 2
    assert delta("sendcloud_relay_upstream_transaction_seconds_count", account="acme_trigger") == 1
    assert delta("sendcloud_relay_rejected_total", listener="smtp", user="", reason="relay_denied") == 1
    assert delta("sendcloud_relay_auth_attempts_total", listener="submission", result="success") == 1
    # smtplib tries PLAIN, then LOGIN: two refused AUTH commands.
    assert delta("sendcloud_relay_auth_attempts_total", listener="submission", result="failure") == 2
    assert delta("sendcloud_relay_tls_sessions_total", listener="submission", version="TLSv1.3") == 2
    assert value(after, "sendcloud_relay_queue_messages") == 0
    assert value(after, "sendcloud_relay_upstream_failing_since_seconds", account="acme_trigger") == 0

    # Upstream down: the next message is deferred, waits in the queue, and the gauges say so.
    sendcloud.stop()
    queue_id = submit(relay, client_tls, ["d@example.net"], message("deferred"))
    assert wait_until(lambda: value(scrape(relay), "sendcloud_relay_recipients_total", result="deferred", **trigger) >= 1, 10)
    # The counter moves when the attempt ends, the queue gauges once its outcome is committed.
    assert wait_until(lambda: value(scrape(relay), "sendcloud_relay_queue_recipients", state="deferred") == 1, 10)
    down = scrape(relay)
    assert value(down, "sendcloud_relay_queue_messages") == 1
    assert value(down, "sendcloud_relay_queue_recipients", state="deferred") == 1
    assert value(down, "sendcloud_relay_queue_oldest_message_age_seconds") > 0
    assert value(down, "sendcloud_relay_upstream_failing_since_seconds", account="acme_trigger") > 0

    # /api/queue is `queue list` as JSON: same messages, same words.
    status, body = relay.http("/api/queue")
    assert status == 200
    listed = json.loads(body)
    assert listed["count"] == 1
    [record] = listed["messages"]
    assert record["id"] == queue_id and record["state"] == "deferred"
    assert record["recipients_pending"] == 1 and record["recipients_total"] == 1
    cli_line = next(line for line in relay.cli("queue", "list").stdout.splitlines() if line.startswith(queue_id))
    assert cli_line.split()[2:4] == [record["user"], record["account"]] and cli_line.endswith(record["state"])
    status, body = relay.http(f"/api/queue/{queue_id}")
    shown = json.loads(body)
    assert status == 200 and shown["recipients"][0]["address"] == "d@example.net"
    assert "connect to" in shown["recipients"][0]["last_reply"]
    assert relay.http("/api/queue/NOSUCHID")[0] == 404
    assert relay.http("/api/queue?all=1")[1].count('"id"') >= 2  # delivered ones too

    sendcloud.restart()
    assert relay.cli("queue", "flush").returncode == 0
    assert wait_until(lambda: value(scrape(relay), "sendcloud_relay_queue_messages") == 0, 15)
    assert value(scrape(relay), "sendcloud_relay_upstream_failing_since_seconds", account="acme_trigger") == 0


def test_admin_token_guards_metrics_and_api_but_not_probes(make_relay):
    relay = make_relay(lambda config: config["admin"].update(token=TOKEN))
    assert relay.http("/healthz") == (200, "ok\n")
    assert relay.http("/readyz") == (200, "ready\n")
    for path in ("/metrics", "/api/queue"):
        assert relay.http(path)[0] == 401
        assert relay.http(path, token="wrong")[0] == 401
        assert relay.http(path, token=TOKEN)[0] == 200
    assert relay.http("/api/reload", method="POST")[0] == 401
    assert relay.cli("reload").returncode == 0  # the CLI reads the token from the config


def test_api_queue_filters_and_pages_as_queue_list_does(relay, sendcloud, client_tls):
    sendcloud.stop()  # everything stays queued
    ids = [submit(relay, client_tls, [f"r{n}@example.net"], message(f"m{n}")) for n in range(3)]
    status, body = relay.http("/api/queue?limit=2")
    first = json.loads(body)
    assert status == 200 and [m["id"] for m in first["messages"]] == ids[:2] and first["next_after"] == ids[1]
    rest = json.loads(relay.http(f"/api/queue?limit=2&after={first['next_after']}")[1])
    assert [m["id"] for m in rest["messages"]] == ids[2:] and rest["next_after"] is None
    assert [m["id"] for m in json.loads(relay.http("/api/queue?to=R1@example.net")[1])["messages"]] == [ids[1]]
    status, body = relay.http("/api/queue?state=sent")
    assert status == 400 and "state 'sent'" in json.loads(body)["error"]


# -- readiness ------------------------------------------------------------------------------------


def _can_mount_tmpfs(where: Path) -> bool:
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True).returncode:
        return False
    subprocess.run(["umount", str(where)], check=True)
    return True


def _fill(path: Path) -> None:
    """Write until the filesystem has not one page left."""
    with open(path, "wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 4096)
        except OSError:
            pass


def test_readiness_flips_when_the_spool_disk_is_full(make_relay, client_tls, sendcloud, tmp_path):
    """A real full filesystem under the spool (a small tmpfs), not a simulated error.

    Root ignores file modes, and a filesystem cannot be remounted read-only while SQLite
    holds its files open for writing; a full disk is the failure operators actually meet.
    """
    disk = tmp_path / "spooldisk"
    require_peer(_can_mount_tmpfs(disk), "mounting a tmpfs (root with CAP_SYS_ADMIN)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
    try:
        relay = make_relay(lambda config: config["spool"].update(path=str(disk / "spool.db")))
        assert relay.http("/readyz") == (200, "ready\n")
        _fill(disk / "filler")
        assert wait_until(lambda: relay.http("/readyz")[0] == 503, 10)  # a probe's result serves 1s
        status, body = relay.http("/readyz")
        assert status == 503 and "spool: write failed" in body, body
        assert relay.http("/healthz")[0] == 200  # alive: no reason to restart it
        host, port = relay.admin_address  # what Docker's HEALTHCHECK and systemd run:
        checks = {path: subprocess.run([sys.executable, str(REPO / "deploy" / "healthcheck.py"),
                                        f"http://{host}:{port}{path}"], capture_output=True, text=True, timeout=30)
                  for path in ("/readyz", "/healthz")}
        assert checks["/readyz"].returncode == 1 and "503 not ready spool: write failed" in checks["/readyz"].stderr
        assert checks["/healthz"].returncode == 0, checks["/healthz"].stderr

        # Meanwhile a client is told to come back, never given a 250 for a message not on disk.
        with smtplib.SMTP("127.0.0.1", relay.port("submission"), timeout=20) as client:
            client.starttls(context=client_tls)
            client.login(USER, PASSWORD)
            client.mail("app@acme.com")
            client.rcpt("full@example.net")
            code, reply = client.data(message("disk full"))
        assert code == 451, reply

        (disk / "filler").unlink()
        assert wait_until(lambda: relay.http("/readyz")[0] == 200, 10)
        submit(relay, client_tls, ["after@example.net"], message("after"))
        assert [m.rcpt_tos for m in sendcloud.wait_for(1)] == [["after@example.net"]]
        relay.stop()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# -- reload ---------------------------------------------------------------------------------------


def _login(relay, client_tls, password: str) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", relay.port("submission"), timeout=20)
    client.starttls(context=client_tls)
    client.login(USER, password)
    return client


def test_reload_changes_password_and_rule_without_dropping_a_session_or_queued_mail(relay, sendcloud, client_tls):
    sendcloud.stop()  # queued mail stays queued across the reload
    queued = submit(relay, client_tls, ["queued@example.net"], message("queued before reload"))
    open_session = _login(relay, client_tls, PASSWORD)
    open_session.mail("app@acme.com")
    assert open_session.rcpt("open@example.net")[0] == 250

    config = relay.config
    config["users"][USER]["password_hash"] = hash_password("new-password")
    config["rules"].insert(0, {"match": {"sender": "news@acme.com"}, "channel": "batch"})
    relay.write_config(config)
    result = relay.cli("reload")
    assert result.returncode == 0 and "reloaded" in result.stdout, result.stdout + result.stderr
    reached = f"on {socket.gethostname()} (pid {relay.process.pid}, config {relay.config_path.resolve()})"
    assert reached in result.stdout  # the relay it reached, so a wrong -c or port shows

    code, _ = open_session.data(message("finished after reload"))  # the session was not dropped
    assert code == 250
    open_session.quit()
    with pytest.raises(smtplib.SMTPAuthenticationError):
        _login(relay, client_tls, PASSWORD)
    with _login(relay, client_tls, "new-password") as client:
        client.sendmail("news@acme.com", ["rule@example.net"], message("new rule"))

    sendcloud.restart()
    assert relay.cli("queue", "flush").returncode == 0
    received = {m.rcpt_tos[0]: m for m in sendcloud.wait_for(3, timeout=20)}
    assert set(received) == {"queued@example.net", "open@example.net", "rule@example.net"}
    assert received["rule@example.net"].login == "acme_batch"  # the new rule routed it
    assert received["queued@example.net"].login == "acme_trigger"
    assert wait_until(lambda: "delivered" in relay.cli("queue", "show", queued).stdout, 10)
    assert value(scrape(relay), "sendcloud_relay_config_reloads_total", result="success") == 1


def test_broken_reload_is_refused_and_the_old_config_keeps_serving(relay, sendcloud, client_tls):
    good = relay.config_path.read_text()
    relay.config_path.write_text(good.replace("max_recipients: 5", "max_recipients: 5\n  max_recipents: 7"))
    result = relay.cli("reload")
    assert result.returncode == 1
    assert "relay.yaml:" in result.stderr and "max_recipents" in result.stderr and "unknown key" in result.stderr

    relay.config_path.write_text(good.replace("cert.pem", "missing-cert.pem"))  # valid YAML, bad TLS file
    relay.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: relay.log().count("config reload refused") == 2, 10)
    assert "server.tls: cannot load missing-cert.pem and key.pem" in relay.log()

    samples = scrape(relay)
    assert value(samples, "sendcloud_relay_config_reloads_total", result="failure") == 2
    assert value(samples, "sendcloud_relay_config_last_reload_successful") == 0
    submit(relay, client_tls, ["still@example.net"], message("old config"))  # old TLS, old password
    assert sendcloud.wait_for(1)[0].rcpt_tos == ["still@example.net"]


def test_sighup_reload_serves_a_new_certificate_to_new_sessions(relay, ca, client_tls, sendcloud, tmp_path):
    before = _login(relay, client_tls, PASSWORD)
    old_cert = before.sock.getpeercert(binary_form=True)
    leaf = ca.issue_cert("127.0.0.1", "localhost", "relay-renewed.test")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    relay.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "config reloaded" in relay.log(), 10)

    after = _login(relay, client_tls, PASSWORD)
    new_cert = after.sock.getpeercert(binary_form=True)
    assert new_cert != old_cert
    assert ("DNS", "relay-renewed.test") in after.sock.getpeercert()["subjectAltName"]
    for client, rcpt in ((before, "before@example.net"), (after, "after@example.net")):
        client.sendmail("app@acme.com", [rcpt], message(rcpt))  # the old session still works
        client.quit()
    assert sorted(m.rcpt_tos[0] for m in sendcloud.wait_for(2)) == ["after@example.net", "before@example.net"]


# -- PROXY protocol -------------------------------------------------------------------------------


def proxy_v1(source: str) -> bytes:
    return f"PROXY TCP4 {source} 127.0.0.1 40000 25\r\n".encode()


def proxy_v2(source: str) -> bytes:
    addresses = socket.inet_aton(source) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", 40000, 25)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


class ProxiedSMTP(smtplib.SMTP):
    """smtplib behind a load balancer: the PROXY header goes out before the greeting is read."""

    def __init__(self, header: bytes, *args, **kwargs):
        self._header = header
        super().__init__(*args, **kwargs)

    def _get_socket(self, host, port, timeout):
        sock = super()._get_socket(host, port, timeout)
        sock.sendall(self._header)
        return sock


def _with_proxy_listener(config: dict) -> None:
    config["server"]["listeners"].append({
        "name": "behind_lb", "bind": "127.0.0.1", "port": free_port(),
        "tls": "starttls", "auth": "optional", "proxy_protocol": {"proxies": ["127.0.0.1/32"]},
    })


@pytest.mark.parametrize("header", [proxy_v1, proxy_v2], ids=["v1", "v2"])
def test_proxy_header_sets_the_client_address_trusted_networks_see(make_relay, sendcloud, client_tls, header):
    relay = make_relay(_with_proxy_listener)
    port = relay.port("behind_lb")

    # The balancer (127.0.0.1) says the client is 127.0.0.2, a trusted network: relayed without AUTH,
    # and still after STARTTLS, which starts a new aiosmtpd session.
    with ProxiedSMTP(header(TRUSTED_SOURCE), "127.0.0.1", port, timeout=20) as client:
        client.starttls(context=client_tls)
        client.sendmail("cron@anywhere.example", ["proxied@example.net"], message("proxied"))
    [received] = sendcloud.wait_for(1)
    assert received.rcpt_tos == ["proxied@example.net"] and received.login == "acme_trigger"
    assert f"client=[{TRUSTED_SOURCE}], listener=behind_lb, user=mailhub" in relay.log()

    # A client the header names as untrusted gets no relay, although the balancer is 127.0.0.1.
    with ProxiedSMTP(header("192.0.2.9"), "127.0.0.1", port, timeout=20) as client:
        client.ehlo()
        client.mail("x@acme.com")
        assert client.rcpt("victim@example.net")[0] == 554
    assert "client=[192.0.2.9], listener=behind_lb, user=-" in relay.log()


def test_proxy_header_from_outside_the_configured_proxies_is_refused(make_relay):
    relay = make_relay(_with_proxy_listener)
    with socket.create_connection(("127.0.0.1", relay.port("behind_lb")), source_address=(TRUSTED_SOURCE, 0),
                                  timeout=10) as sock:
        sock.sendall(proxy_v1(TRUSTED_SOURCE))
        assert sock.recv(100) == b""  # closed without a greeting
    assert "PROXY header from outside proxy_protocol.proxies" in relay.log()


# -- logs -----------------------------------------------------------------------------------------


def test_masked_addresses_and_one_line_per_transaction(make_relay, sendcloud, client_tls):
    relay = make_relay(lambda config: config.update(logging={"mask_addresses": True}))
    queue_id = submit(relay, client_tls, ["someone@example.net"], message("masked"))
    sendcloud.wait_for(1)
    with smtplib.SMTP("127.0.0.1", relay.port("smtp"), timeout=20) as client:
        client.ehlo()
        client.mail("stranger@acme.com")
        assert client.rcpt("victim@example.net")[0] == 554
    assert wait_until(lambda: f"{queue_id}: to=" in relay.log(), 10)
    log = relay.log()
    for address in ("app@acme.com", "someone@example.net", "stranger@acme.com", "victim@example.net"):
        assert address not in log
    lines = [line for line in log.splitlines() if queue_id in line]
    assert len(lines) == 2  # the transaction and the delivery attempt
    assert "from=<a***@acme.com>" in lines[0] and "status=queued" in lines[0]
    assert "to=<s***@example.net>" in lines[1] and "status=sent" in lines[1]
    assert "NOQUEUE: reject=RCPT, client=[127.0.0.1], listener=smtp, user=-, from=<s***@acme.com>, " \
           "to=<v***@example.net>, reason=relay_denied (554 5.7.1 <v***@example.net>: Relay access denied)" in log


def test_json_log_lines_share_the_queue_id(make_relay, sendcloud, client_tls):
    relay = make_relay(lambda config: config.update(logging={"format": "json"}))
    queue_id = submit(relay, client_tls, ["j@example.net"], message("json"))
    sendcloud.wait_for(1)
    assert wait_until(lambda: '"status": "sent"' in relay.log(), 10)
    entries = [json.loads(line) for line in relay.log().splitlines() if line.strip()]  # every line is JSON
    mine = [entry for entry in entries if entry.get("queue_id") == queue_id]
    assert [entry["status"] for entry in mine] == ["queued", "sent"]
    assert mine[0]["from"] == "app@acme.com" and mine[0]["user"] == USER and mine[0]["size"] > 0
    assert mine[1]["to"] == "j@example.net" and mine[1]["detail"].startswith("250")


def _timed_stop(relay) -> float:
    began = time.monotonic()
    assert relay.stop(timeout=60) == 0, relay.log()
    return time.monotonic() - began


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_of_an_idle_relay_does_not_wait_for_the_grace(make_relay, client_tls, processes):
    """No session in a transaction and nothing being delivered: nothing to wait for."""
    relay = make_relay(processes=processes, shutdown_grace="30s")
    idle = _login(relay, client_tls, PASSWORD)  # a session between transactions is told 421, not waited for
    assert idle.noop()[0] == 250
    assert _timed_stop(relay) < 5


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_gives_a_session_and_a_delivery_one_grace_in_total(make_relay, sendcloud, client_tls, processes):
    """A session mid-transaction finishes within the grace; a delivery stuck upstream is not given a second one."""
    grace = 8.0
    relay = make_relay(processes=processes, shutdown_grace=f"{grace:g}s")
    answer = threading.Event()
    sendcloud.data_hook = lambda rcpt_tos: answer.wait(3 * grace) and None  # no reply to the final dot in time
    submit(relay, client_tls, ["stuck@example.net"], message("being delivered"))
    assert wait_until(lambda: sendcloud.data_attempts == 1, 10)
    finishing = _login(relay, client_tls, PASSWORD)
    finishing.mail("app@acme.com")
    assert finishing.rcpt("late@example.net")[0] == 250
    hanging = _login(relay, client_tls, PASSWORD)
    hanging.mail("app@acme.com")
    assert hanging.rcpt("never@example.net")[0] == 250  # and then says nothing more

    began = time.monotonic()
    relay.process.send_signal(signal.SIGTERM)
    time.sleep(1)
    assert finishing.data(message("finished while stopping"))[0] == 250  # inside the grace: accepted
    assert relay.process.wait(4 * grace) == 0, relay.log()
    assert time.monotonic() - began < grace + 4  # one grace, not one for sessions and one for delivery (2 x 8 s)
    relay.process = None
    hanging.close()
    answer.set()
