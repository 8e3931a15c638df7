"""Several SMTP acceptor processes in front of one spool and one scheduler (``server.processes``).

One Python process saturates one core with SMTP parsing alone; Postfix uses every core by
running many ``smtpd`` processes that all accept on sockets the master bound, and hand mail
to one ``cleanup``/``qmgr`` side. This is the same shape:

- The **main process** binds every listener once (so "address in use" is still an error at
  start, and no stranger can join the port the way ``SO_REUSEPORT`` would allow), owns the
  SQLite spool (one writer, so one group commit serves every acceptor) and the scheduler
  (one in-flight set, so no message is ever delivered twice), and supervises the children.
- Each **acceptor process** inherits the listening sockets and runs the ordinary listeners
  (:mod:`relay.listener`). Its spool is a :class:`SpoolClient`: ``store`` sends the message
  over a private socketpair to the main process, which commits it (fsync) in the group
  committing at that moment, hands it to the scheduler in memory (no poll latency), and
  only then answers; the acceptor says ``250`` after that answer. Any failure of that path is
  an exception in ``store``, so the listener answers ``451 4.3.0`` as for a local spool error.

Frames on the socketpair are an 8-byte header (metadata length, data length) then a pickle
of the metadata, then the data bytes (sent without re-encoding). Pickle is safe here: both
ends are this program, and the socketpair is reachable by nobody else. The main process's
first frame is the config, and a reload sends the new one the same way, so every process
runs the config the main process validated. A message goes as :class:`BodyPiece` frames of
at most 256 KB, the acceptor waiting for the socket to drain after each, then one frame
with the message without its body: the main process keeps the pieces as they come and the
spool writes them as pieces, so a 10 MB message is never a second whole copy on either
side (nor in a socket buffer), and every frame is written at once, so frames of other
sessions and control frames may come between the pieces of one message. Past ``_SPILL_AT``
the main process writes what it holds of a body to an anonymous temporary file beside the
spool (:class:`_ReceivedBody`) and the spool copies it from there: the acceptor's receive
buffer is the only whole copy while the message is handed over.

What must hold for the whole relay lives in the main process only, as Postfix's ``anvil``
does: the connection counts and the AUTH failure tracking (:mod:`relay.anvil`). An acceptor
asks over the same socketpair (:class:`RemoteLimits`: a ``LimitsCall`` frame, answered by a
``LimitsAnswer``; ``release`` and ``auth_succeeded`` need no answer), within
``_ASK_TIMEOUT``; the main process answers in its frame loop, without suspending, and frees
the connections of an acceptor that exits. Rate budgets are shared through the spool
database (:class:`relay.limits.PersistentRates`). Metrics use prometheus-client's
multiprocess mode: each process writes its counters to its own file in a private directory
that ``/metrics`` in the main process reads (:mod:`relay.metrics`).

Lifecycle: SIGTERM to the main process (or to the whole group, as systemd does) stops the
acceptors first (each closes its sockets, says ``421`` to idle sessions and lets sessions in
a transaction finish within ``server.shutdown_grace``), while the main process keeps storing
for them; then delivery and the spool stop. An acceptor that dies is restarted; if the main
process dies, each acceptor sees its socketpair close, stops accepting and exits, so nothing
is ever answered ``250`` without the spool. ``kill -9`` of any process loses nothing that got
a ``250``: the main process answers only after the commit.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from relay import logs, metrics
from relay.anvil import LimitsUnavailable, LocalLimits
from relay.auth import Authenticator
from relay.config import Config
from relay.delivery import Scheduler
from relay.errors import SMTPReply
from relay.limits import PersistentRates, RateStore
from relay.listener import ListenerGroup, Services
from relay.prepare import Preparer
from relay.spool import FileRegion, NewMessage, Piece, piece_chunks, use_queue_id_partition
from relay.spool.sqlite import SqliteSpool
from relay.tls import ServerTLS, server_context

log = logging.getLogger("relay.workers")

_HEADER = struct.Struct("!II")  # metadata length, data length
_PIECE = 256 * 1024  # the most of a body one frame carries
# The most of one message's body the main process keeps in memory: past it, what it holds goes
# to a temporary file (smaller messages stay in memory: the quick path, and the common one).
_SPILL_AT = 1024 * 1024
_RESTART_DELAY = 1.0  # seconds before an acceptor that died is started again
_READY = "ready"  # an acceptor's first frame: its listeners are serving
# A question about the limits not answered within this long gets a "try again later": the
# main process's loop is wedged (it answers in microseconds), and a session must not hang.
_ASK_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True)
class LimitsCall:
    """Acceptor → main: a :class:`relay.anvil.SharedLimits` method; ``sequence`` None: no answer wanted."""

    sequence: int | None
    method: str
    args: tuple


@dataclasses.dataclass(frozen=True)
class LimitsAnswer:
    """Main → acceptor: what the method returned (a LimitsUnavailable: what it raised)."""

    sequence: int
    value: object


_ASKED = frozenset({"admit", "admit_address", "auth_locked_for", "auth_failed"})
_TOLD = frozenset({"release", "auth_succeeded"})
_PER_CONNECTION = frozenset({"admit", "admit_address", "release"})  # first argument: a connection key


# -- frames ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BodyPiece:
    """Frame metadata: the frame's data is the next piece of the body of message ``sequence``."""

    sequence: int


