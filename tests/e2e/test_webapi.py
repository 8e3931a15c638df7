"""HTTP submission end to end: a service posts SendCloud's ``apiv2/mail/send`` form to a running
relay and the message arrives at the fake SendCloud through the team's account and routing."""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import json
import smtplib
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest

from relay.policy.auth import hash_password
from tests.e2e.conftest import PASSWORD, USER, relay_config
from tests.support import free_port
from tests.support.relay import RelayProcess, wait_for_port, wait_until

API_KEY = "team-billing-api-key-0123456789"
SUBJECT = "账单通知：十一月 — 您的发票已开具"
BIG = 5 * 1024 * 1024


def with_http_api(**users_patch):
    def patch(config: dict) -> None:
        config["http_api"] = {"listen": f"127.0.0.1:{free_port()}"}
        config["server"]["max_message_size"] = "16MiB"
        config["server"]["max_recipients"] = 150
        config["users"][USER]["api_keys"] = [hash_password("another-key"), hash_password(API_KEY)]
        config["users"][USER].update(users_patch)
    return patch


def post(relay, fields: dict, files: list[tuple[str, str, bytes]] = (), path="/apiv2/mail/send") -> tuple[int, dict]:
    """POST ``fields`` (urlencoded, or multipart when there are files) and return (status, JSON)."""
    listen = relay.config["http_api"]["listen"]
    host, _, port = listen.rpartition(":")
    assert wait_for_port(host, int(port), 10, relay.process)  # it serves just after the SMTP listeners
    url = f"http://{listen}{path}"
    if files:
        boundary = uuid.uuid4().hex
        parts = []
        for name, value in fields.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n'
                         f"Content-Type: text/plain; charset=utf-8\r\n\r\n{value}\r\n".encode())
        for filename, content_type, data in files:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="attachments"; filename="{filename}"\r\n'
                         f"Content-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        content_type = f"multipart/form-data; boundary={boundary}"
    else:
        body = urllib.parse.urlencode(fields).encode()
        content_type = "application/x-www-form-urlencoded"
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def form(**overrides) -> dict:
    fields = {"apiUser": USER, "apiKey": API_KEY, "from": "billing@info.acme.com", "fromName": "账单中心",
              "to": "alice@example.net", "subject": SUBJECT, "plain": "您好，附件是发票。\n", "html": "<p>您好</p>"}
    fields.update(overrides)
    return {name: value for name, value in fields.items() if value is not None}


