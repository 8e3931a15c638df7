"""An acceptor process: the ordinary listeners on inherited sockets, storing through the main process.

Started by :class:`relay.process.supervisor.AcceptorPool` as ``python -m relay.process.acceptor``.
Its intake is a :class:`SpoolClient` (``store`` returns once the main process has the
message on disk and has handed it to its scheduler), its limits a :class:`RemoteLimits`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import socket

from relay.config import Config
from relay.errors import SMTPReply
from relay.observe import logs
from relay.policy.anvil import LimitsUnavailable
from relay.policy.auth import Authenticator
from relay.policy.rates import PersistentRates
from relay.policy.suppression import SuppressionCache
from relay.process.ipc import (
    FRAME_HEADER,
    JOINED_WRITE,
    READY,
    FrameError,
    LimitsAnswer,
    LimitsCall,
    Stored,
    check_lengths,
    decode,
    read_frame,
    write_frame,
    write_message,
)
from relay.process.loop import run_event_loop
from relay.rewrite.pipeline import Preparer
from relay.smtp.listeners import ListenerGroup
from relay.smtp.session import Services
from relay.spool import (
    NewMessage,
    rate_store,
    suppression_reader,
    use_queue_id_partition,
)
from relay.tls import ServerTLS, server_context

log = logging.getLogger("relay.workers")

# A question about the limits not answered within this long gets a "try again later": the
# main process's loop is wedged (it answers in microseconds), and a session must not hang.
_ASK_TIMEOUT = 10.0


class LoopPassWriter:
    """The link's writer, joining what one pass of the event loop writes into one write.

    Each session writes its own frames (a connection's question, a message, a release); under
    load several sessions write in the same pass, and one system call carries them all (and
    the main process wakes once to read them). Written at the end of the pass, so nothing
    waits for long; data of a write's size or more goes straight through, after what is held.
    """

    def __init__(self, writer: asyncio.StreamWriter):
        self._writer = writer
        self._held: list[bytes | memoryview] = []

    def write(self, data: bytes | memoryview) -> None:
        self.writelines([data])

    def writelines(self, buffers: list[bytes | memoryview]) -> None:
        """Buffers of one frame or more (:func:`relay.process.ipc.write_message` gives a message's
        as a list), held for the pass's one write; a write's size or more goes at once, after what is held."""
        if sum(len(buffer) for buffer in buffers) >= JOINED_WRITE:
            self.flush()
            self._writer.writelines(buffers)
            return
        if not self._held:
            asyncio.get_running_loop().call_soon(self.flush)
        self._held.extend(buffers)

    def flush(self) -> None:
        held, self._held = self._held, []
        if held and not self._writer.is_closing():  # closed: the main process is gone, and the reader says so
            self._writer.write(held[0] if len(held) == 1 else b"".join(held))

    async def drain(self) -> None:
        """Wait while the socket's buffer is full; what is held (less than a write) goes at the pass's end."""
        await self._writer.drain()

    def close(self) -> None:
        self.flush()
        self._writer.close()


class SpoolUnreachable(Exception):
    """The main process did not take the message (it is gone, or its spool failed)."""


class SpoolClient:
    """The acceptor's spool: ``store`` returns once the main process has the message on disk.

    It also receives the configs the main process sends on reload, for ``reconfigure``.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter | LoopPassWriter, reconfigure, answered):
        self._reader = reader
        self._writer = writer
        self._reconfigure = reconfigure
        self._answered = answered
        self._waiting: dict[int, asyncio.Future] = {}
        self._sequence = 0
        self.closed = asyncio.Event()
        self._replies = asyncio.create_task(self._read_replies(), name="spool-replies")

    async def store(self, message: NewMessage) -> None:
        if self.closed.is_set():
            raise SpoolUnreachable("main process gone")
        self._sequence += 1
        sequence = self._sequence  # this message's own: other sessions store while this one awaits
        future = asyncio.get_running_loop().create_future()
        self._waiting[sequence] = future
        try:
            # Shielded: a session cancelled mid-body must not leave the main process a partial one.
            await asyncio.shield(write_message(self._writer, sequence, message))
        except ConnectionError as error:
            self._waiting.pop(sequence, None)
            raise SpoolUnreachable(f"main process gone: {error}") from None
        await future

    async def _read_replies(self) -> None:
        try:
            while True:
                frame, _ = await read_frame(self._reader)
                if isinstance(frame, LimitsAnswer):
                    self._answered(frame)
                    continue
                if isinstance(frame, Config):
                    self._reconfigure(frame)
                    continue
                if not isinstance(frame, Stored):
                    raise FrameError(f"unexpected {type(frame).__name__} frame")
                future = self._waiting.pop(frame.sequence, None)
                if future is not None and not future.done():
                    if frame.error:
                        future.set_exception(SpoolUnreachable(frame.error))
                    else:
                        future.set_result(None)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except FrameError as error:
            log.error("acceptor %d: closing the link to the main process: %s", os.getpid(), error)
        finally:
            self.closed.set()
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(SpoolUnreachable("main process gone"))
            self._waiting.clear()


