"""End to end: mail through a running relay, then SendCloud's signed webhook events for it.

Events are built with SendCloud's documented algorithm (hex HMAC-SHA256 of timestamp + token
under the APP KEY) and posted form-encoded and as JSON to ``events.listen``; what they did is
read back the way operators read it: `queue show --json`, `stats --json`, `suppression list
--json`, RCPT replies, DSNs at the fake SendCloud, and POSTs at a team's endpoint.
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import secrets
import smtplib
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from relay.events import fanout
from tests.e2e.conftest import PASSWORD, USER
from tests.e2e.test_relay import message, submit
from tests.support import free_port
from tests.support.relay import wait_until

APP_KEY = "console-app-key-0123456789"
BATCH_APP_KEY = "batch-app-key-abcdef"
TEAM_SECRET = "billing-team-secret"


def with_events(events_port: int, team_port: int | None = None):
    def patch(config: dict) -> None:
        config["events"] = {"listen": f"127.0.0.1:{events_port}", "app_key": APP_KEY}
        config["accounts"]["acme_batch"]["app_key"] = BATCH_APP_KEY
        config["spool"]["poll_interval"] = "100ms"
        if team_port is not None:
            config["users"][USER]["events_url"] = f"http://127.0.0.1:{team_port}/mail-events"
            config["users"][USER]["events_secret"] = TEAM_SECRET

    return patch


def signed(fields: dict, app_key: str = APP_KEY, timestamp: str | None = None) -> dict:
    """An event as SendCloud sends it: millisecond timestamp, 50-character token, signature."""
    timestamp = timestamp or str(int(time.time() * 1000))
    token = secrets.token_hex(25)
    signature = hmac.new(app_key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()
    return {**fields, "timestamp": timestamp, "token": token, "signature": signature}


def post(port: int, fields: dict, as_json: bool = False, tls=None) -> int:
    if as_json:
        data, kind = json.dumps(fields).encode(), "application/json"
    else:
        data, kind = urllib.parse.urlencode(fields).encode(), "application/x-www-form-urlencoded"
    scheme = "https" if tls else "http"
    request = urllib.request.Request(
        f"{scheme}://127.0.0.1:{port}/webhooks/sendcloud", data=data, headers={"Content-Type": kind}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10, context=tls) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def rcpt_reply(relay, client_tls, address: str) -> tuple[int, bytes]:
    """The RCPT reply an authenticated application gets for ``address``."""
    with smtplib.SMTP("127.0.0.1", relay.port("submission"), timeout=20) as client:
        client.starttls(context=client_tls)
        client.login(USER, PASSWORD)
        client.mail("app@acme.com")
        return client.rcpt(address)


def show(relay, queue_id: str) -> dict:
    result = relay.cli("queue", "show", queue_id, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def delivered(relay, queue_id: str, count: int) -> dict:
    assert wait_until(lambda: all(r["state"] == "delivered" for r in show(relay, queue_id)["recipients"]), 20)
    record = show(relay, queue_id)
    assert len(record["recipients"]) == count
    return record


def events_of(relay, queue_id: str, address: str, count: int) -> dict:
    """The recipient's record once ``count`` events are applied (they are applied after the 200)."""

    def recipient():
        return next(r for r in show(relay, queue_id)["recipients"] if r["address"] == address)

    assert wait_until(lambda: len(recipient()["events"]) >= count, 10), recipient()
    return recipient()


def stats(relay) -> dict:
    result = relay.cli("stats", "-c", str(relay.config_path), "--since", "1d", "--group", "user", "--json")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)["rows"]
    return row


