"""The processes a benchmark run starts: smtp-sink, a private Postfix relay, our relay, the TLS sink.

Each is a context manager that starts the peer, waits until it greets, and on exit stops it
and removes what it wrote outside the run's work folder. :class:`RssSampler` follows a
process tree's memory while a load runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import yaml

SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"
POSTFIX = "/usr/sbin/postfix"
BENCH = Path(__file__).resolve().parent


RESULTS = Path(__file__).resolve().parent / "results"


def write_results(results: dict, out: Path | None, prefix: str, started) -> Path:
    """``results`` with the load average after, as ``out`` or ``results/<prefix>-<time>.json``."""
    results["loadavg_after"] = os.getloadavg()
    out = out or RESULTS / f"{prefix}-{started:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_greeting(port: int, timeout: float = 30.0) -> None:
    """Wait until an SMTP server greets on 127.0.0.1:port (a bound socket is not enough)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            smtplib.SMTP("127.0.0.1", port, timeout=5).quit()
            return
        except OSError as error:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no SMTP greeting on 127.0.0.1:{port} after {timeout}s: {error}") from None
            time.sleep(0.05)


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.01)


# -- memory -------------------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as stat:
                    ppid = int(stat.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def tree_pids(root: int) -> list[int]:
    tree, pids, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(tree.get(pid, []))
    return pids


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes ``pids`` have used so far (from /proc/<pid>/stat)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat(5)
    return total / _TICK


def cpu_by_role(root: int, role) -> dict[str, float]:
    """CPU seconds (user + system) a process tree has used so far, summed per role.

    Each live process counts its own time under its role (``role(pid, comm)`` names it), and
    the time of the children it has reaped (cutime + cstime) under ``exited``: Postfix's smtpd
    exits after 100 connections and its master reaps it, so that time stays counted. The
    difference of two snapshots is what the tree used in between.
    """
    out: dict[str, float] = {}
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                head, tail = stat.read().rsplit(b")", 1)
        except OSError:
            continue
        fields = tail.split()
        name = role(pid, head.split(b"(", 1)[1].decode(errors="replace"))
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime: stat(5) 14, 15
        out["exited"] = out.get("exited", 0.0) + (int(fields[13]) + int(fields[14])) / _TICK  # cutime, cstime: 16, 17
    return out


def cpu_ms_per_message(before: dict[str, float], after: dict[str, float], messages: int) -> dict[str, float]:
    """Per role and in total: CPU milliseconds per message between two :func:`cpu_by_role` snapshots."""
    roles = {name: 1000 * (after.get(name, 0.0) - before.get(name, 0.0)) / messages for name in sorted(after.keys() | before.keys())}
    return {"total": sum(roles.values()), **roles}


def memory(pids: list[int]) -> tuple[int, int]:
    """Resident and proportional set sizes summed over ``pids``, in bytes.

    RSS summed over a process tree counts shared pages (libraries, Postfix's many smtpd
    processes) once per process: an upper bound. PSS shares them out: the fair total.
    """
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as rollup:
                for line in rollup:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return rss, pss


class RssSampler:
    """Peak RSS and PSS of a process tree, sampled every ``interval`` seconds.

    The tree is re-listed every half second, so short-lived children (Postfix's smtpd,
    cleanup, smtp) are counted while they live.
    """

    def __init__(self, root_pid: int, interval: float = 0.05):
        self.root_pid = root_pid
        self.interval = interval
        self.peak = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        return memory(tree_pids(self.root_pid))[0]

    def _run(self) -> None:
        pids, listed = [], 0.0
        while not self._stop.is_set():
            if time.monotonic() - listed > 0.5:
                pids, listed = tree_pids(self.root_pid), time.monotonic()
            rss, pss = memory(pids)
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# -- the upstream sinks -------------------------------------------------------------------------


class SmtpSink:
    """Postfix's ``smtp-sink``: accepts everything, and keeps a ``mesg=N`` counter on stdout."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self._output = workdir / f"sink-{self.port}.out"
        self._process: subprocess.Popen | None = None

    def count(self) -> int:
        counts = re.findall(rb"mesg=(\d+)", self._output.read_bytes()[-200:])
        return int(counts[-1]) if counts else 0

    def __enter__(self) -> SmtpSink:
        with open(self._output, "wb") as out:
            self._process = subprocess.Popen(
                [SMTP_SINK, "-c", "-u", "nobody", f"127.0.0.1:{self.port}", "1024"], stdout=out, stderr=subprocess.STDOUT
            )
        wait_greeting(self.port)
        return self

    def __exit__(self, *exc) -> None:
        self._process.terminate()
        self._process.wait(10)


class TlsSink:
    """``bench/tls_sink.py`` (aiosmtpd) with STARTTLS and AUTH required, or plain when ``tls`` is False."""

    def __init__(self, workdir: Path, cert: Path, key: Path, tls: bool, user: str, password: str):
        self.port = free_port()
        self._counter = workdir / f"tls-sink-{self.port}.count"
        self._command = [sys.executable, str(BENCH / "tls_sink.py"), "--port", str(self.port), "--counter", str(self._counter)]
        if tls:
            self._command += ["--cert", str(cert), "--key", str(key), "--user", user, "--password", password]
        self._process: subprocess.Popen | None = None

    def pid(self) -> int:
        return self._process.pid

    def count(self) -> int:
        try:
            return int(self._counter.read_text() or 0)
        except (OSError, ValueError):
            return 0

    def __enter__(self) -> TlsSink:
        self._process = subprocess.Popen(self._command)
        wait_greeting(self.port)
        return self

    def __exit__(self, *exc) -> None:
        self._process.terminate()
        self._process.wait(10)


# -- the relays under test ----------------------------------------------------------------------

# The same private-instance master.cf as the tests' Postfix smarthost (one copy, kept there).
_MASTER_CF = (Path(__file__).resolve().parent.parent / "tests" / "support" / "postfix-master.cf").read_text()


class PostfixRelay:
    """A private Postfix 3.x relaying everything from 127.0.0.0/8 to ``[127.0.0.1]:upstream_port``.

    Its own config, queue and data directories; the queue is Postfix's durable queue as
    shipped (cleanup fsyncs each queue file before smtpd answers ``250``). Pitfalls handled
    (bench/README.md): the maillog must sit under /var, the data directory must be owned by
    postfix along a reachable path, and chroot is off.
    """

    name = "postfix"

    def __init__(self, workdir: Path, upstream_port: int, max_message_size: int):
        self.port = free_port()
        instance = f"postfix-bench-{uuid.uuid4().hex[:10]}"
        self.config_dir = (workdir / instance / "etc").absolute()
        self.queue_dir = (workdir / instance / "spool").absolute()
        self.data_dir = Path("/var/lib") / instance
        self.maillog = Path("/var/log") / f"{instance}.log"
        self._main_cf = f"""\
compatibility_level = 3.6
myhostname = postfix.bench.test
queue_directory = {self.queue_dir}
data_directory = {self.data_dir}
maillog_file = {self.maillog}
syslog_name = {instance}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
smtpd_peername_lookup = no
relayhost = [127.0.0.1]:{upstream_port}
message_size_limit = {max_message_size}
"""

    def pid(self) -> int:
        return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])

    @staticmethod
    def role(pid: int, comm: str) -> str:
        """Postfix's processes by program: master, smtpd, cleanup, qmgr, smtp, ..."""
        return comm

    def __enter__(self) -> PostfixRelay:
        for directory in (self.config_dir, self.queue_dir, self.data_dir):
            directory.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.data_dir, user="postfix")
        (self.config_dir / "main.cf").write_text(self._main_cf)
        (self.config_dir / "master.cf").write_text(_MASTER_CF.format(inject=f"127.0.0.1:{self.port}"))
        try:
            _run(POSTFIX, "-c", str(self.config_dir), "start")
            wait_greeting(self.port)
        except BaseException:
            self._clean()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            _run(POSTFIX, "-c", str(self.config_dir), "stop")
        finally:
            self._clean()

    def _clean(self) -> None:
        self.maillog.unlink(missing_ok=True)
        shutil.rmtree(self.data_dir, ignore_errors=True)