class RemoteLimits:
    """The acceptor's :class:`relay.policy.anvil.SharedLimits`: every question goes to the main process."""

    def __init__(self, writer: LoopPassWriter, closed: asyncio.Event):
        self._writer = writer
        self._closed = closed
        self._waiting: dict[int, asyncio.Future] = {}
        self._sequence = 0

    async def admit(self, connection: int, address: str | None) -> SMTPReply | None:
        return await self._ask("admit", connection, address)

    async def admit_address(self, connection: int, address: str) -> SMTPReply | None:
        return await self._ask("admit_address", connection, address)

    def release(self, connection: int) -> None:
        self._tell("release", connection)
        self._writer.flush()  # at once, not at the pass's end: the slot is free before the client sees its 221

    async def auth_locked_for(self, address: str, username: str) -> float | None:
        return await self._ask("auth_locked_for", address, username)

    async def auth_failed(self, address: str, username: str) -> float:
        return await self._ask("auth_failed", address, username)

    def auth_succeeded(self, address: str, username: str) -> None:
        self._tell("auth_succeeded", address, username)

    def _tell(self, method: str, *args) -> None:
        if not self._closed.is_set():  # else the main process is gone, and its counts with it
            write_frame(self._writer, LimitsCall(None, method, args))

    async def _ask(self, method: str, *args):
        if self._closed.is_set():
            raise LimitsUnavailable("the main process is gone")
        self._sequence += 1
        sequence = self._sequence
        future = self._waiting[sequence] = asyncio.get_running_loop().create_future()
        write_frame(self._writer, LimitsCall(sequence, method, args))
        timer = asyncio.get_running_loop().call_later(_ASK_TIMEOUT, self._fail, sequence, f"no answer within {_ASK_TIMEOUT:.0f}s")
        try:
            return await future
        finally:  # answered, timed out, or the session went away meanwhile (a late answer is dropped)
            timer.cancel()
            self._waiting.pop(sequence, None)

    def answered(self, answer: LimitsAnswer) -> None:
        future = self._waiting.pop(answer.sequence, None)
        if future is None or future.done():
            return
        if isinstance(answer.value, LimitsUnavailable):
            future.set_exception(answer.value)
        else:
            future.set_result(answer.value)

    def _fail(self, sequence: int, why: str) -> None:
        future = self._waiting.pop(sequence, None)
        if future is not None and not future.done():
            future.set_exception(LimitsUnavailable(why))

    def close(self) -> None:
        """The main process is gone: every question still waiting fails now."""
        for sequence in list(self._waiting):
            self._fail(sequence, "the main process is gone")