def test_events_show_the_fate_of_each_recipient_in_queue_show_and_stats(make_relay, client_tls):
    port = free_port()
    relay = make_relay(with_events(port))
    queue_id = submit(relay, client_tls, ["one@example.net", "two@example.net"], message("fate"))
    record = delivered(relay, queue_id, 2)
    one, two = record["recipients"]
    assert one["status"] is None and one["events"] == []
    email_id = one["email_id"]
    assert email_id.endswith("0$one@example.net")

    # By emailId, form-encoded and JSON; the newer spelling of deliver too.
    base = {"apiUser": "acme_trigger", "emailId": email_id, "recipient": "one@example.net"}
    assert post(port, signed({**base, "event": "delivered", "outIp": "10.1.2.3"})) == 200
    assert post(port, signed({**base, "event": "open", "ip": "203.0.113.9"}), as_json=True) == 200
    assert post(port, signed({**base, "event": "open", "ip": "203.0.113.9"})) == 200
    # By SC-Custom-Relay-Id + recipient (no emailId): userHeaders as SendCloud echoes them.
    headers = json.dumps({"SC-Custom-Relay-Id": queue_id, "SC-Custom-Relay-User": USER})
    assert (
        post(
            port,
            signed(
                {
                    "event": "invalid",
                    "apiUser": "acme_trigger",
                    "recipient": "two@example.net",
                    "userHeaders": headers,
                    "subStat": "406",
                    "subStatDesc": "address does not exist",
                }
            ),
            as_json=True,
        )
        == 200
    )

    one = events_of(relay, queue_id, "one@example.net", 3)
    assert one["status"] == "delivered"
    assert [e["event"] for e in one["events"]] == ["deliver", "open", "open"]
    assert one["events"][0]["ip"] == "10.1.2.3" and one["events"][1]["ip"] == "203.0.113.9"
    two = events_of(relay, queue_id, "two@example.net", 1)
    assert two["status"] == "invalid" and two["state"] == "delivered"
    assert two["events"][0] | {"time": None} == {
        "event": "invalid",
        "time": None,
        "subStat": "406",
        "subStatDesc": "address does not exist",
    }

    row = stats(relay)
    assert row["user"] == USER
    assert {key: row[key] for key in ("requested", "delivered", "invalid", "open", "unique_open", "click")} == {
        "requested": 2,
        "delivered": 1,
        "invalid": 1,
        "open": 2,
        "unique_open": 1,
        "click": 0,
    }
    assert row["delivered_rate"] == 0.5 and row["open_rate"] == 1.0

    status, text = relay.http("/metrics")
    assert status == 200
    assert 'sendcloud_relay_events_total{account="acme_trigger",event="open"} 2.0' in text
    assert 'sendcloud_relay_events_total{account="acme_trigger",event="invalid"} 1.0' in text

    # The invalid address is now suppressed relay-wide, for every channel.
    listed = json.loads(relay.cli("suppression", "list", "--json", "-c", str(relay.config_path)).stdout)
    assert [(e["address"], e["reason"], e["channels"], e["account"]) for e in listed] == [
        ("two@example.net", "invalid", ["batch", "trigger"], None)
    ]


def test_unsigned_stale_and_duplicate_events_change_nothing(make_relay, client_tls):
    port = free_port()
    relay = make_relay(with_events(port))
    queue_id = submit(relay, client_tls, ["one@example.net"], message("checks"))
    email_id = delivered(relay, queue_id, 1)["recipients"][0]["email_id"]
    event = {"event": "deliver", "apiUser": "acme_trigger", "emailId": email_id, "recipient": "one@example.net"}

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/webhooks/sendcloud", timeout=10) as probe:
        assert probe.status == 200
    assert post(port, {"hello": "probe"}) == 200  # SendCloud's URL probe: no event field
    assert post(port, signed(event, app_key="not-the-key")) == 403
    assert post(port, signed(event, app_key=BATCH_APP_KEY)) == 403  # another account's key
    assert post(port, {k: v for k, v in signed(event).items() if k != "signature"}) == 403
    stale = str(int((time.time() - 2 * 3600) * 1000))
    assert post(port, signed(event, timestamp=stale)) == 403
    assert post(port, signed({**event, "apiUser": "acme_batch"}, app_key=BATCH_APP_KEY), as_json=True) == 200

    once = signed({**event, "event": "open"})
    assert post(port, once) == 200
    assert post(port, once) == 200  # SendCloud's retry: same token
    assert post(port, {**once, "token": secrets.token_hex(25), "signature": "x"}) == 403
    retried = signed({**event, "event": "open"}, timestamp=once["timestamp"])  # new token, same event and time
    assert post(port, retried, as_json=True) == 200
    recipient = events_of(relay, queue_id, "one@example.net", 2)
    time.sleep(1)  # anything wrongly applied would have landed by now
    assert [e["event"] for e in show(relay, queue_id)["recipients"][0]["events"]] == ["deliver", "open"]
    assert recipient["status"] == "delivered"
    assert post(port, signed({"event": "deliver", "apiUser": "acme_trigger", "emailId": "nobody$x@y.z"})) == 200
    assert wait_until(lambda: "matches no message the relay knows" in relay.log(), 10)
    assert APP_KEY not in relay.log() and BATCH_APP_KEY not in relay.log()


