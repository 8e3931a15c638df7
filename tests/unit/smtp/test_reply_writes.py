"""Replies go out in as few writes as RFC 2920 allows, and none is ever held while the client waits.

A real ``RelaySMTP`` on a loopback socket (asyncio's loop, whose transport's ``write`` can be
counted), with a handler that accepts everything: each test sends what a client sends in one
packet and checks what came back and in how many writes.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from relay.smtp.protocol import RelaySMTP, may_hold


@pytest.mark.parametrize(("status", "waiting", "held"), [
    ("250 2.1.0 Ok", True, True),           # the next pipelined command answers for both
    ("550 5.1.1 No such user", True, True),
    ("250 2.1.0 Ok", False, False),         # nothing more read: the client waits for this one
    ("354 End data with <CR><LF>.<CR><LF>", True, False),  # the client waits before the body
    ("334 VXNlcm5hbWU6", True, False),
    ("220 2.0.0 Ready to start TLS", True, False),          # the handshake follows
    ("220 relay.test ESMTP", True, False),
    ("221 2.0.0 Bye", True, False),         # the connection closes after these
    ("421 4.7.0 Too many errors", True, False),
    ("502 5.5.1 Too many unrecognized commands, goodbye.", True, False),
])
def test_may_hold(status, waiting, held):
    assert may_hold(status, waiting) is held


class AcceptAll:
    """The handler hooks RelaySMTP calls, accepting every command."""

    listener = SimpleNamespace(name="test")

    def __dir__(self):
        return ["handle_DATA"]

    async def admit(self, server):
        return None

    def connected(self, transport):
        pass

    def __init__(self):
        self.released = 0

    def release(self, server):
        self.released += 1

    def expired(self, server, reply):
        pass

    def refused_by_aiosmtpd(self, server, stage, reply):
        pass

    async def handle_DATA(self, server, session, envelope):
        return "250 2.0.0 Ok: queued as TEST"


@pytest.fixture
async def server():
    """A listening RelaySMTP; yields (port, writes): the bytes of each write, per connection."""
    writes: list[list[bytes]] = []

    def factory():
        protocol = RelaySMTP(AcceptAll(), set(), data_timeout=30, session_timeout=60, max_errors=20,
                             max_line_length=998, hostname="relay.test", ident="ESMTP")
        made = protocol.connection_made
        own: list[bytes] = []
        writes.append(own)

        def connection_made(transport):
            real = transport.write
            transport.write = lambda data: (own.append(bytes(data)), real(data))[1]
            made(transport)

        protocol.connection_made = connection_made
        return protocol

    listening = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    yield listening.sockets[0].getsockname()[1], writes
    listening.close()
    await listening.wait_closed()


async def _reply(reader: asyncio.StreamReader) -> list[str]:
    lines = [(await reader.readline()).decode()]
    while lines[-1][3] == "-":
        lines.append((await reader.readline()).decode())
    return [line.rstrip("\r\n") for line in lines]


async def test_ehlo_is_one_write(server):
    port, writes = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _reply(reader)
    writer.write(b"EHLO client.test\r\n")
    ehlo = await asyncio.wait_for(_reply(reader), 5)
    assert ehlo[0] == "250-relay.test" and len(ehlo) >= 3 and ehlo[-1].startswith("250 ")
    assert writes[0][1] == "".join(f"{line}\r\n" for line in ehlo).encode()
    writer.close()


async def test_a_pipelined_group_is_answered_in_order_in_one_write_and_quit_still_says_bye(server):
    port, writes = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _reply(reader)
    writer.write(b"EHLO client.test\r\n")
    await _reply(reader)
    writer.write(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nRCPT TO:<e@f.test>\r\nNOOP\r\nDATA\r\n")
    replies = [await asyncio.wait_for(_reply(reader), 5) for _ in range(5)]
    assert [reply[0][:3] for reply in replies] == ["250", "250", "250", "250", "354"]
    assert writes[0][2].count(b"\r\n") == 5  # the whole group, the 354 last
    writer.write(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\nNOOP\r\n")  # QUIT ends it, whatever follows
    assert await asyncio.wait_for(_reply(reader), 5) == ["250 2.0.0 Ok: queued as TEST"]
    assert await asyncio.wait_for(_reply(reader), 5) == ["221 2.0.0 Bye"]
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert writes[0][3] == b"250 2.0.0 Ok: queued as TEST\r\n221 2.0.0 Bye\r\n"
    writer.close()


async def test_a_reply_is_never_held_while_the_client_waits(server):
    """One command at a time, as smtp-source sends: every reply is its own write, at once."""
    port, writes = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _reply(reader)
    for command, code in [(b"HELO client.test", "250"), (b"MAIL FROM:<a@b.test>", "250"), (b"RCPT TO:<c@d.test>", "250"),
                          (b"RSET", "250"), (b"BOGUS", "502")]:
        writer.write(command + b"\r\n")
        assert (await asyncio.wait_for(_reply(reader), 5))[0][:3] == code
    assert len(writes[0]) == 6
    writer.close()


async def test_the_idle_timer_counts_from_the_last_command_and_says_421():
    """One timer per connection, moved by each command: it closes only after a silence as long as the timeout."""
    protocol = RelaySMTP(AcceptAll(), set(), data_timeout=30, session_timeout=60, max_errors=20,
                         max_line_length=998, hostname="relay.test", ident="ESMTP", timeout=0.3)
    listening = await asyncio.get_running_loop().create_server(lambda: protocol, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*listening.sockets[0].getsockname()[:2])
    await _reply(reader)
    for _ in range(4):  # 0.6 s of commands, each within the timeout of the one before
        await asyncio.sleep(0.15)
        writer.write(b"NOOP\r\n")
        await _reply(reader)
    assert protocol._timeout_handle is not None and not protocol.transport.is_closing()
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(_reply(reader), 5) == ["421 4.4.2 relay.test Error: timeout exceeded"]
    assert 0.2 < asyncio.get_running_loop().time() - started < 1.0
    writer.close()
    listening.close()


async def test_quit_gives_the_connection_back_to_the_limits_once_before_its_221():
    handler = AcceptAll()
    protocol = RelaySMTP(handler, set(), data_timeout=30, session_timeout=60, max_errors=20,
                         max_line_length=998, hostname="relay.test", ident="ESMTP")
    told_before_bye = []
    push = protocol.push

    async def pushing(status):
        if str(status).startswith("221"):
            told_before_bye.append(handler.released)
        await push(status)

    protocol.push = pushing
    listening = await asyncio.get_running_loop().create_server(lambda: protocol, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*listening.sockets[0].getsockname()[:2])
    await _reply(reader)
    writer.write(b"QUIT\r\n")
    assert await asyncio.wait_for(_reply(reader), 5) == ["221 2.0.0 Bye"]
    assert await asyncio.wait_for(reader.read(), 5) == b""
    await asyncio.sleep(0.05)  # connection_lost has run
    assert told_before_bye == [1] and handler.released == 1
    writer.close()
    listening.close()
