"""Fuzzing the live relay: random command lines, and random SMTP sessions driven by a
hypothesis state machine that knows what each reply must be.

Both run against one relay process (and a fake SendCloud) for the module. Every reply must be a
well-formed SMTP reply with the code the model expects; every message that got ``250`` must
arrive upstream exactly once; and the process must still be serving at the end.
"""

from __future__ import annotations

import base64
import re
import socket
import ssl
import threading

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.e2e.conftest import KEYS, PASSWORD, TRUSTED_SOURCE, USER, relay_config
from tests.e2e.test_dialogs import Conversation
from tests.support.fake_sendcloud import FakeSendCloud
from tests.support.relay import RelayProcess, wait_until

REPLY = re.compile(r"^[2-5]\d\d[ -]")
TOKEN = re.compile(rb"Subject: (fuzz-\d+)")
MAX_RECIPIENTS = 5


@pytest.fixture(scope="module")
def live(tmp_path_factory, ca, ca_file):
    workdir = tmp_path_factory.mktemp("fuzz")
    with FakeSendCloud(ca, KEYS) as fake:
        config = relay_config(
            workdir, ca, ca_file, fake.port,
            # Thousands of deliberate bad logins: keep their delay at 1 ms and never lock out.
            auth_failure_delay="1ms", auth_failure_window="1ms", auth_lockout_failures=1_000_000,
            max_connections_per_address=1000, idle_timeout="20s",
            # The model does not count error replies; server.max_errors is tested in e2e/test_smtp_hardening.
            max_errors=1_000_000,
        )
        with RelayProcess(workdir, config, env={"SC_TRIGGER_KEY": KEYS["acme_trigger"]}) as relay:
            yield relay, fake


def well_formed(lines: list[str]) -> None:
    assert lines and all(REPLY.match(line) or len(line) == 3 for line in lines), lines
    codes = {line[:3] for line in lines}
    assert len(codes) == 1, lines  # a multi-line reply keeps one code


def open_session(relay, source: str = "127.0.0.1", listener: str = "smtp") -> Conversation:
    sock = socket.create_connection(("127.0.0.1", relay.port(listener)), timeout=10, source_address=(source, 0))
    return Conversation(sock, tls=None)


# -- any command line ---------------------------------------------------------------------------------

command_lines = st.one_of(
    st.binary(max_size=700).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.tuples(
        st.sampled_from([b"EHLO", b"HELO", b"MAIL FROM:", b"RCPT TO:", b"AUTH", b"AUTH PLAIN", b"AUTH LOGIN", b"VRFY",
                         b"NOOP", b"RSET", b"STARTTLS", b"HELP", b"EXPN", b"DATA", b"BDAT", b"mail from:<", b"QUIT"]),
        st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    ).map(lambda pair: pair[0] + pair[1]),
)


@given(st.lists(command_lines, min_size=1, max_size=6))
@example([b"MAIL FROM:<a@acme.com> SIZE=99999999999999999999999999"])
@example([b"AUTH PLAIN =", b"AUTH LOGIN \xff"])
@example([b"EHLO x", b"MAIL FROM:<\xc3\xa9@acme.com> SMTPUTF8"])
@example([b"RCPT TO:<" + b"a" * 600 + b"@example.net>"])
@example([b"X"] * 6)  # aiosmtpd says 502 and hangs up after five unknown commands
def test_any_command_lines_get_well_formed_replies(live, lines):
    relay, _ = live
    talk = open_session(relay, source=TRUSTED_SOURCE)
    try:
        well_formed(talk.read_reply())
        for line in lines:
            talk.send(line + b"\r\n")
            reply = talk.read_reply()
            well_formed(reply)
            assert not reply[-1].startswith("5") or not reply[-1][4:].startswith("Error: ("), reply  # no leaked exception
            if reply[-1].startswith(("220", "221", "354", "421", "502 5.5.1 Too many")):
                break  # TLS handshake, goodbye, or message text expected next: not a command line
    finally:
        talk.sock.close()


# -- random sessions --------------------------------------------------------------------------------

