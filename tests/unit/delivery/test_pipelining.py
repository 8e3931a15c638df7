"""relay.delivery.transport.data.send_pipelined against a scripted SMTP server on a socket.

The server answers a pipelined group one reply per segment, with pauses between: aiosmtplib's
own reader keeps only one reply per read and drops what arrives before it is asked again,
so this is where a lost reply (and a recipient given its neighbour's fate) would show.
"""

from __future__ import annotations

import asyncio

import aiosmtplib
import pytest

from aiosmtplib.email import quote_address

from relay.delivery.transport.data import _PLAIN_ADDRESS, quoted, send_pipelined

RECIPIENTS = ["a@example.org", "refused@example.org", "c@example.org"]


class ScriptedServer:
    """Greets, offers PIPELINING, and answers each command of a group in its own write."""

    def __init__(self, rcpt_replies: dict[str, bytes], pause: float = 0.02):
        self.rcpt_replies, self.pause = rcpt_replies, pause
        self.reads: list[bytes] = []
        self.message = b""
        self.closes_after_421 = True

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 scripted ESMTP\r\n")
        buffer = b""
        while not reader.at_eof():
            chunk = await reader.read(65536)
            if not chunk:
                break
            self.reads.append(chunk)
            buffer += chunk
            while b"\r\n" in buffer:
                line, buffer = buffer.split(b"\r\n", 1)
                if line.startswith(b"EHLO"):
                    writer.write(b"250-scripted\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                elif line.startswith(b"MAIL"):
                    writer.write(b"250 2.1.0 Ok\r\n")
                elif line.startswith(b"RCPT"):
                    address = line.split(b"<", 1)[1].rstrip(b">").decode()
                    reply = self.rcpt_replies.get(address, b"250 2.1.5 Ok")
                    writer.write(reply + b"\r\n")
                    if reply.startswith(b"421") and self.closes_after_421:  # nothing after it is answered
                        await writer.drain()
                        writer.close()
                        return
                elif line == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    while b"\r\n.\r\n" not in b"\r\n" + buffer:
                        buffer += await reader.read(65536)
                    self.message, buffer = buffer.split(b".\r\n", 1) if buffer.startswith(b".\r\n") else \
                        buffer.split(b"\r\n.\r\n", 1)
                    writer.write(b"250 2.0.0 #MSG1#Queued\r\n")
                elif line == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    writer.close()
                    return
                else:  # NOOP, RSET
                    writer.write(b"250 2.0.0 Ok\r\n")
                await writer.drain()
                await asyncio.sleep(self.pause)  # the next reply comes in a segment of its own


async def text(body: bytes):
    yield body


@pytest.fixture
async def connect():
    servers, clients = [], []

    async def connect(script: ScriptedServer) -> aiosmtplib.SMTP:
        server = await asyncio.start_server(script.serve, "127.0.0.1", 0)
        servers.append(server)
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.sockets[0].getsockname()[1], start_tls=False,
                                 timeout=5)
        await client.connect()
        await client.ehlo()
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_mail_rcpts_and_data_go_in_one_write_and_each_reply_reaches_its_recipient(connect):
    script = ScriptedServer({"refused@example.org": b"550 5.1.1 no such user"})
    client = await connect(script)
    assert client.supports_extension("pipelining")
    sent = await send_pipelined(client, "s@acme.com", ["BODY=8BITMIME"], RECIPIENTS, text(b"Subject: x\r\n\r\nhi\r\n"), 5)
    assert (sent.mail.code, [reply.code for reply in sent.rcpts], sent.data.code) == (250, [250, 550, 250], 250)
    assert sent.rcpts[1].message == "5.1.1 no such user"
    assert sent.data.message == "2.0.0 #MSG1#Queued"
    group = next(read for read in script.reads if read.startswith(b"MAIL FROM:"))
    assert group == (b"MAIL FROM:<s@acme.com> BODY=8BITMIME\r\n"
                     + b"".join(f"RCPT TO:<{address}>\r\n".encode() for address in RECIPIENTS) + b"DATA\r\n")
    assert script.message == b"Subject: x\r\n\r\nhi"
    assert (await client.noop()).code == 250  # aiosmtplib's own reader works again after the group


async def test_every_recipient_refused_sends_no_message(connect):
    script = ScriptedServer({address: b"550 5.1.1 no" for address in RECIPIENTS})
    client = await connect(script)
    sent = await send_pipelined(client, "s@acme.com", [], RECIPIENTS, text(b"Subject: x\r\n\r\nhi\r\n"), 5)
    assert ([reply.code for reply in sent.rcpts], sent.data) == ([550, 550, 550], None)
    assert script.message == b""  # the scripted server said 354 regardless; it got an empty message


async def test_a_421_answers_every_command_it_left_unanswered(connect):
    script = ScriptedServer({"refused@example.org": b"421 4.4.2 closing"})
    client = await connect(script)
    sent = await send_pipelined(client, "s@acme.com", [], RECIPIENTS, text(b"x\r\n"), 5)
    assert ([reply.code for reply in sent.rcpts], sent.data.code) == ([250, 421, 421], 421)


async def test_replies_after_a_421_that_does_not_close_are_taken_as_given(connect):
    """Every command of the group has its own reply while the server answers; only what a closing
    server left unanswered gets its 421 (a 550 after it must not be retried as a 421)."""
    script = ScriptedServer({"a@example.org": b"421 4.4.2 busy", "refused@example.org": b"550 5.1.1 no"})
    script.closes_after_421 = False
    client = await connect(script)
    sent = await send_pipelined(client, "s@acme.com", [], RECIPIENTS, text(b"x\r\n"), 5)
    assert ([reply.code for reply in sent.rcpts], sent.data.code) == ([421, 550, 250], 250)


@pytest.mark.parametrize(("address", "plain"), [
    ("a@b", True), ("first.last@x.org", True), ("o'brien@x.com", True), ("a+tag@sub.example.org", True),
    ("x_y-z@a-b.c", True), ("!#$%&*+/=?^_`{|}~-@x.y", True), ("A@B.COM", True), ("1@2.3", True),
    ("a@localhost", True), ("bounce-123=abc@acme.com", True), ("a-@x-", True),
    ("", False), ('"john doe"@x.org', False), ("a@[127.0.0.1]", False), ("a..b@x", False), (".a@x", False),
    ("a.@x", False), ("a@b..c", False), ("a@b.", False), ("<a@b>", False), ("a b@c", False), ("a@b c", False),
    ("Name <a@b>", False), ("a@b>", False), ("a@b\r\nRCPT TO:<c@d>", False), ("jös@example.org", False),
    ("a@exämple.org", False), ("a", False), ("@b", False), ("a@", False),
])
def test_an_envelope_address_is_quoted_as_aiosmtplib_quotes_it(address, plain):
    """The shortcut takes only what the email package gives back unchanged; the rest goes through it."""
    assert bool(_PLAIN_ADDRESS.match(address)) is plain
    try:
        expected = quote_address(address)
    except ValueError:  # refused by aiosmtplib: refused here too
        with pytest.raises(ValueError):
            quoted(address)
        return
    assert quoted(address) == expected
