"""Several SMTP acceptor processes in front of one spool and one scheduler (``server.processes``).

One Python process saturates one core with SMTP parsing alone; Postfix uses every core by
running many ``smtpd`` processes that all accept on sockets the master bound, and hand mail
to one ``cleanup``/``qmgr`` side. This is the same shape:

- The **main process** binds every listener once (so "address in use" is still an error at
  start, and no stranger can join the port the way ``SO_REUSEPORT`` would allow), owns the
  spool (one writer, so one group commit serves every acceptor) and the scheduler
  (one in-flight set, so no message is ever delivered twice), and supervises the children.
- Each **acceptor process** inherits the listening sockets and runs the ordinary listeners
  (:mod:`relay.smtp`). Its spool is a :class:`SpoolClient`: ``store`` sends the message
  over a private socketpair to the main process, which commits it (fsync) in the group
  committing at that moment, hands it to the scheduler in memory (no poll latency), and
  only then answers; the acceptor says ``250`` after that answer. Any failure of that path is
  an exception in ``store``, so the listener answers ``451 4.3.0`` as for a local spool error.

Frames on the socketpair are an 8-byte header (metadata length, data length) then the
metadata as JSON, then the data bytes (sent without re-encoding): never pickle, so an
acceptor taken over from the internet cannot run code in the main process
(:mod:`relay.process.ipc`). The main process's first frame is the config without the
upstream secrets (no ``api_key``, no admin token), and a reload sends the new one the same
way, so every process runs the config the main process validated. A message goes as :class:`BodyPiece` frames of
at most 256 KB, the acceptor waiting for the socket to drain after each, then one frame
with the message without its body: the main process keeps the pieces as they come and the
spool writes them as pieces, so a 10 MB message is never a second whole copy on either
side (nor in a socket buffer), and every frame is written at once, so frames of other
sessions and control frames may come between the pieces of one message. Past ``SPILL_AT``
the main process writes what it holds of a body to an anonymous temporary file beside the
spool (:class:`ReceivedBody`) and the spool copies it from there: the acceptor's receive
buffer is the only whole copy while the message is handed over.

What must hold for the whole relay lives in the main process only, as Postfix's ``anvil``
does: the connection counts and the AUTH failure tracking (:mod:`relay.policy.anvil`). An acceptor
asks over the same socketpair (:class:`RemoteLimits`: a ``LimitsCall`` frame, answered by a
``LimitsAnswer``; ``release`` and ``auth_succeeded`` need no answer), within
``_ASK_TIMEOUT``; the main process answers in its frame loop, without suspending, and frees
the connections of an acceptor that exits. Rate budgets are shared through the spool
database (:class:`relay.policy.rates.PersistentRates`). Metrics use prometheus-client's
multiprocess mode: each process writes its counters to its own file in a private directory
that ``/metrics`` in the main process reads (:mod:`relay.observe.metrics`).

Lifecycle: SIGTERM to the main process (or to the whole group, as systemd does) stops the
acceptors first (each closes its sockets, says ``421`` to idle sessions and lets sessions in
a transaction finish within ``server.shutdown_grace``), while the main process keeps storing
for them; then delivery and the spool stop. An acceptor that dies is restarted; if the main
process dies, each acceptor sees its socketpair close, stops accepting and exits, so nothing
is ever answered ``250`` without the spool. ``kill -9`` of any process loses nothing that got
a ``250``: the main process answers only after the commit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from relay.config import Config
from relay.observe import metrics
from relay.policy.anvil import LimitsUnavailable, LocalLimits
from relay.process.ipc import (
    ASKED_METHODS,
    PER_CONNECTION_METHODS,
    READY,
    TOLD_METHODS,
    BodyPiece,
    FrameError,
    LimitsAnswer,
    LimitsCall,
    MessageFrame,
    Stored,
    read_frame,
    write_frame,
)
from relay.process.spill import ReceivedBody
from relay.smtp.listeners import bind_error
from relay.spool import (
    NewMessage,
    use_queue_id_partition,
)

log = logging.getLogger("relay.workers")

_RESTART_DELAY = 1.0  # seconds before an acceptor that died is started again
_EXIT_MARGIN = 2.0  # seconds past the shutdown grace an acceptor has to exit before it is killed


def _metrics_name(index: int) -> str:
    """Acceptor ``index``'s name in the metrics directory: the same for the one started again,
    which carries on its counters instead of leaving a file per process behind."""
    return f"acceptor{index}"


class AcceptorPool:
    """Binds the listeners, starts the acceptor processes, stores what they send, answers
    their questions about the limits, restarts them."""

    def __init__(self, config: Config, intake: Callable[[NewMessage], Awaitable[None]], spill_directory: Path, limits: LocalLimits, count: int):
        self._config = config
        self._intake = intake  # spools a message (group commit, fsync) and hands it to the scheduler
        self._spill_directory = spill_directory
        self._limits = limits
        self._count = count
        self._servers: list[tuple[str, asyncio.AbstractServer]] = []
        self._supervisors: list[asyncio.Task] = []
        self._processes: dict[int, subprocess.Popen] = {}
        self._writers: dict[int, asyncio.StreamWriter] = {}
        self._stopping = False

    async def bind(self) -> None:
        """Bind every listener, exactly as a one-process relay binds them, but never served here."""
        use_queue_id_partition(0, self._count + 1)
        loop = asyncio.get_running_loop()
        for listener in self._config.server.listeners:
            try:
                server = await loop.create_server(
                    asyncio.Protocol, host=listener.bind, port=listener.port, reuse_address=True, start_serving=False
                )
            except OSError as error:
                raise bind_error(error, listener) from None
            self._servers.append((listener.name, server))

    async def serve(self) -> None:
        """Start the acceptor processes on the bound sockets; returns once every one serves."""
        loop = asyncio.get_running_loop()
        for listener in self._config.server.listeners:
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

        Each acceptor applies ``server.shutdown_grace`` to its own sessions, from the same
        moment; one still running ``_EXIT_MARGIN`` after ``grace`` is killed, so the relay's
        shutdown stays within one grace (a session cut then gets no ``250``: nothing is lost).
        """
        self._stopping = True
        for process in self._processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        _, late = await asyncio.wait(self._supervisors, timeout=grace + _EXIT_MARGIN) if self._supervisors else ((), ())
        for index, process in self._processes.items():
            if late and process.poll() is None:
                log.error("acceptor %d (pid %d) still running after the shutdown grace; killing it", index, process.pid)
                process.kill()
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
        command = [sys.executable, "-m", "relay.process.acceptor", "--ipc", str(theirs.fileno()),
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
            assert ready == READY, ready
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
        bodies: dict[int, ReceivedBody] = {}  # by sequence: the pieces received so far
        try:
            while True:
                try:
                    frame, data = await read_frame(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                except FrameError as error:  # not this program at the other end any more
                    log.error("acceptor %d: closing its link: %s", index, error)
                    return
                if isinstance(frame, BodyPiece):
                    if frame.sequence not in bodies:
                        bodies[frame.sequence] = ReceivedBody(self._spill_directory)
                    await bodies[frame.sequence].add(data)
                    continue
                if isinstance(frame, LimitsCall):
                    await self._answer(index, writer, frame)
                    continue
                if not isinstance(frame, MessageFrame):
                    log.error("acceptor %d: closing its link: unexpected %s frame", index, type(frame).__name__)
                    return
                # no local may keep the body: it would live until the next message
                task = asyncio.create_task(
                    self._store(writer, frame.sequence, frame.message, bodies.pop(frame.sequence, None))
                )
                pending.add(task)
                task.add_done_callback(pending.discard)
        finally:
            for body in bodies.values():  # the acceptor went away in the middle of these
                body.close()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def _answer(self, index: int, writer: asyncio.StreamWriter, call: LimitsCall) -> None:
        """Answer from the one table; never suspends (LocalLimits does not), so frames keep their order."""
        if call.method not in (ASKED_METHODS if call.sequence is not None else TOLD_METHODS):
            log.error("acceptor %d: unknown limits call %r", index, call.method)
            return
        try:
            args = ((index, call.args[0]), *call.args[1:]) if call.method in PER_CONNECTION_METHODS else call.args
            value = getattr(self._limits, call.method)(*args)
            if call.sequence is not None:
                value = await value
        except Exception:  # noqa: BLE001 - a bug here must not cut the acceptor off its spool
            log.exception("acceptor %d: limits call %s failed", index, call.method)
            value = LimitsUnavailable(f"the main process could not answer {call.method}")
        if call.sequence is not None and not writer.is_closing():
            write_frame(writer, LimitsAnswer(call.sequence, value))

    async def _store(self, writer: asyncio.StreamWriter, sequence: int, message: NewMessage, body: ReceivedBody | None) -> None:
        try:
            message = dataclasses.replace(message, body=body.pieces() if body is not None else ())
            await self._intake(message)
        except Exception as error:  # noqa: BLE001 - the acceptor answers 451 and logs it
            log.exception("%s: could not spool message from an acceptor", message.id)
            reply = Stored(sequence, f"{type(error).__name__}: {error}")
        else:
            reply = Stored(sequence, None)
        finally:
            if body is not None:
                body.close()
        if not writer.is_closing():
            write_frame(writer, reply)


