"""SMTP conversations kept as data: every ``tests/dialogs/*.dialog`` runs against one relay.

A dialog file is a script, one step per line (``#`` starts a comment):

    @listener NAME     connect to that listener (default: smtp); implicit TLS is handled
    @source IP         connect from this local address (127.0.0.2 is the trusted network)
    @starttls          send STARTTLS, expect 220, and wrap the socket in TLS
    @data N            send N bytes of message text in 78-character lines, then the final dot
    @line N            send one line of N octets (CRLF added)
    > LINE             send LINE (CRLF added); a lone `>` sends an empty line
    >e LINE            send LINE with Python's backslash escapes decoded (\\r, \\x00, \\r\\n: several
                       commands in one write, as a pipelining client sends them), CRLF added
    < TEXT             read one reply; its last line must start with TEXT
    <= TEXT            read one reply; its last line must be TEXT
    <* TEXT            read one reply; some line of it must contain TEXT
    <! TEXT            read one reply; no line of it may contain TEXT

A new SMTP behaviour to pin down is a new file, not new code (as chasquid's test/t-12).
"""

from __future__ import annotations

import codecs
import socket
import ssl
from pathlib import Path

import pytest

DIALOGS = sorted((Path(__file__).parents[1] / "dialogs").glob("*.dialog"))


class Conversation:
    def __init__(self, sock: socket.socket, tls: ssl.SSLContext):
        self.sock = sock
        self.tls = tls
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_reply(self) -> list[str]:
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise AssertionError(f"connection closed; reply so far: {lines}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            text = line.decode(errors="replace")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return lines

    def starttls(self) -> None:
        self.send(b"STARTTLS\r\n")
        reply = self.read_reply()
        assert reply[-1].startswith("220"), reply
        self.sock = self.tls.wrap_socket(self.sock, server_hostname="localhost")


def run_dialog(path: Path, relay, tls: ssl.SSLContext) -> None:
    steps = [
        line.rstrip("\n")
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    listener, source = "smtp", "127.0.0.1"
    for step in steps:
        if step.startswith("@listener "):
            listener = step.split()[1]
        elif step.startswith("@source "):
            source = step.split()[1]
    kind = next(item["tls"] for item in relay.config["server"]["listeners"] if item["name"] == listener)
    sock = socket.create_connection(("127.0.0.1", relay.port(listener)), timeout=10, source_address=(source, 0))
    if kind == "implicit":
        sock = tls.wrap_socket(sock, server_hostname="localhost")
    talk = Conversation(sock, tls)
    transcript: list[str] = []
    try:
        for number, step in enumerate(steps, 1):
            if step.startswith(("@listener", "@source")):
                continue
            if step == "@starttls":
                talk.starttls()
                transcript.append("(STARTTLS)")
            elif step.startswith("@data "):
                size = int(step.split()[1])
                line = b"x" * 76 + b"\r\n"
                talk.send(b"Subject: filler\r\n\r\n" + line * (size // len(line) + 1) + b".\r\n")
                transcript.append(f"(sent {size} bytes of data)")
            elif step.startswith("@line "):
                talk.send(b"x" * int(step.split()[1]) + b"\r\n")
                transcript.append(f"(sent a line of {step.split()[1]} octets)")
            elif step.startswith(">e "):
                talk.send(codecs.decode(step[3:], "unicode_escape").encode("latin-1") + b"\r\n")
                transcript.append(step)
            elif step == ">" or step.startswith("> "):
                talk.send(step[2:].encode() + b"\r\n")
                transcript.append(step)
            elif step.startswith(("< ", "<* ", "<! ", "<= ")):
                marker, _, expected = step.partition(" ")
                reply = talk.read_reply()
                transcript.extend("< " + line for line in reply)
                ok = {
                    "<": reply[-1].startswith(expected),
                    "<*": any(expected in line for line in reply),
                    "<!": not any(expected in line for line in reply),
                    "<=": reply[-1] == expected,
                }[marker]
                if not ok:
                    raise AssertionError(
                        f"{path.name} step {number} `{step}` failed.\nTranscript:\n" + "\n".join(transcript)
                    )
            else:
                raise ValueError(f"{path.name}: unknown step {step!r}")
    finally:
        talk.sock.close()


def test_there_are_dialogs():
    assert len(DIALOGS) >= 10


@pytest.fixture(scope="module")
def dialog_relay(tmp_path_factory, ca, ca_file):
    """One relay (and fake SendCloud) for every dialog: they only check replies."""
    from tests.e2e.conftest import KEYS, relay_config
    from tests.support.fake_sendcloud import FakeSendCloud
    from tests.support.relay import RelayProcess

    workdir = tmp_path_factory.mktemp("dialogs")
    with FakeSendCloud(ca, KEYS) as fake:
        # A small max_line_length, so a dialog can go past it; 20 errors (the default) per session.
        config = relay_config(workdir, ca, ca_file, fake.port, max_line_length="4KiB")
        with RelayProcess(workdir, config, env={"SC_TRIGGER_KEY": KEYS["acme_trigger"]}) as relay:
            yield relay


@pytest.mark.parametrize("path", DIALOGS, ids=[path.stem for path in DIALOGS])
def test_dialog(path, dialog_relay, client_tls):
    run_dialog(path, dialog_relay, client_tls)