def parsed(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def test_a_form_request_is_routed_and_delivered_like_smtp(make_relay, sendcloud):
    relay = make_relay(with_http_api())
    status, answer = post(relay, form(to="alice@example.net;bob@example.net", cc="carol@example.net", labelId="42"))
    assert status == 200, answer
    assert answer["result"] is True and answer["message"] == "请求成功"
    queue_id = answer["info"]["queueId"]
    assert answer["info"]["emailIdList"] == [f"{queue_id}.0$alice@example.net", f"{queue_id}.1$bob@example.net",
                                             f"{queue_id}.2$carol@example.net"]
    [received] = sendcloud.wait_for(1)
    assert received.login == "acme_trigger#42"  # the team's trigger account, the request's label
    assert received.mail_from == "billing@info.acme.com"
    assert received.rcpt_tos == ["alice@example.net", "bob@example.net", "carol@example.net"]
    message = parsed(received.data)
    assert message["Subject"] == SUBJECT and message["From"].addresses[0].display_name == "账单中心"
    assert message.get_body(("plain",)).get_content() == "您好，附件是发票。\r\n"  # MIME canonical line ends
    assert message.get_body(("html",)).get_content() == "<p>您好</p>\r\n"
    assert message["SC-Custom-Relay-Id"] == queue_id  # the same marker an SMTP submission gets
    assert API_KEY not in relay.log()


def test_a_multipart_request_with_a_5mb_attachment_arrives_byte_for_byte(make_relay, sendcloud):
    relay = make_relay(with_http_api())
    attachment = hashlib.sha256(b"seed").digest() * (BIG // 32) + b"tail"
    status, answer = post(relay, form(to="a@example.net;b@example.net;c@example.net;d@example.net"),
                          files=[("发票.pdf", "application/pdf", attachment)])
    assert status == 200, answer
    [received] = sendcloud.wait_for(1, timeout=60)
    assert received.login == "acme_batch"  # four recipients: the recipients_more_than rule routes to batch
    message = parsed(received.data)
    assert message["Subject"] == SUBJECT
    [part] = list(message.iter_attachments())
    assert part.get_filename() == "发票.pdf" and part.get_content_type() == "application/pdf"
    assert part.get_content() == attachment


def test_a_bad_key_is_401_and_repeated_failures_lock_out_with_429(make_relay, sendcloud):
    relay = make_relay(with_http_api(), auth_lockout_failures=3, auth_lockout_duration="1m")
    for _ in range(3):
        status, answer = post(relay, form(apiKey="wrong"))
        assert (status, answer["result"], answer["statusCode"]) == (401, False, 401)
    status, answer = post(relay, form())  # the right key, but the user is locked out now
    assert (status, answer["statusCode"]) == (429, 429) and "Too many failed logins" in answer["message"]
    # the same guard as SMTP AUTH: the SMTP login of that user from this address is refused too
    with smtplib.SMTP("127.0.0.1", relay.port("submission"), timeout=10) as client:
        client.starttls(context=_insecure())
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.login(USER, PASSWORD)
        assert refused.value.smtp_code == 454
    assert sendcloud.messages == []
    assert "apiKey" not in relay.log() and API_KEY not in relay.log()


def _insecure() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def test_more_than_100_recipients_go_in_two_upstream_transactions(make_relay, sendcloud):
    relay = make_relay(with_http_api())
    to = [f"r{n:03}@example.net" for n in range(100)]
    cc = [f"c{n:03}@example.net" for n in range(20)]
    status, answer = post(relay, form(to=";".join(to), cc=";".join(cc)))
    assert status == 200, answer
    assert len(answer["info"]["emailIdList"]) == 120
    received = sendcloud.wait_for(2)
    assert sorted(len(message.rcpt_tos) for message in received) == [20, 100]
    assert sorted(address for message in received for address in message.rcpt_tos) == sorted(to + cc)
    status, answer = post(relay, form(to=";".join(f"x{n}@example.net" for n in range(101))))
    assert status == 400 and "at most 100" in answer["message"]


def test_xsmtpapi_to_is_one_message_whose_header_lists_its_recipients(make_relay, sendcloud):
    relay = make_relay(with_http_api())
    xsmtpapi = {"to": ["a@example.net", "b@example.net"], "sub": {"%name%": ["阿", "Bee"]}}
    status, answer = post(relay, form(to="ignored@example.net", xsmtpapi=json.dumps(xsmtpapi, ensure_ascii=False)))
    assert status == 200, answer
    assert [item.split("$")[1] for item in answer["info"]["emailIdList"]] == ["a@example.net", "b@example.net"]
    [received] = sendcloud.wait_for(1)
    assert received.rcpt_tos == ["a@example.net", "b@example.net"]
    header = parsed(received.data)["X-SMTPAPI"]
    assert json.loads(base64.b64decode(header))["to"] == ["a@example.net", "b@example.net"]


def test_sender_suppression_and_rate_limits_apply_as_for_smtp(make_relay, sendcloud):
    relay = make_relay(with_http_api(rate_limit="3/hour"))
    status, answer = post(relay, form(**{"from": "someone@elsewhere.org"}))
    assert (status, answer["statusCode"]) == (403, 403)
    status, answer = post(relay, form(to="a@example.net;b@example.net;c@example.net"))
    assert status == 200, answer
    status, answer = post(relay, form(to="d@example.net"))  # the 3/hour budget is spent
    assert (status, answer["statusCode"]) == (429, 429) and "Rate limit" in answer["message"]
    # Suppression is judged before the budget, as at RCPT: once the cache has the entry, 400.
    assert relay.cli("suppression", "add", "gone@example.net", "-c", str(relay.config_path)).returncode == 0
    assert wait_until(lambda: post(relay, form(to="gone@example.net"))[0] == 400, 5)
    status, answer = post(relay, form(to="gone@example.net"))
    assert "suppressed" in answer["message"]
    assert len(sendcloud.wait_for(1)) == 1


def test_templates_are_unavailable_and_oversize_is_413(make_relay):
    relay = make_relay(with_http_api())
    status, answer = post(relay, form(), path="/apiv2/mail/sendtemplate")
    assert status == 400 and "not available" in answer["message"]
    status, answer = post(relay, form(), files=[("big.bin", "application/octet-stream", b"x" * (16 * 1024 * 1024 + 1))])
    assert (status, answer["statusCode"]) == (413, 413)
    status, answer = post(relay, form(), path="/apiv2/send")  # the older path
    assert status == 200, answer


def test_send_test_http_posts_a_test_message_and_prints_the_answer(make_relay, sendcloud):
    relay = make_relay(with_http_api())
    post(relay, form(apiKey="wrong"))  # waits for the port; one failure does not lock out
    result = relay.cli("send-test", "--http", "--server", relay.config["http_api"]["listen"], "--user", USER,
                       "--password", API_KEY, "--from", "app@info.acme.com", "--to", "ops@example.net")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("HTTP 200\n")
    answer = json.loads(result.stdout.split("\n", 1)[1])
    assert answer["result"] is True and answer["info"]["emailIdList"] == [f"{answer['info']['queueId']}.0$ops@example.net"]
    [received] = sendcloud.wait_for(1)
    assert received.rcpt_tos == ["ops@example.net"] and received.mail_from == "app@info.acme.com"
    bad = relay.cli("send-test", "--http", "--server", relay.config["http_api"]["listen"], "--user", USER,
                    "--password", "nope", "--from", "app@info.acme.com")
    assert bad.returncode == 1 and bad.stdout.startswith("HTTP 401\n")


def test_an_http_api_port_in_use_stops_the_start_before_anything_serves(tmp_path, ca, ca_file, sendcloud):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        config = relay_config(tmp_path, ca, ca_file, sendcloud.port)
        config["http_api"] = {"listen": f"127.0.0.1:{busy}"}
        relay = RelayProcess(tmp_path, config, env={"SC_TRIGGER_KEY": "x"})
        result = subprocess.run([sys.executable, "-m", "relay", "serve", "-c", str(relay.config_path)], cwd=tmp_path,
                                env=relay.env, check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"fatal: cannot listen on 127.0.0.1:{busy} (http_api.listen): "), result.stderr


def test_with_acceptor_processes_the_main_process_serves_http_api(make_relay, sendcloud):
    relay = make_relay(with_http_api(), processes=2)
    status, answer = post(relay, form(to="alice@example.net"))
    assert status == 200, answer
    [received] = sendcloud.wait_for(1)
    assert received.rcpt_tos == ["alice@example.net"] and parsed(received.data)["Subject"] == SUBJECT