class OurRelay:
    """``python -m relay serve`` on a generated config; ``spool_stats`` come from its shutdown line."""

    name = "relay"

    def __init__(self, workdir: Path, config: dict, port: int, extra_env: dict | None = None):
        self.port = port
        self.workdir = workdir / f"relay-{uuid.uuid4().hex[:8]}"
        self.workdir.mkdir(parents=True)
        self.config_path = self.workdir / "relay.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = self.workdir / "relay.log"
        self.env = {**os.environ, **(extra_env or {})}
        self.spool_stats: tuple[int, int] | None = None  # (writes, commits)
        self._process: subprocess.Popen | None = None

    def pid(self) -> int:
        return self._process.pid

    def role(self, pid: int, comm: str) -> str:
        """The main process (spool, scheduler, upstream) or an acceptor (SMTP, policy, rewriting)."""
        return "main" if pid == self._process.pid else "acceptors"

    def __enter__(self) -> OurRelay:
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "-c", str(self.config_path)],
                cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, env=self.env,
            )
        try:
            wait_greeting(self.port)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(120)
        except subprocess.TimeoutExpired:
            self._process.kill()
            raise
        stats = re.search(r"after (\d+) writes in (\d+) commits", self.log_path.read_text(errors="replace"))
        self.spool_stats = (int(stats[1]), int(stats[2])) if stats else None


def _run(*command: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}: {result.stdout}{result.stderr}")