def write_frame(writer: asyncio.StreamWriter, meta: object, data: bytes | memoryview = b"") -> None:
    """One whole frame, written at once (never interleaved with another); ``data`` at most a piece."""
    encoded = pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_HEADER.pack(len(encoded), len(data)) + encoded)
    if data:
        writer.write(data)


async def write_message(writer: asyncio.StreamWriter, sequence: int, message: NewMessage) -> None:
    """A message's body as piece frames, draining after each, then the message without its body."""
    for piece in message.pieces:
        for chunk in piece_chunks(piece, _PIECE):
            write_frame(writer, BodyPiece(sequence), chunk)
            await writer.drain()
    write_frame(writer, (sequence, dataclasses.replace(message, body=())))


async def read_frame(reader: asyncio.StreamReader) -> tuple[object, bytes]:
    """The next frame; ``asyncio.IncompleteReadError`` when the other side is gone."""
    meta_length, data_length = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    meta = pickle.loads(await reader.readexactly(meta_length))
    data = await reader.readexactly(data_length) if data_length else b""
    return meta, data


# -- the acceptor's side ------------------------------------------------------------------------


class SpoolUnreachable(Exception):
    """The main process did not take the message (it is gone, or its spool failed)."""


class SpoolClient:
    """The acceptor's spool: ``store`` returns once the main process has the message on disk.

    It also receives the configs the main process sends on reload, for ``reconfigure``.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reconfigure, answered):
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
        future = asyncio.get_running_loop().create_future()
        self._waiting[self._sequence] = future
        try:
            # Shielded: a session cancelled mid-body must not leave the main process a partial one.
            await asyncio.shield(write_message(self._writer, self._sequence, message))
        except ConnectionError as error:
            self._waiting.pop(self._sequence, None)
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
                sequence, error = frame
                future = self._waiting.pop(sequence, None)
                if future is not None and not future.done():
                    future.set_exception(SpoolUnreachable(error)) if error else future.set_result(None)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(SpoolUnreachable("main process gone"))
            self._waiting.clear()


class RemoteLimits:
    """The acceptor's :class:`relay.anvil.SharedLimits`: every question goes to the main process."""

    def __init__(self, writer: asyncio.StreamWriter, closed: asyncio.Event):
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


class _SubmittedByMain:
    """The acceptor's scheduler: the main process submits each message it stores."""

    def submit(self, message: NewMessage) -> None:
        pass


async def run_acceptor(config: Config, ipc: socket.socket, listening: dict[str, list[socket.socket]], verbose: bool) -> None:
    """An acceptor process: the listeners on inherited sockets, storing through the main process."""
    current = config
    rates = PersistentRates(RateStore(config.spool.path))  # shared through the spool database
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

    reader, writer = await asyncio.open_unix_connection(sock=ipc)
    spool = SpoolClient(reader, writer, reconfigure, lambda answer: limits.answered(answer))
    limits = RemoteLimits(writer, spool.closed)  # questions are asked (and answered) only from now on
    preparer = Preparer()
    services = Services(
        config=lambda: current,
        spool=spool,
        scheduler=_SubmittedByMain(),
        authenticator=Authenticator(lambda: {name: user.password_hash for name, user in current.users.items()}),
        preparer=preparer,
        limits=limits,
        rates=rates,
    )
    listeners = ListenerGroup(services, tls.context if tls else None)
    await rates.start()
    await listeners.start(listening)
    write_frame(writer, _READY)
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
    writer.close()
    await asyncio.to_thread(preparer.close)