senders = st.sampled_from(["app@acme.com", "billing@info.acme.com", "evil@other.example", "", "x@y"])
recipients = st.sampled_from(["to@example.net", "two@example.org", "nodomain", "user@localhost", "x@example.net"])
bodies = st.lists(
    st.sampled_from([b"line", b"\r\n", b"\n", b"\r", b".", b"..", b"\n.\n", b"\r\n.\n", b"\r.\r", b"From: a", b" "]),
    max_size=20,
).map(b"".join)


class SMTPSessions(RuleBasedStateMachine):
    """One client at a time against the live relay; the model says what each reply must be."""

    live: tuple[RelayProcess, FakeSendCloud]
    tls: ssl.SSLContext
    accepted: set[str] = set()
    sessions = 0
    commands = 0
    tokens = iter(range(10**9))
    lock = threading.Lock()

    def __init__(self):
        super().__init__()
        self.talk: Conversation | None = None

    # -- model state
    def _reset_session(self):
        self.greeted = False  # EHLO or HELO seen since connect / STARTTLS
        self.esmtp = False
        self.tls = False
        self.user = None  # who owns the mail: mailhub (trusted) or billing (AUTH)
        self._reset_transaction()
        self.bogus = 0

    def _reset_transaction(self):
        self.mail = False
        self.rcpts = 0

    def _say(self, line: bytes) -> list[str]:
        SMTPSessions.commands += 1
        self.talk.send(line + b"\r\n")
        reply = self.talk.read_reply()
        well_formed(reply)
        return reply

    def _expect(self, line: bytes, code: str) -> list[str]:
        reply = self._say(line)
        assert reply[-1].startswith(code), (line, reply, vars(self))
        return reply

    def _close(self):
        self.talk.sock.close()
        self.talk = None

    @initialize(trusted=st.booleans())
    def connect(self, trusted):
        relay, _ = self.live
        self.talk = open_session(relay, source=TRUSTED_SOURCE if trusted else "127.0.0.1")
        SMTPSessions.sessions += 1
        self.trusted = trusted
        self._reset_session()
        self.user = "mailhub" if trusted else None
        assert self.talk.read_reply()[-1].startswith("220")

    def teardown(self):
        if self.talk is not None:
            self._close()

    @invariant()
    def connected(self):
        assert self.talk is not None

    @rule(name=st.sampled_from(["client.example", "x", "[127.0.0.1]"]), extended=st.booleans())
    def hello(self, name, extended):
        reply = self._expect(f"{'EHLO' if extended else 'HELO'} {name}".encode(), "250")
        if extended and not self.tls:
            assert any("STARTTLS" in line for line in reply)
        self.greeted, self.esmtp = True, extended
        self._reset_transaction()

    @precondition(lambda self: not self.tls and self.esmtp)
    @rule()
    def starttls(self):
        self._expect(b"STARTTLS", "220")
        self.talk.sock = self.tls_context.wrap_socket(self.talk.sock, server_hostname="localhost")
        user = self.user if self.trusted else None
        self._reset_session()
        self.tls, self.user = True, user

    @rule(good=st.booleans())
    def auth(self, good):
        blob = base64.b64encode(f"\0{USER}\0{PASSWORD if good else 'wrong'}".encode()).decode()
        reply = self._say(f"AUTH PLAIN {blob}".encode())
        if not self.greeted or not self.esmtp:
            assert reply[-1][:3] in ("503", "500"), reply
        elif not self.tls:
            assert reply[-1].startswith("538 5.7.11"), reply
        elif self.user == USER:
            assert reply[-1].startswith("503"), reply  # already authenticated
        elif self.mail:
            # RFC 4954: not inside a transaction (found by this machine: the MAIL FROM of an
            # unidentified session was never checked, and would have been sent as the user).
            assert reply[-1].startswith("503 5.5.1"), reply
        elif good:
            assert reply[-1].startswith("235"), reply
            self.user = USER
        else:
            assert reply[-1].startswith("535 5.7.8"), reply

    @rule(sender=senders)
    def mail_from(self, sender):
        reply = self._say(f"MAIL FROM:<{sender}>".encode())
        if not self.greeted:
            assert reply[-1].startswith("503"), reply
        elif self.mail:
            assert reply[-1].startswith("503"), reply  # nested MAIL
        elif self.user == USER and sender and not sender.lower().endswith(("@acme.com", ".acme.com")):
            assert reply[-1].startswith("553 5.7.1"), reply
        else:
            assert reply[-1].startswith("250"), reply
            self.mail = True

    @rule(recipient=recipients)
    def rcpt_to(self, recipient):
        reply = self._say(f"RCPT TO:<{recipient}>".encode())
        valid = "@" in recipient and "." in recipient.split("@")[1]
        if not self.mail:
            assert reply[-1].startswith("503"), reply
        elif self.user is None:
            assert reply[-1].startswith("554 5.7.1"), reply  # never an open relay
        elif not valid:
            assert reply[-1].startswith("501 5.1.3"), reply
        elif self.rcpts >= MAX_RECIPIENTS:
            assert reply[-1].startswith("452 4.5.3"), reply
        else:
            assert reply[-1].startswith("250"), reply
            self.rcpts += 1

    @rule(body=bodies)
    def data(self, body):
        reply = self._say(b"DATA")
        if not self.mail or not self.rcpts:
            assert reply[-1].startswith("503"), reply
            return
        assert reply[-1].startswith("354"), reply
        with self.lock:
            token = f"fuzz-{next(self.tokens)}"
        content = f"Subject: {token}\r\n\r\n".encode() + body
        if not content.endswith(b"\r\n"):
            content += b"\r\n"
        # Dot-stuffing as a correct client does it: on CRLF-delimited lines only.
        lines = content[:-2].split(b"\r\n")
        stuffed = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines) + b"\r\n"
        self.talk.send(stuffed + b".\r\n")
        reply = self.talk.read_reply()
        well_formed(reply)
        assert reply[-1].startswith("250 2.0.0 Ok: queued as"), (body, reply)
        with self.lock:
            self.accepted.add(token)
        self._reset_transaction()

    @rule(sender=senders, rcpts=st.lists(recipients, min_size=1, max_size=MAX_RECIPIENTS + 2), body=bodies)
    def transaction(self, sender, rcpts, body):
        """A whole transaction in one step, so random sessions also send mail, not only stray commands."""
        if not self.greeted:
            self.hello("client.example", True)
        if self.mail:
            self.rset()
        self.mail_from(sender)
        for recipient in rcpts:
            self.rcpt_to(recipient)
        self.data(body)

    @rule()
    def rset(self):
        self._expect(b"RSET", "250")
        self._reset_transaction()

    @rule()
    def noop(self):
        self._expect(b"NOOP", "250")

    @rule(junk=st.binary(max_size=40).map(lambda b: b"X" + b.replace(b"\r", b"").replace(b"\n", b"").replace(b" ", b"")))
    def unknown_command(self, junk):
        reply = self._say(junk)
        self.bogus += 1
        if reply[-1].startswith("502 5.5.1 Too many"):  # aiosmtpd's limit on unrecognised commands
            assert self.bogus >= 5
            self._close()
            self.connect(self.trusted)
        else:
            # non-ASCII in the verb is a syntax error to aiosmtpd; an unknown ASCII verb is not recognised
            assert reply[-1] in ("502 5.5.2 Error: command not recognized", "500 5.5.2 Error: bad syntax"), reply

    @rule()
    def quit_and_reconnect(self):
        self._expect(b"QUIT", "221")
        self._close()
        self.connect(self.trusted)


def test_random_smtp_sessions(live, client_tls):
    relay, fake = live
    SMTPSessions.live = live
    SMTPSessions.tls_context = client_tls
    run_state_machine_as_test(SMTPSessions, settings=settings(stateful_step_count=25))

    def arrived() -> set[str]:
        return {match.group(1).decode() for m in list(fake.messages) if (match := TOKEN.search(m.data))}

    assert wait_until(lambda: SMTPSessions.accepted <= arrived(), 30), SMTPSessions.accepted - arrived()
    tokens = [match.group(1) for m in fake.messages if (match := TOKEN.search(m.data))]
    assert len(tokens) == len(set(tokens))  # each accepted message arrived once
    print(
        f"\n[fuzz figures] state machine: {SMTPSessions.sessions} SMTP sessions, {SMTPSessions.commands} commands, "
        f"{len(SMTPSessions.accepted)} messages accepted and delivered exactly once"
    )
    talk = open_session(relay)
    assert talk.read_reply()[-1].startswith("220")  # still serving
    talk.sock.close()
