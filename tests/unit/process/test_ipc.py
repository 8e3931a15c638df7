"""The socketpair's frames: JSON metadata that cannot run code, and a config without upstream secrets."""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
import socket
from pathlib import Path

import pytest

from relay.config import Spool
from relay.errors import SMTPReply
from relay.policy.anvil import LimitsUnavailable, LocalLimits
from relay.policy.auth import hash_password
from relay.process.ipc import (
    FRAME_HEADER,
    READY,
    BodyPiece,
    FrameError,
    LimitsAnswer,
    LimitsCall,
    MessageFrame,
    Stored,
    decode,
    encode,
    read_frame,
    write_message,
)
from relay.process.supervisor import AcceptorPool
from relay.rewrite.dkim import generate
from relay.spool import NewMessage
from tests.unit.helpers import config_from

API_KEY = "sc-api-key-0123456789abcdef"
TOKEN = "admin-token-fedcba9876543210"


def secret_config():
    key = generate("ed25519", 0).decode()
    indented = "".join(f"                {line}\n" for line in key.splitlines())
    return config_from(f"""
        server:
          hostname: relay.test
          listeners:
            - {{name: smtp, port: 2525, tls: none, auth: optional}}
        upstream: {{kind: sendcloud}}
        admin: {{listen: "127.0.0.1:8025", token: {TOKEN}}}
        accounts:
          acme_trigger: {{api_user: acme_trigger, api_key: {API_KEY}, type: trigger, domain: acme.com}}
        users:
          billing:
            password_hash: "{hash_password("secret")}"
            channels: {{trigger: acme_trigger}}
        dkim:
          acme.com:
            selector: mail
            key: |
{indented}""")


MESSAGE = NewMessage("3ZK7Q9M2XD4HWT", 1.5, "billing", "smtp", "10.0.0.5", "acme_trigger", "trigger",
                     "app@acm\udce9.com", ["a@example.net", "b@example.net"], (), label=7, mail_from=None)


@pytest.mark.parametrize("frame", [
    READY,
    BodyPiece(3),
    MessageFrame(3, MESSAGE),
    Stored(3, None),
    Stored(4, "OSError: disk full"),
    LimitsCall(None, "release", (7,)),
    LimitsCall(2, "admit", (7, None)),
    LimitsAnswer(2, SMTPReply(421, "4.7.0", "too many connections")),
    LimitsAnswer(3, None),
    LimitsAnswer(4, 12.5),
])
def test_every_frame_comes_back_as_it_was_sent(frame):
    assert decode(encode(frame)) == frame


def test_a_limits_unavailable_answer_comes_back_as_that_exception():
    answer = decode(encode(LimitsAnswer(5, LimitsUnavailable("gone"))))
    assert isinstance(answer.value, LimitsUnavailable) and str(answer.value) == "gone"


@pytest.mark.parametrize("meta", [
    b"\x80\x04K\x01.",  # a pickle
    b"[1, 2]",
    b'{"kind": "exec"}',
    b'{"kind": "piece", "sequence": "1"}',
    b'{"kind": "message", "sequence": 1, "message": {"id": "x"}}',
    b'{"kind": "limits_call", "sequence": 1, "method": "admit", "args": [{"a": 1}]}',
])
def test_anything_but_our_frames_is_refused(meta):
    with pytest.raises(FrameError):
        decode(meta)