def acceptor_main() -> None:
    """Entry point of ``python -m relay.workers`` (started by :class:`AcceptorPool` only)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--ipc", type=int, required=True)
    parser.add_argument("--listen", action="append", default=[], help="LISTENER=FD")
    parser.add_argument("--partition", type=int, required=True)
    parser.add_argument("--partitions", type=int, required=True)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    from relay.cli import run_event_loop

    use_queue_id_partition(args.partition, args.partitions)
    ipc = socket.socket(fileno=args.ipc)
    meta_length, _ = _HEADER.unpack(_receive(ipc, _HEADER.size))  # the first frame: the config
    config = pickle.loads(_receive(ipc, meta_length))
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


# -- the main process's side --------------------------------------------------------------------


class _ReceivedBody:
    """The pieces of one message's body as the main process receives them.

    At most ``_SPILL_AT`` bytes stay in memory: each time that much is held, it is appended to
    an anonymous temporary file in the spool's directory (unlinked at once, so a crash leaves
    nothing behind, and its space comes back at ``close``), in a thread. The caller awaits each
    ``add`` before it reads the next frame, so the writes keep their order and memory stays
    bounded. No fsync: the spool's commit is the durable step, the file only a buffer before it.
    A write that fails (disk full) fails this message only, when it is stored: its acceptor
    answers ``451`` as for a spool error, and its link to the main process carries on.
    """

    def __init__(self, directory: Path):
        self._directory = directory
        self._held: list[bytes] = []
        self._held_size = 0
        self._file = None
        self._spilled = 0
        self._failed: OSError | None = None

    async def add(self, data: bytes) -> None:
        if self._failed is not None:
            return  # the rest of a body that cannot be stored
        self._held.append(data)
        self._held_size += len(data)
        if self._held_size >= _SPILL_AT:
            held, self._held, self._held_size = self._held, [], 0
            try:
                await asyncio.to_thread(self._spill, held)
            except OSError as error:
                self._failed = error

    def _spill(self, held: list[bytes]) -> None:
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self._directory)
        self._file.writelines(held)
        self._file.flush()  # the spool reads the file through its descriptor, not this buffer
        self._spilled += sum(len(data) for data in held)

    def pieces(self) -> tuple[Piece, ...]:
        if self._failed is not None:
            raise OSError(f"cannot buffer the message in {self._directory}: {self._failed}")
        spilled = (FileRegion(self._file, 0, self._spilled),) if self._file is not None else ()
        return (*spilled, *self._held)

    def close(self) -> None:
        self._held = []
        if self._file is not None:
            self._file.close()


def _metrics_name(index: int) -> str:
    """Acceptor ``index``'s name in the metrics directory: the same for the one started again,
    which carries on its counters instead of leaving a file per process behind."""
    return f"acceptor{index}"


class AcceptorPool:
    """Binds the listeners, starts the acceptor processes, stores what they send, answers
    their questions about the limits, restarts them."""

    def __init__(self, config: Config, spool: SqliteSpool, scheduler: Scheduler, limits: LocalLimits, count: int):
        self._config = config
        self._spool = spool
        self._scheduler = scheduler
        self._limits = limits
        self._count = count
        self._servers: list[tuple[str, asyncio.AbstractServer]] = []
        self._supervisors: list[asyncio.Task] = []
        self._processes: dict[int, subprocess.Popen] = {}
        self._writers: dict[int, asyncio.StreamWriter] = {}
        self._stopping = False

    async def start(self) -> None:
        use_queue_id_partition(0, self._count + 1)
        loop = asyncio.get_running_loop()
        for listener in self._config.server.listeners:
            # Bound here exactly as a one-process relay binds them, but never served here.
            server = await loop.create_server(
                asyncio.Protocol, host=listener.bind, port=listener.port, reuse_address=True, start_serving=False
            )
            self._servers.append((listener.name, server))
            log.info("listening on %s:%d (%s, tls=%s, auth=%s) in %d acceptor processes",
                     listener.bind, listener.port, listener.name, listener.tls, listener.auth, self._count)
        started = [loop.create_future() for _ in range(self._count)]
        self._supervisors = [
            asyncio.create_task(self._supervise(index, started[index]), name=f"acceptor-{index}")
            for index in range(self._count)
        ]
        try:
            await asyncio.gather(*started)
        except BaseException:
            await self.stop()
            raise

    def reconfigure(self, config: Config) -> None:
        """Send a reloaded config to every acceptor (and to those started from now on)."""
        self._config = config
        for writer in self._writers.values():
            if not writer.is_closing():
                write_frame(writer, config)

    async def stop(self, grace: float = 0) -> None:
        """SIGTERM every acceptor and keep storing for them until they have all exited.

        Each acceptor applies ``server.shutdown_grace`` to its own sessions.
        """
        self._stopping = True
        for process in self._processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        await asyncio.gather(*self._supervisors, return_exceptions=True)
        for _, server in self._servers:
            server.close()
        self._servers.clear()

    async def _supervise(self, index: int, started: asyncio.Future) -> None:
        while not self._stopping:
            began = time.monotonic()
            try:
                await self._run_child(index, started)
            except Exception as error:  # noqa: BLE001 - a child that cannot start
                if not started.done():
                    started.set_exception(error)
                    return
                log.exception("acceptor %d failed", index)
            if self._stopping:
                return
            log.error("acceptor %d exited; starting it again", index)
            await asyncio.sleep(max(0.0, _RESTART_DELAY - (time.monotonic() - began)))

    async def _run_child(self, index: int, started: asyncio.Future) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [theirs.fileno()]
        command = [sys.executable, "-m", "relay.workers", "--ipc", str(theirs.fileno()),
                   "--partition", str(index + 1), "--partitions", str(self._count + 1)]
        for name, server in self._servers:
            for sock in server.sockets:
                command += ["--listen", f"{name}={sock.fileno()}"]
                fds.append(sock.fileno())
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            command.append("-v")
        try:
            process = subprocess.Popen(command, pass_fds=fds, env=metrics.child_environment(_metrics_name(index)))
        finally:
            theirs.close()
        self._processes[index] = process
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        try:
            write_frame(writer, self._config)
            try:
                ready, _ = await read_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                raise RuntimeError(f"acceptor {index} (pid {process.pid}) exited while starting") from None
            assert ready == _READY, ready
            log.info("acceptor %d started (pid %d)", index, process.pid)
            if not started.done():
                started.set_result(None)
            self._writers[index] = writer
            await self._serve(index, reader, writer)
        finally:
            self._writers.pop(index, None)
            writer.close()
            code = await asyncio.to_thread(process.wait)
            if code and not self._stopping:
                log.error("acceptor %d (pid %d) exited with %d", index, process.pid, code)
            released = self._limits.release_owner(index)
            if released and not self._stopping:
                log.warning("acceptor %d: released its %d open connection(s) from the limits", index, released)
            metrics.process_gone(_metrics_name(index))

    async def _serve(self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Store every message an acceptor sends, each in its own task (they share group commits),
        and answer its questions about the limits in order."""
        pending: set[asyncio.Task] = set()
        bodies: dict[int, _ReceivedBody] = {}  # by sequence: the pieces received so far
        try:
            while True:
                try:
                    frame, data = await read_frame(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if isinstance(frame, BodyPiece):
                    if frame.sequence not in bodies:
                        bodies[frame.sequence] = _ReceivedBody(self._spool.path.parent)
                    await bodies[frame.sequence].add(data)
                    continue
                if isinstance(frame, LimitsCall):
                    await self._answer(index, writer, frame)
                    continue
                sequence, message = frame  # no local may keep the body: it would live until the next message
                task = asyncio.create_task(self._store(writer, sequence, message, bodies.pop(sequence, None)))
                pending.add(task)
                task.add_done_callback(pending.discard)
        finally:
            for body in bodies.values():  # the acceptor went away in the middle of these
                body.close()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def _answer(self, index: int, writer: asyncio.StreamWriter, call: LimitsCall) -> None:
        """Answer from the one table; never suspends (LocalLimits does not), so frames keep their order."""
        if call.method not in (_ASKED if call.sequence is not None else _TOLD):
            log.error("acceptor %d: unknown limits call %r", index, call.method)
            return
        args = ((index, call.args[0]), *call.args[1:]) if call.method in _PER_CONNECTION else call.args
        try:
            value = getattr(self._limits, call.method)(*args)
            if call.sequence is not None:
                value = await value
        except Exception:  # noqa: BLE001 - a bug here must not cut the acceptor off its spool
            log.exception("acceptor %d: limits call %s failed", index, call.method)
            value = LimitsUnavailable(f"the main process could not answer {call.method}")
        if call.sequence is not None and not writer.is_closing():
            write_frame(writer, LimitsAnswer(call.sequence, value))

    async def _store(self, writer: asyncio.StreamWriter, sequence: int, message: NewMessage, body: _ReceivedBody | None) -> None:
        try:
            message = dataclasses.replace(message, body=body.pieces() if body is not None else ())
            await self._spool.store(message)
        except Exception as error:  # noqa: BLE001 - the acceptor answers 451 and logs it
            log.exception("%s: could not spool message from an acceptor", message.id)
            reply = (sequence, f"{type(error).__name__}: {error}")
        else:
            self._scheduler.submit(message)
            reply = (sequence, None)
        finally:
            if body is not None:
                body.close()
        if not writer.is_closing():
            write_frame(writer, reply)


if __name__ == "__main__":
    # Run as relay.workers, not as __main__, so the frame classes it pickles name their module.
    from relay.workers import acceptor_main as run_from_module

    run_from_module()
