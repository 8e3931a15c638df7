"""The backlog scenario (issue 13): a million recipients queued with the upstream down, then the drain.

``bench/run.py --only backlog [--backlog-messages 200000]`` runs it (:func:`run`). Steps:

1. The relay with its upstream down (the sink's port chosen, nothing listening) takes
   ``--backlog-messages`` x 5 recipients of 5 KB from ``smtp-source -r 5``. Every second a
   sampler reads the relay's /metrics (queued messages and recipients: the spool's running
   counts, so the scrape costs the same at any backlog), the RSS summed over its processes
   (/proc) and the sink's count.
2. With the backlog: ``queue list --limit 50`` (the CLI's wall time, and /api/queue's answer
   time), then a restart: SIGTERM, a new ``serve`` on the same spool, time to its ``220``.
3. The sink starts, ``queue flush`` makes every deferred recipient due now (the operator's
   move when the upstream is back; the retry schedule would spread the drain over its
   delays), and the drain is sampled until no recipient waits, while a probe sends one new
   message a second; its delivery delay comes from the relay's log (``delay=`` on ``status=sent``).
"""

from __future__ import annotations

import itertools
import re
import smtplib
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

from peers import SMTP_SOURCE, OurRelay, SmtpSink, free_port, memory, tree_pids, wait_until

RECIPIENTS = 5
SIZE = 5120
SESSIONS = 20
PROBE = "probe@example.net"
MiB = 2**20


class Sampler:
    """Once a second: the relay's queue gauges, its RSS over all its processes, the sink's count."""

    def __init__(self, admin_port: int, sink: SmtpSink):
        self.admin_port = admin_port
        self.sink = sink
        self.sink_up = False
        self.relay_pid: int | None = None
        self.phase = "inject"
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            sample = {"t": time.monotonic() - self.started, "phase": self.phase}
            if self.relay_pid is not None:
                sample["rss_mb"] = memory(tree_pids(self.relay_pid))[0] / MiB
            try:
                sample.update(queue_gauges(self.admin_port))
            except OSError:
                pass  # restarting
            if self.sink_up:
                sample["sink_transactions"] = self.sink.count()
            self.samples.append(sample)

    def latest(self) -> dict:
        return next((s for s in reversed(self.samples) if "messages" in s), {})

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def queue_gauges(admin_port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10).read().decode()
    found = {"messages": _gauge(text, r"sendcloud_relay_queue_messages")}
    for state in ("queued", "deferred"):
        found[state] = _gauge(text, rf'sendcloud_relay_queue_recipients\{{state="{state}"\}}')
    return found


def _gauge(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match[1]) if match else 0.0


def rate_between(samples: list[dict], key: str, low: float, high: float) -> float | None:
    """Per second, how fast ``key`` went from ``low`` to ``high`` (either way), from the samples."""
    def crossing(level: float) -> float | None:
        for before, after in itertools.pairwise(samples):
            a, b = before.get(key), after.get(key)
            if a is not None and b is not None and min(a, b) <= level <= max(a, b) and a != b:
                return before["t"] + (after["t"] - before["t"]) * (level - a) / (b - a)
        return None

    start, end = crossing(low), crossing(high)
    if start is None or end is None or end == start:
        return None
    return abs(high - low) / abs(end - start)