class _Touch:
    """Unpickling this creates ``path``: what a taken-over acceptor would send to run code."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


async def test_a_pickle_from_an_acceptor_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    config = secret_config()
    pool = AcceptorPool(config, intake=None, spill_directory=tmp_path, limits=LocalLimits(lambda: config), count=1)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    main_reader, main_writer = await asyncio.open_unix_connection(sock=ours)
    payload = pickle.dumps(_Touch(marker))
    theirs.sendall(FRAME_HEADER.pack(len(payload), 0) + payload)
    await asyncio.wait_for(pool._serve(0, main_reader, main_writer), 5)  # returns: the link is dropped
    main_writer.close()
    theirs.close()
    assert not marker.exists()


def test_an_acceptors_config_has_no_upstream_secret_but_keeps_what_it_serves_with():
    config = secret_config()
    encoded = encode(config)
    assert API_KEY.encode() not in encoded and TOKEN.encode() not in encoded
    received = decode(encoded)
    assert all(account.api_key is None for account in received.accounts.values())
    assert received.admin.token is None
    assert received.dkim["acme.com"].key == config.dkim["acme.com"].key  # signing runs in the acceptor
    assert received.users == config.users  # AUTH too
    assert received.model_copy(update={"accounts": config.accounts, "admin": config.admin}) == config


def test_an_acceptor_on_a_shared_database_gets_its_dsn():
    """As an acceptor on SQLite opens the spool's file for its rate budgets and suppression list."""
    dsn = "postgresql://relay:pw@db.internal/relay"
    config = secret_config().model_copy(update={"spool": Spool(backend="postgres", dsn=dsn)})
    assert decode(encode(config)).spool.dsn.get_secret_value() == dsn


async def test_a_limits_call_without_its_arguments_is_answered_unavailable(tmp_path):
    config = secret_config()
    pool = AcceptorPool(config, intake=None, spill_directory=tmp_path, limits=LocalLimits(lambda: config), count=1)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    _, writer = await asyncio.open_unix_connection(sock=ours)
    await pool._answer(0, writer, LimitsCall(1, "admit", ()))  # no connection key: a broken or hostile acceptor
    their_reader, their_writer = await asyncio.open_unix_connection(sock=theirs)
    answer, _ = await asyncio.wait_for(read_frame(their_reader), 5)
    assert isinstance(answer.value, LimitsUnavailable)
    writer.close()
    their_writer.close()


class _Written:
    """A StreamWriter that keeps each write (a writelines is one write: one send() on a socket)."""

    def __init__(self):
        self.writes: list[bytes] = []

    def write(self, data) -> None:
        self.writes.append(bytes(data))

    def writelines(self, buffers) -> None:
        self.writes.append(b"".join(bytes(buffer) for buffer in buffers))

    async def drain(self) -> None:
        pass


async def _frames(written: bytes) -> list[tuple[object, bytes]]:
    reader = asyncio.StreamReader()
    reader.feed_data(written)
    reader.feed_eof()
    frames = []
    while not reader.at_eof():
        frames.append(await read_frame(reader))
    return frames


@pytest.mark.parametrize(("pieces", "writes"), [
    ((b"Subject: x\r\n\r\n", memoryview(b"hello\r\n" * 700)), 1),  # the header and a view of the body: one write
    ((b"Subject: x\r\n\r\n", b""), 1),
    ((), 1),  # an empty body: the message frame alone
    ((b"Subject: x\r\n\r\n", memoryview(b"y" * 256 * 1024)), 4),  # past a piece: a frame per piece (a large one's head and data apart), then the message
])
async def test_a_message_reaches_the_main_process_whole_and_a_small_one_in_one_write(pieces, writes):
    message = NewMessage("A1", 1.0, "billing", "smtp", "10.0.0.1", "acme_trigger", "trigger", "a@acme.com",
                         ["b@example.org"], pieces)
    written = _Written()
    await write_message(written, 7, message)
    assert len(written.writes) == writes
    frames = await _frames(b"".join(written.writes))
    body = b"".join(data for frame, data in frames if isinstance(frame, BodyPiece))
    assert all(frame == BodyPiece(7) for frame, _ in frames[:-1])
    last, _ = frames[-1]
    assert isinstance(last, MessageFrame) and last.sequence == 7
    assert body == b"".join(bytes(piece) for piece in pieces)
    assert dataclasses.replace(last.message, body=body) == dataclasses.replace(message, body=body)