async def run_acceptor(config: Config, ipc: socket.socket, listening: dict[str, list[socket.socket]], verbose: bool) -> None:
    """An acceptor process: the listeners on inherited sockets, storing through the main process."""
    current = config
    rates = PersistentRates(rate_store(config.spool))  # shared through the spool database
    tls = ServerTLS(config.server.tls, config.server.hostname) if config.server.tls else None

    def reconfigure(new: Config) -> None:
        """A reload in the main process, applied here as the main process applied it."""
        nonlocal current
        try:
            context = server_context(new.server.tls, new.server.hostname) if tls and new.server.tls else None
        except (OSError, ValueError) as error:  # the main process loaded these files a moment ago
            log.error("acceptor %d: reload: cannot load server.tls: %s; keeping the old certificate", os.getpid(), error)
            context = None
        current = new
        if context is not None:
            tls.install(context)
        logs.configure(new.logging, logs.secrets_of(new), verbose)

    reader, link = await asyncio.open_unix_connection(sock=ipc)
    writer = LoopPassWriter(link)
    spool = SpoolClient(reader, writer, reconfigure, lambda answer: limits.answered(answer))
    limits = RemoteLimits(writer, spool.closed)  # questions are asked (and answered) only from now on
    preparer = Preparer()
    listed = suppression_reader(config.spool)  # read from the spool's file, as the rates are
    suppressions = SuppressionCache(listed.suppression_version, listed.suppressions)
    services = Services(
        config=lambda: current,
        intake=spool.store,  # the main process hands each message it stores to its scheduler
        authenticator=Authenticator(lambda: {name: user.password_hash for name, user in current.users.items()}),
        preparer=preparer,
        limits=limits,
        rates=rates,
        suppressions=suppressions,
    )
    listeners = ListenerGroup(services, tls.context if tls else None)
    await rates.start()
    suppressions.start()
    await listeners.start(listening)
    # What start-up made (modules, the config's models, compiled rules) lives as long as the
    # process: out of the collector's sight, a full collection walks only the sessions' objects.
    gc.freeze()
    write_frame(writer, READY)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    gone = asyncio.create_task(spool.closed.wait())
    await asyncio.wait([gone, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    if gone.done():
        log.error("acceptor %d: lost the main process; no longer accepting mail", os.getpid())
        limits.close()
    await listeners.stop(0 if gone.done() else current.server.shutdown_grace)
    await rates.stop()
    await suppressions.stop()
    await listed.close()
    writer.close()
    await asyncio.to_thread(preparer.close)


def acceptor_main() -> None:
    """Entry point of ``python -m relay.process.acceptor`` (started by :class:`AcceptorPool` only)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--ipc", type=int, required=True)
    parser.add_argument("--listen", action="append", default=[], help="LISTENER=FD")
    parser.add_argument("--partition", type=int, required=True)
    parser.add_argument("--partitions", type=int, required=True)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    use_queue_id_partition(args.partition, args.partitions)
    ipc = socket.socket(fileno=args.ipc)
    meta_length, data_length = FRAME_HEADER.unpack(_receive(ipc, FRAME_HEADER.size))  # the first frame: the config
    check_lengths(meta_length, data_length)
    config = decode(_receive(ipc, meta_length))
    if not isinstance(config, Config):
        raise SystemExit(f"the main process's first frame is not the config: {type(config).__name__}")
    logs.configure(config.logging, logs.secrets_of(config), args.verbose)
    listening: dict[str, list[socket.socket]] = {}
    for item in args.listen:
        name, fd = item.rsplit("=", 1)
        listening.setdefault(name, []).append(socket.socket(fileno=int(fd)))
    run_event_loop(run_acceptor(config, ipc, listening, args.verbose), config.server.event_loop)


def _receive(sock: socket.socket, length: int) -> bytes:
    data = b""
    while len(data) < length:
        chunk = sock.recv(length - len(data))
        if not chunk:
            raise SystemExit("the main process went away before sending the config")
        data += chunk
    return data




if __name__ == "__main__":
    acceptor_main()