def run(bench, messages: int) -> dict:
    """The scenario on ``bench`` (run.py's Bench: the relay's config and work folder)."""
    workdir: Path = bench.workdir
    sink = SmtpSink(workdir)  # its port is the relay's upstream; it does not listen until the drain
    admin_port = free_port()
    spool = workdir / "backlog" / "spool.db"
    config = bench.relay_config(free_port(), sink.port)
    config["spool"]["path"] = str(spool)
    config["admin"] = {"listen": f"127.0.0.1:{admin_port}"}
    port = config["server"]["listeners"][0]["port"]
    result: dict = {"messages": messages, "recipients_per_message": RECIPIENTS, "size": SIZE, "sessions": SESSIONS}
    sampler = Sampler(admin_port, sink)
    with sampler:
        relay = OurRelay(workdir, config, port)
        with relay:
            sampler.relay_pid = relay.pid()
            result["empty_rss_mb"] = memory(tree_pids(relay.pid()))[0] / MiB
            started = time.monotonic()
            sampler.samples.append({"t": started - sampler.started, "phase": "inject", "messages": 0, "queued": 0, "deferred": 0})
            subprocess.run([SMTP_SOURCE, "-s", str(SESSIONS), "-m", str(messages), "-r", str(RECIPIENTS),
                            "-l", str(SIZE), "-f", "bench@bench.test", "-t", "sink@example.net", f"127.0.0.1:{port}"],
                           check=True, stdout=subprocess.DEVNULL)
            result["inject_s"] = time.monotonic() - started
            result["accepted_per_s"] = messages / result["inject_s"]
            wait_until(lambda: sampler.latest().get("messages", 0) >= messages, 30, "the last message in the gauge")
            inject = [s for s in sampler.samples if s["phase"] == "inject" and "messages" in s]
            result["accepted_per_s_first_10pct"] = rate_between(inject, "messages", 0, 0.1 * messages)
            result["accepted_per_s_last_10pct"] = rate_between(inject, "messages", 0.9 * messages, messages)
            result["peak_rss_mb"] = max(s.get("rss_mb", 0) for s in sampler.samples)
            sampler.phase = "operator reads"
            result["cli_queue_list_limit_50_ms"] = sorted(_cli_ms(relay.config_path, "list", "--limit", "50") for _ in range(3))[1]
            result["api_queue_limit_50_ms"] = sorted(_http_ms(admin_port, "/api/queue?limit=50") for _ in range(5))[2]
            result["metrics_scrape_ms"] = sorted(_http_ms(admin_port, "/metrics") for _ in range(5))[2]
            sampler.phase = "restart"
            sampler.relay_pid = None
            stopping = time.monotonic()
        result["stop_s"] = time.monotonic() - stopping
        restarted = OurRelay(workdir, config, port)
        starting = time.monotonic()
        with restarted:
            result["restart_to_220_s"] = time.monotonic() - starting
            sampler.relay_pid = restarted.pid()
            with sink:
                sampler.sink_up = True
                sampler.phase = "drain"
                flushing = time.monotonic()
                _cli_ms(restarted.config_path, "flush")
                result["flush_s"] = time.monotonic() - flushing
                probes = _Probes(port)
                with probes:
                    wait_until(lambda: _waiting(sampler.latest()) == 0 and sampler.latest().get("t", 0) > flushing - sampler.started,
                               4 * 3600, "the backlog drained")
                result["drain_s"] = time.monotonic() - flushing
                result["sink_transactions"] = sink.count()
            result["probes_sent"] = probes.sent
        log = restarted.log_path.read_text(errors="replace")
        delays = [float(d) for d in re.findall(rf"to=<{re.escape(PROBE)}>.*?delay=([\d.]+).*?status=sent", log)]
        sent = Counter(re.findall(r"relay\.delivery: (\w+): to=<([^>]*)>.*status=sent", log))
        result["recipients_sent_more_than_once"] = sum(1 for count in sent.values() if count > 1)
    total = messages * RECIPIENTS
    drain = [s for s in sampler.samples if s["phase"] == "drain" and "messages" in s]
    result["drain_recipients_per_s"] = total / result["drain_s"]
    result["drain_recipients_per_s_middle_80pct"] = rate_between(
        [{**s, "waiting": _waiting(s)} for s in drain], "waiting", 0.9 * total, 0.1 * total)
    result["upstream_transactions_per_message"] = result["sink_transactions"] / (messages + result["probes_sent"])
    result["probe_delay_s"] = {"count": len(delays), "median": sorted(delays)[len(delays) // 2] if delays else None,
                               "max": max(delays) if delays else None}
    result["peak_rss_mb"] = max(s.get("rss_mb", 0) for s in sampler.samples)
    result["samples"] = sampler.samples
    return result


def _waiting(sample: dict) -> float:
    return sample.get("queued", 0) + sample.get("deferred", 0) if "messages" in sample else float("inf")


def _cli_ms(config: Path, *command: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "relay", "queue", *command, "-c", str(config)], check=True,
                   stdout=subprocess.DEVNULL, cwd=config.parent)
    return (time.perf_counter() - started) * 1000


def _http_ms(admin_port: int, path: str) -> float:
    started = time.perf_counter()
    urllib.request.urlopen(f"http://127.0.0.1:{admin_port}{path}", timeout=30).read()
    return (time.perf_counter() - started) * 1000


class _Probes:
    """New mail during the drain: one message a second to PROBE, each on a new connection."""

    def __init__(self, port: int):
        self.port = port
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            with smtplib.SMTP("127.0.0.1", self.port, timeout=60) as smtp:
                smtp.sendmail("bench@bench.test", [PROBE], b"Subject: probe\r\n\r\nnew mail during the drain\r\n")
            self.sent += 1

    def __enter__(self) -> _Probes:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