def test_suppressed_recipients_are_refused_at_rcpt_and_failed_after_routing(
    make_relay, client_tls, sendcloud, tmp_path
):
    relay = make_relay(with_events(free_port()))
    config = ["-c", str(relay.config_path)]
    csv_file = tmp_path / "list.csv"
    csv_file.write_text("address,reason,account,expires,channels\nnews-off@example.net,unsubscribe,,,batch\n")
    assert relay.cli("suppression", "import", str(csv_file), *config).returncode == 0
    # Added last: once the relay refuses it, its snapshot holds the import too.
    assert relay.cli("suppression", "add", "Gone@Example.net", *config).returncode == 0

    def rcpt(address: str) -> tuple[int, bytes]:
        return rcpt_reply(relay, client_tls, address)

    assert wait_until(lambda: rcpt("gone@example.net")[0] == 550, 5)
    code, text = rcpt("gone@example.net")
    day = time.strftime("%Y-%m-%d", time.gmtime())
    assert (code, text.decode()) == (550, f"5.1.1 <gone@example.net>: suppressed (manual {day})")
    assert rcpt("news-off@example.net")[0] == 250  # the trigger channel may still carry it

    # Routed to batch (the newsletter rule): the batch-suppressed recipient fails at once, with a DSN.
    queue_id = submit(
        relay,
        client_tls,
        ["news-off@example.net", "reader@example.net"],
        message("news", extra_headers="X-Mail-Type: newsletter\r\n"),
    )
    assert wait_until(lambda: all(r["state"] != "queued" for r in show(relay, queue_id)["recipients"]), 20)
    off, reader = show(relay, queue_id)["recipients"]
    assert (
        off["state"] == "failed"
        and off["last_reply"] == f"550 5.1.1 <news-off@example.net>: suppressed (unsubscribe {day})"
    )
    assert reader["state"] == "delivered"
    arrived = sendcloud.wait_for(2)
    assert ["reader@example.net"] in [m.rcpt_tos for m in arrived]
    dsn = next(m for m in arrived if m.rcpt_tos == ["app@acme.com"])
    assert b"news-off@example.net" in dsn.data and b"suppressed (unsubscribe" in dsn.data
    assert "news-off@example.net" not in [a for m in arrived for a in m.rcpt_tos]

    assert relay.cli("suppression", "remove", "gone@example.net", *config).returncode == 0
    assert wait_until(lambda: rcpt("gone@example.net")[0] == 250, 5)


class TeamEndpoint:
    """A team's events_url: records every POST whose X-Relay-Signature checks out."""

    def __init__(self, port: int):
        self.port = port
        self.received: list[dict] = []
        self.server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> None:
        team = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if fanout.verify(self.headers.get("X-Relay-Signature", ""), TEAM_SECRET.encode(), body, time.time()):
                    team.received.append(json.loads(body))
                    self.send_response(204)
                else:
                    self.send_response(401)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def team():
    endpoint = TeamEndpoint(free_port())
    yield endpoint
    endpoint.stop()


def test_a_team_endpoint_that_is_down_gets_every_event_once_back_also_after_a_restart(
    make_relay, client_tls, team, sendcloud
):
    port = free_port()
    relay = make_relay(with_events(port, team.port))
    sendcloud.rcpt_replies["bad@example.net"] = "550 5.1.1 no such user"  # failed by the relay: a "failed" event
    queue_id = submit(relay, client_tls, ["one@example.net", "bad@example.net"], message("team"))
    assert wait_until(lambda: all(r["state"] != "queued" for r in show(relay, queue_id)["recipients"]), 20)
    email_id = show(relay, queue_id)["recipients"][0]["email_id"]
    base = {"apiUser": "acme_trigger", "emailId": email_id, "recipient": "one@example.net"}
    sent = [signed({**base, "event": name}) for name in ("deliver", "open", "click")]
    for fields in sent:
        assert post(port, fields) == 200
    assert wait_until(lambda: relay.log().count("try 2 again") >= 4, 15), relay.log()  # the team is down

    relay.stop()
    relay.start()
    team.start()
    assert wait_until(lambda: len(team.received) >= 4, 40), relay.log()
    got = {item["event"]: item for item in team.received}
    assert sorted(got) == ["click", "deliver", "failed", "open"]
    assert got["failed"]["recipient"] == "bad@example.net" and got["failed"]["details"]["reply"].startswith("550")
    assert len({item["id"] for item in team.received}) == len(team.received)
    deliver = got["deliver"]
    assert (deliver["queue_id"], deliver["recipient"], deliver["user"], deliver["account"], deliver["channel"]) == (
        queue_id,
        "one@example.net",
        USER,
        "acme_trigger",
        "trigger",
    )
    assert deliver["email_id"] == email_id and deliver["timestamp"] == int(sent[0]["timestamp"])
    assert TEAM_SECRET not in relay.log()


def test_acceptor_processes_refuse_suppressed_recipients_too(make_relay, client_tls):
    relay = make_relay(with_events(free_port()), processes=2)
    assert (
        relay.cli(
            "suppression", "add", "gone@example.net", "--reason", "report_spam", "-c", str(relay.config_path)
        ).returncode
        == 0
    )

    # Every acceptor keeps its own snapshot: a few connections reach both of them.
    assert wait_until(lambda: all(rcpt_reply(relay, client_tls, "gone@example.net")[0] == 550 for _ in range(6)), 10)


def test_the_receiver_serves_https_with_events_tls(make_relay, client_tls):
    port = free_port()

    def patch(config: dict) -> None:
        with_events(port)(config)
        config["events"]["tls"] = {"cert": "cert.pem", "key": "key.pem"}

    relay = make_relay(patch)
    queue_id = submit(relay, client_tls, ["one@example.net"], message("https"))
    email_id = delivered(relay, queue_id, 1)["recipients"][0]["email_id"]
    event = {"event": "deliver", "apiUser": "acme_trigger", "emailId": email_id, "recipient": "one@example.net"}
    assert post(port, signed(event), tls=client_tls) == 200
    assert events_of(relay, queue_id, "one@example.net", 1)["status"] == "delivered"
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        post(port, signed(event))  # no plaintext on a TLS receiver
