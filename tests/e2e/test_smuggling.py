"""SMTP smuggling: no line-ending trick inside one DATA ever becomes a second message upstream.

Each variant puts a "lenient" end-of-data sequence in the middle of a DATA, followed by the
commands of a second transaction to another recipient, then ends the DATA properly. The relay
must answer exactly one ``250``, forward exactly one message (to the real recipient) with every
line ending normalised to CRLF, and keep the smuggled text as body lines, which its SMTP client
dot-stuffs upstream. See docs/security.md.
"""

from __future__ import annotations

import re

import pytest

from tests.e2e.conftest import KEYS, TRUSTED_SOURCE, relay_config
from tests.e2e.test_limits import closed_by_server, connect, say
from tests.support.fake_sendcloud import FakeSendCloud
from tests.support.relay import RelayProcess, wait_until

VARIANTS = {
    "lf_dot_lf": b"\n.\n",
    "crlf_dot_lf": b"\r\n.\n",
    "lf_dot_crlf": b"\n.\r\n",
    "cr_dot_cr": b"\r.\r",
    "crlf_dot_cr": b"\r\n.\r",
    "cr_dot_crlf": b"\r.\r\n",
    "lf_dot_cr": b"\n.\r",
    "cr_dot_lf": b"\r.\n",
    "crlf_dot_crlf_dot_lf": b"\r\n..\n",
}


@pytest.fixture(scope="module")
def smuggling_relay(tmp_path_factory, ca, ca_file):
    workdir = tmp_path_factory.mktemp("smuggling")
    with FakeSendCloud(ca, KEYS) as fake:
        config = relay_config(workdir, ca, ca_file, fake.port, data_timeout="2s")
        with RelayProcess(workdir, config, env={"SC_TRIGGER_KEY": KEYS["acme_trigger"]}) as relay:
            yield relay, fake


@pytest.mark.parametrize("name, separator", VARIANTS.items(), ids=VARIANTS.keys())
def test_one_data_is_one_message_upstream(smuggling_relay, name, separator):
    relay, fake = smuggling_relay
    talk = connect(relay, source=TRUSTED_SOURCE)
    talk.read_reply()
    for command in ("EHLO x", "MAIL FROM:<a@acme.com>", f"RCPT TO:<{name}@example.net>"):
        assert say(talk, command).startswith("250")
    assert say(talk, "DATA").startswith("354")
    smuggled = (
        f"Subject: smuggle {name}\r\n\r\nfirst part".encode() + separator
        + b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
        + f"Subject: second {name}\r\n\r\nsmuggled\r\n".encode()
    )
    talk.send(smuggled + b".\r\n")
    assert talk.read_reply()[-1].startswith("250 2.0.0 Ok: queued as")
    assert say(talk, "NOOP").startswith("250")  # nothing left over that reads as a command
    assert say(talk, "QUIT").startswith("221")

    def arrived():
        return [m for m in fake.messages if f"Subject: smuggle {name}\r\n".encode() in m.data]

    assert wait_until(lambda: arrived(), 10)
    [message] = arrived()
    assert message.rcpt_tos == [f"{name}@example.net"]
    assert not re.search(rb"\r(?!\n)|(?<!\r)\n", message.data)  # only CRLF line endings
    assert b"\r\nMAIL FROM:<evil@example.org>\r\n" in message.data  # a body line, not a command
    assert not any("victim@example.net" in m.rcpt_tos for m in fake.messages)


def test_a_lenient_terminator_alone_never_ends_data(smuggling_relay):
    """A client relying on `\\n.\\n` to end DATA waits until data_timeout; nothing is queued."""
    relay, fake = smuggling_relay
    talk = connect(relay, source=TRUSTED_SOURCE)
    talk.read_reply()
    for command in ("EHLO x", "MAIL FROM:<a@acme.com>", "RCPT TO:<lenient@example.net>"):
        assert say(talk, command).startswith("250")
    assert say(talk, "DATA").startswith("354")
    talk.send(b"Subject: lenient\n\nbody\n.\nQUIT\n")
    assert talk.read_reply()[-1].startswith("421 4.4.2")
    assert closed_by_server(talk)
    assert not any(b"lenient" in m.data for m in fake.messages)


def test_a_long_bare_lf_message_from_a_legacy_app_is_accepted(smuggling_relay):
    """PHP's mail() and old Java send only LF: 6 KB of such lines are short lines, not one
    line "too long"; they arrive upstream with CRLF, a leading dot intact."""
    relay, fake = smuggling_relay
    before = len(fake.messages)
    talk = connect(relay, source=TRUSTED_SOURCE)
    talk.read_reply()
    for command in ("EHLO legacy", "MAIL FROM:<a@acme.com>", "RCPT TO:<legacy@example.net>"):
        assert say(talk, command).startswith("250")
    assert say(talk, "DATA").startswith("354")
    lines = [f"line {number:03d} of a report from a legacy application".encode() for number in range(120)]
    talk.send(b"Subject: bare LF only\n\n" + b"\n".join(lines) + b"\n.leading dot after LF\n\r\n.\r\n")
    assert talk.read_reply()[-1].startswith("250 2.0.0 Ok: queued as")
    say(talk, "QUIT")
    [received] = fake.wait_for(before + 1)[before:]
    body = received.data.split(b"\r\n\r\n", 1)[1]
    assert b"\n" not in body.replace(b"\r\n", b"")
    assert body.startswith(b"\r\n".join(lines[:3]))
    assert b"\r\n.leading dot after LF\r\n" in body  # only CRLF starts an SMTP line: not unstuffed
