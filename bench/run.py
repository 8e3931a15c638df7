"""The benchmark: our relay against a Postfix relay on the same machine, in one run.

    .venv/bin/python bench/run.py [--reps 3] [--only relay,sweep,submission,sizes,idle,fsync,nodes]

Everything runs on 127.0.0.1: ``smtp-sink`` is the upstream, a private Postfix (own config,
queue and data directories, durable queue as shipped, ``relayhost`` = the sink) and our
relay (``python -m relay serve``, trusted network, SQLite spool fsynced before every 250)
take the same loads from ``smtp-source``, alternating which goes first in each repetition,
and every figure is the median of ``--reps`` runs. Each run gets a fresh relay or Postfix.
The STARTTLS+AUTH scenario and the idle-sessions scenario use ``bench/loadgen.py``
(aiosmtplib) and ``bench/tls_sink.py`` (aiosmtpd), since smtp-source and smtp-sink speak no
TLS. It prints a table, writes ``bench/results/<time>.json`` and a PNG of throughput against
parallel sessions. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nodes
from peers import (
    RESULTS,
    SMTP_SOURCE,
    OurRelay,
    PostfixRelay,
    RssSampler,
    SmtpSink,
    TlsSink,
    cpu_by_role,
    cpu_ms_per_message,
    cpu_seconds,
    free_port,
    tree_pids,
    wait_until,
)

from relay.policy.auth import hash_password
from relay.tls import make_self_signed

SENDER, RECIPIENT = "bench@bench.test", "sink@example.net"
MAX_MESSAGE_SIZE = 32 * 2**20
SUBMIT_USER, SUBMIT_PASSWORD = "submitter", "bench-password-1"
UPSTREAM_USER, UPSTREAM_PASSWORD = "sink_user", "sink-password-1"
MiB = 2**20
CPU_MS = "cpu_ms_per_message_"  # + a role, or "total": the process tree's user + system CPU per message


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args = args
        self.workdir = workdir
        self.cert, self.key = workdir / "tls" / "cert.pem", workdir / "tls" / "key.pem"
        make_self_signed(self.cert, self.key, "localhost")
        self.password_hash = hash_password(SUBMIT_PASSWORD)
        self.overrides = [setting.split("=", 1) for setting in args.relay_set]

    # -- the two relays ---------------------------------------------------------------------

    def relay_config(self, port: int, upstream_port: int, *, submission_port: int | None = None, upstream_tls: bool = False,
                     max_connections: int = 1000) -> dict:
        listeners = [{"name": "smtp", "bind": "127.0.0.1", "port": port, "tls": "none", "auth": "none"}]
        if submission_port:
            listeners.append({"name": "submission", "bind": "127.0.0.1", "port": submission_port, "tls": "starttls", "auth": "required"})
        account = {"api_user": UPSTREAM_USER, "type": "trigger", "domain": "bench.test"}
        if upstream_tls:
            account["api_key"] = UPSTREAM_PASSWORD
        config = {
            "server": {
                "hostname": "relay.bench.test",
                "listeners": listeners,
                "tls": {"cert": str(self.cert), "key": str(self.key)},
                "trusted_networks": [{"cidr": "127.0.0.0/8", "user": "trusted"}],
                "max_message_size": MAX_MESSAGE_SIZE,
                "max_connections": max_connections,
            },
            "spool": {"path": "spool.db"},
            "upstream": {
                "kind": "smtp", "host": "127.0.0.1", "port": upstream_port,
                "tls": "starttls" if upstream_tls else "none", "ca_file": str(self.cert),
                "connections_per_account": 8,
            },
            "admin": {"listen": None},  # the default port would clash with any other relay running here
            "accounts": {"sink": account},
            "users": {
                "trusted": {"channels": {"trigger": "sink"}},
                SUBMIT_USER: {"password_hash": self.password_hash, "channels": {"trigger": "sink"}},
            },
        }
        for key, value in self.overrides:
            *path, last = key.split(".")
            section = config
            for part in path:
                section = section.setdefault(part, {})
            section[last] = json.loads(value) if value[:1] in "0123456789[{tf" else value
        return config

    def relay(self, upstream_port: int, **kwargs) -> OurRelay:
        port = free_port()
        submission = free_port() if kwargs.pop("submission", False) else None
        relay = OurRelay(self.workdir, self.relay_config(port, upstream_port, submission_port=submission, **kwargs), port)
        relay.submission_port = submission
        return relay

    def postfix(self, upstream_port: int) -> PostfixRelay:
        return PostfixRelay(self.workdir, upstream_port, MAX_MESSAGE_SIZE)

    def targets(self, sink: SmtpSink, rep: int) -> list:
        """Both relays, the first one alternating between repetitions."""
        pair = [lambda: self.relay(sink.port), lambda: self.postfix(sink.port)]
        return pair if rep % 2 == 0 else pair[::-1]

    # -- one load ---------------------------------------------------------------------------

    def smtp_source(self, target, sink, messages: int, sessions: int, size: int, strace: bool = False,
                    warmup: int = 0) -> dict:
        """Start ``target``, drive it with smtp-source, wait for the sink to count every message.

        ``warmup`` small messages first (not counted): the memory baseline is then a relay that
        has loaded what its first message needs, so growth is what the load itself holds.
        """
        with target as running:
            if warmup:
                self._send(running, sink, warmup, 2, 1024)
            tracer = _strace(tree_pids(running.pid()), self.workdir / f"strace-{running.name}.txt") if strace else None
            with RssSampler(running.pid()) as rss:
                idle_rss = rss.peak
                cpu_before = cpu_by_role(running.pid(), running.role)
                started = time.monotonic()
                accepted = self._send(running, sink, messages, sessions, size) - started
                end_to_end = time.monotonic() - started
                cpu = cpu_ms_per_message(cpu_before, cpu_by_role(running.pid(), running.role), messages)
            fsyncs = _strace_stop(tracer) if tracer else None
        result = {
            "relay": running.name, "messages": messages, "sessions": sessions, "size": size,
            "accepted_per_s": messages / accepted, "end_to_end_per_s": messages / end_to_end,
            "mb_per_s": messages * size / end_to_end / 1e6,
            "idle_rss_mb": idle_rss / MiB, "peak_rss_mb": rss.peak / MiB, "peak_pss_mb": rss.peak_pss / MiB,
            **{f"{CPU_MS}{role}": ms for role, ms in cpu.items()},
        }
        if getattr(running, "spool_stats", None):
            result["spool_commits_per_message"] = running.spool_stats[1] / messages
        if fsyncs is not None:
            result["strace_fsyncs_per_message"] = fsyncs / messages
        self.say(result)
        return result

    @staticmethod
    def _send(running, sink, messages: int, sessions: int, size: int) -> float:
        """smtp-source into ``running``, then wait for the sink; when smtp-source had every ``250``."""
        counted = sink.count()
        subprocess.run(
            [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", str(size),
             "-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{running.port}"],
            check=True, stdout=subprocess.DEVNULL,
        )
        accepted = time.monotonic()
        wait_until(lambda: sink.count() >= counted + messages, 600, f"{messages} messages at the sink")
        return accepted

    def say(self, result: dict) -> None:
        print("  " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()), flush=True)

    # -- scenarios --------------------------------------------------------------------------

    def scenario_relay(self, sink: SmtpSink) -> dict:
        """Trusted-network relay, 5 KB, 20 sessions: accepted and end-to-end msgs/s."""
        runs = []
        for rep in range(self.args.reps):
            for target in self.targets(sink, rep):
                runs.append(self.smtp_source(target(), sink, self.args.messages, 20, 5120))
        return summarise(runs, ("accepted_per_s", "end_to_end_per_s", "peak_rss_mb", "peak_pss_mb", "spool_commits_per_message"))

    def scenario_sweep(self, sink: SmtpSink) -> dict:
        """End-to-end msgs/s against parallel sessions, for the plot."""
        points = {}
        for sessions in self.args.sweep:
            runs = []
            messages = min(self.args.messages, 300 * sessions)
            for rep in range(self.args.reps):
                for target in self.targets(sink, rep):
                    runs.append(self.smtp_source(target(), sink, messages, sessions, 5120))
            points[str(sessions)] = summarise(runs, ("accepted_per_s", "end_to_end_per_s"))
        return points

    def scenario_sizes(self, sink: SmtpSink) -> dict:
        """1 KB, 100 KB and 10 MB messages: msgs/s, MB/s, peak RSS."""
        plan = [(1024, self.args.messages, 20), (100 * 1024, self.args.messages // 5, 20), (10 * MiB, 20, 1)]
        out = {}
        for size, messages, sessions in plan:
            runs = []
            for rep in range(self.args.reps):
                for target in self.targets(sink, rep):
                    runs.append(self.smtp_source(target(), sink, messages, sessions, size, warmup=20))
            summary = summarise(runs, ("end_to_end_per_s", "mb_per_s", "peak_rss_mb", "peak_pss_mb", "idle_rss_mb"))
            for runs_of in summary.values():
                runs_of["median"]["rss_growth_per_message_size"] = (
                    (runs_of["median"]["peak_rss_mb"] - runs_of["median"]["idle_rss_mb"]) * MiB / size
                )
            out[_size_name(size)] = {"messages": messages, "sessions": sessions, **summary}
        return out

    def scenario_fsync(self, sink: SmtpSink) -> dict:
        """fsync + fdatasync calls per accepted message, counted by strace for both relays."""
        runs = [self.smtp_source(target(), sink, self.args.messages // 2, 20, 5120, strace=True) for target in self.targets(sink, 0)]
        return summarise(runs, ("strace_fsyncs_per_message", "spool_commits_per_message", "end_to_end_per_s"))

    def submission_run(self, name: str, tls: bool, per_connection: int, resume: bool = False) -> dict:
        """One load through the submission path; CPU seconds per message for the relay, the client and the sink."""
        with TlsSink(self.workdir, self.cert, self.key, tls, UPSTREAM_USER, UPSTREAM_PASSWORD) as sink:
            with self.relay(sink.port, submission=True, upstream_tls=tls) as relay:
                load = ["--port", str(relay.submission_port if tls else relay.port)]
                if tls:
                    load += ["--starttls", "--cafile", str(self.cert), "--user", SUBMIT_USER, "--password", SUBMIT_PASSWORD]
                if resume:
                    load.append("--resume")
                messages = self.args.messages // 2
                load += ["--messages", str(messages), "--sessions", "20", "--per-connection", str(per_connection)]
                sink_pids = tree_pids(sink.pid())
                relay_cpu, sink_cpu = cpu_by_role(relay.pid(), relay.role), cpu_seconds(sink_pids)
                started = time.monotonic()
                result = _loadgen("load", *load)
                accepted = time.monotonic() - started
                wait_until(lambda n=messages: sink.count() >= n, 600, f"{messages} messages at the TLS sink")
                end_to_end = time.monotonic() - started
                relay_cpu = cpu_ms_per_message(relay_cpu, cpu_by_role(relay.pid(), relay.role), messages)
                sink_cpu = cpu_seconds(sink_pids) - sink_cpu
        run = {
            "relay": name, "messages": messages, "messages_per_connection": per_connection, "errors": result["errors"],
            "accepted_per_s": messages / accepted, "end_to_end_per_s": messages / end_to_end,
            "relay_cpu_ms_per_message": relay_cpu["total"],
            **{f"{CPU_MS}{role}": ms for role, ms in relay_cpu.items() if role != "total"},
            "client_cpu_ms_per_message": 1000 * result["cpu_seconds"] / messages,
            "sink_cpu_ms_per_message": 1000 * sink_cpu / messages,
            "tls_handshakes": result["tls_handshakes"], "tls_resumed": result["tls_resumed"],
        }
        self.say(run)
        return run

    def scenario_submission(self) -> dict:
        """STARTTLS + AUTH on both sides of our relay against the same loads in plaintext.

        Three client patterns, each against plaintext with the same messages per connection:
        ``full`` (a new connection and a full TLS handshake per message: an application),
        ``resumed`` (a new connection per message resuming the last TLS session: a smarthost
        with a TLS session cache) and ``reuse`` (``--per-connection`` messages per connection:
        a smarthost that keeps its connections).
        """
        per = self.args.per_connection
        loads = {"plain 1/conn": (False, 1, False), f"plain {per}/conn": (False, per, False)}
        tls_loads = {
            "full": ("tls full handshake 1/conn", (True, 1, False), "plain 1/conn"),
            "resumed": ("tls resumed 1/conn", (True, 1, True), "plain 1/conn"),
            "reuse": (f"tls {per}/conn", (True, per, False), f"plain {per}/conn"),
        }
        patterns = {pattern: tls_loads[pattern] for pattern in self.args.submission}
        loads = {baseline: loads[baseline] for _, _, baseline in patterns.values()}
        loads.update({name: load for name, load, _ in patterns.values()})
        runs = []
        for rep in range(self.args.reps):
            for name in (list(loads) if rep % 2 == 0 else list(loads)[::-1]):
                runs.append(self.submission_run(name, *loads[name]))
        keys = ("accepted_per_s", "end_to_end_per_s", "relay_cpu_ms_per_message", "client_cpu_ms_per_message",
                "sink_cpu_ms_per_message", "tls_resumed")
        summary = summarise(runs, keys)
        summary["patterns"] = {}
        for pattern, (name, _, baseline) in patterns.items():
            tls, plain = summary[name]["median"], summary[baseline]["median"]
            summary["patterns"][pattern] = {
                "tls": name, "plain": baseline,
                "cost": {key: 1 - tls[key] / plain[key] for key in ("accepted_per_s", "end_to_end_per_s")},
                # What TLS would cost the relay if it had the CPUs to itself: CPU per message, plain over TLS.
                "relay_cpu_cost": 1 - plain["relay_cpu_ms_per_message"] / tls["relay_cpu_ms_per_message"],
            }
        summary["messages_per_connection"] = per
        return summary

    def scenario_backlog(self, sink: SmtpSink) -> dict:
        """A million recipients queued with the upstream down, then the drain (bench/backlog.py;
        it runs its own sink, started only for the drain)."""
        import backlog

        return backlog.run(self, self.args.backlog_messages)

    def scenario_idle(self, sink: SmtpSink) -> dict:
        """1,000 idle sessions: the relay's RSS, and the latency of messages sent meanwhile."""
        runs = []
        for _ in range(self.args.reps):
            # Room for the idle sessions and the probes: the limit counts the whole relay's.
            with self.relay(sink.port, max_connections=self.args.idle + 100) as relay, RssSampler(relay.pid()) as rss:
                before = rss.now()
                gen = subprocess.Popen(
                    [sys.executable, str(Path(__file__).parent / "loadgen.py"), "idle", "--port", str(relay.port),
                     "--idle", str(self.args.idle), "--probes", "200"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                )
                assert gen.stdout.readline().strip() == "READY"
                time.sleep(1)
                with_idle = rss.now()
                out, _ = gen.communicate("go\n", timeout=600)
                result = json.loads(out.strip().splitlines()[-1])
            run = {"relay": "relay", **result, "rss_before_mb": before / MiB, "rss_idle_mb": with_idle / MiB, "peak_rss_mb": rss.peak / MiB}
            self.say(run)
            runs.append(run)
        return summarise(runs, ("rss_idle_mb", "peak_rss_mb", "p50_ms", "p99_ms", "max_ms"))

    def scenario_nodes(self, sink: SmtpSink) -> dict:
        """One relay node against two on one PostgreSQL spool, then the autovacuum soak (bench/nodes.py)."""
        measured = nodes.scenario(self, sink)
        keys = ("accepted_per_s", "end_to_end_per_s", "db_commits_per_message", "wal_syncs_per_message",
                "spool_commits_per_message", "longest_transaction_s", "database_cpu_ms_per_message")
        return {**summarise(measured["runs"], keys), "soak": measured["soak"]}


def summarise(runs: list[dict], keys: tuple[str, ...]) -> dict:
    """Per relay: the runs as measured, and the median of each key."""
    out: dict = {}
    for name in dict.fromkeys(run["relay"] for run in runs):
        mine = [run for run in runs if run["relay"] == name]
        cpu_keys = sorted({key for run in mine for key in run if key.startswith(CPU_MS)})
        median = {key: statistics.median(run.get(key, 0.0) for run in mine) for key in cpu_keys}
        median.update({key: statistics.median(run[key] for run in mine) for key in keys if all(key in run for run in mine)})
        out[name] = {"median": median, "runs": mine}
    return out


def _size_name(size: int) -> str:
    return f"{size // MiB} MB" if size >= MiB else f"{size // 1024} KB"


def _loadgen(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "loadgen.py"), *args], check=True, capture_output=True, text=True, timeout=900
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def _strace(pids: list[int], output: Path) -> subprocess.Popen:
    command = ["strace", "-f", "-c", "-e", "trace=fsync,fdatasync", "-o", str(output)]
    for pid in pids:
        command += ["-p", str(pid)]
    tracer = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    time.sleep(1)  # attaching takes a moment
    tracer.output = output
    return tracer


def _strace_stop(tracer: subprocess.Popen) -> int:
    tracer.send_signal(2)
    tracer.wait(30)
    text = tracer.output.read_text()
    return sum(int(m) for m in re.findall(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?f(?:data)?sync\s*$", text, re.M))


# -- report ---------------------------------------------------------------------------------------


def table(results: dict) -> str:
    s = results["scenarios"]
    rows = [("scenario", "relay", "postfix", "relay/postfix")]

    def both(label, data, key, fmt="{:.0f}"):
        relay, postfix = data.get("relay", {}).get("median", {}).get(key), data.get("postfix", {}).get("median", {}).get(key)
        ratio = f"{relay / postfix:.2f}x" if relay and postfix else ""
        rows.append((label, fmt.format(relay) if relay is not None else "", fmt.format(postfix) if postfix is not None else "", ratio))

    def roles(median: dict, skip: set[str]) -> str:
        return " + ".join(f"{key[len(CPU_MS):]} {value:.2f}" for key, value in median.items()
                          if key.startswith(CPU_MS) and key[len(CPU_MS):] not in skip and value >= 0.005)

    def cpu_rows(label: str, data: dict) -> None:
        """CPU ms per message over each process tree, then split by role."""
        both(f"{label}: CPU ms/msg (process tree)", data, f"{CPU_MS}total", "{:.2f}")
        rows.append((f"{label}: CPU ms/msg by role",
                     *(roles(data.get(name, {}).get("median", {}), {"total"}) for name in ("relay", "postfix")), ""))

    if "relay" in s:
        both("relay 5 KB x20: accepted msgs/s", s["relay"], "accepted_per_s")
        both("relay 5 KB x20: end-to-end msgs/s", s["relay"], "end_to_end_per_s")
        both("relay 5 KB x20: peak RSS MB (sum)", s["relay"], "peak_rss_mb")
        both("relay 5 KB x20: peak PSS MB (sum)", s["relay"], "peak_pss_mb")
        both("relay 5 KB x20: spool commits (fsyncs)/msg", s["relay"], "spool_commits_per_message", "{:.2f}")
        cpu_rows("relay 5 KB x20", s["relay"])
    if "fsync" in s:
        both("fsync+fdatasync per msg (strace)", s["fsync"], "strace_fsyncs_per_message", "{:.2f}")
    for size, data in s.get("sizes", {}).items():
        both(f"{size} x{data['sessions']}: end-to-end msgs/s", data, "end_to_end_per_s", "{:.1f}")
        both(f"{size} x{data['sessions']}: MB/s", data, "mb_per_s", "{:.1f}")
        cpu_rows(f"{size} x{data['sessions']}", data)
        both(f"{size} x{data['sessions']}: peak RSS MB (sum)", data, "peak_rss_mb", "{:.0f}")
        both(f"{size} x{data['sessions']}: peak PSS MB", data, "peak_pss_mb", "{:.0f}")
        if size == "10 MB":
            both(f"{size} x{data['sessions']}: RSS growth / msg size", data, "rss_growth_per_message_size", "{:.1f}")
    if "submission" in s:
        sub = s["submission"]
        for data in sub["patterns"].values():
            tls, plain = sub[data["tls"]]["median"], sub[data["plain"]]["median"]
            rows.append((f"submission {data['tls']}: end-to-end msgs/s tls / plain (cost)",
                         f"{tls['end_to_end_per_s']:.0f} / {plain['end_to_end_per_s']:.0f} ({100 * data['cost']['end_to_end_per_s']:.0f} %)", "", ""))
            rows.append(("  relay CPU ms/msg tls / plain (cost)",
                         f"{tls['relay_cpu_ms_per_message']:.2f} / {plain['relay_cpu_ms_per_message']:.2f} ({100 * data['relay_cpu_cost']:.0f} %)", "", ""))
            rows.append(("  relay CPU ms/msg main + acceptors, tls; plain",
                         f"{roles(tls, {'total'})}; {roles(plain, {'total'})}", "", ""))
            rows.append(("  client, sink CPU ms/msg tls; plain",
                         f"{tls['client_cpu_ms_per_message']:.2f}, {tls['sink_cpu_ms_per_message']:.2f}; "
                         f"{plain['client_cpu_ms_per_message']:.2f}, {plain['sink_cpu_ms_per_message']:.2f}", "", ""))
    if "idle" in s:
        idle = s["idle"]["relay"]["median"]
        rows.append((f"{results['config']['idle']} idle sessions: RSS MB (peak)", f"{idle['rss_idle_mb']:.0f} ({idle['peak_rss_mb']:.0f})", "", ""))
        rows.append(("  latency meanwhile p50 / p99 ms", f"{idle['p50_ms']:.1f} / {idle['p99_ms']:.1f}", "", ""))
    if "nodes" in s:
        sqlite = s["nodes"].get("1 node, sqlite", {}).get("median", {})
        if "end_to_end_per_s" in sqlite:
            rows.append(("same load, 1 node on SQLite: end-to-end / accepted msgs/s",
                         f"{sqlite['end_to_end_per_s']:.0f} / {sqlite['accepted_per_s']:.0f}", "", ""))
            rows.append(("same load, 1 node on SQLite: relay CPU ms/msg", f"{sqlite.get(CPU_MS + 'total', 0):.2f}", "", ""))
        one, two = s["nodes"].get("1 node", {}).get("median", {}), s["nodes"].get("2 nodes", {}).get("median", {})
        for label, key, fmt in (("end-to-end msgs/s", "end_to_end_per_s", "{:.0f}"), ("accepted msgs/s", "accepted_per_s", "{:.0f}"),
                                ("db transactions/msg", "db_commits_per_message", "{:.2f}"),
                                ("WAL syncs/msg", "wal_syncs_per_message", "{:.2f}"),
                                ("relay CPU ms/msg", CPU_MS + "total", "{:.2f}"),
                                ("database CPU ms/msg", "database_cpu_ms_per_message", "{:.2f}"),
                                ("longest transaction s", "longest_transaction_s", "{:.2f}")):
            if key in one and key in two:
                rows.append((f"postgres spool 1 node / 2 nodes: {label}", f"{fmt.format(one[key])} / {fmt.format(two[key])}", "",
                             f"{two[key] / one[key]:.2f}x" if one[key] else ""))
        for stage, tables in s["nodes"]["soak"].items():
            if isinstance(tables, dict):
                rows.append((f"soak {stage}: dead rows (table+index KB)",
                             ", ".join(f"{name} {row['dead']} ({row['table_kb'] + row['indexes_kb']})" for name, row in tables.items()), "", ""))
    for sessions, data in s.get("sweep", {}).items():
        both(f"sweep {sessions} sessions: end-to-end msgs/s", data, "end_to_end_per_s")
    if "backlog" in s:
        rows.extend((label, value, "", "") for label, value in backlog_rows(s["backlog"]))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


def backlog_rows(b: dict) -> list[tuple[str, str]]:
    def figure(value, fmt="{:.0f}"):
        return fmt.format(value) if value is not None else "n/a"

    return [
        (f"backlog {b['messages']} x {b['recipients_per_message']}: accepted msgs/s first / last 10 %",
         f"{figure(b['accepted_per_s_first_10pct'])} / {figure(b['accepted_per_s_last_10pct'])}"),
        ("  peak RSS MB (sum over processes), empty", f"{b['peak_rss_mb']:.0f}, {b['empty_rss_mb']:.0f}"),
        ("  queue list --limit 50: CLI / /api/queue ms", f"{b['cli_queue_list_limit_50_ms']:.0f} / {b['api_queue_limit_50_ms']:.1f}"),
        ("  SIGTERM to exit / restart to 220 s", f"{b['stop_s']:.1f} / {b['restart_to_220_s']:.1f}"),
        ("  drain recipients/s whole / middle 80 %",
         f"{b['drain_recipients_per_s']:.0f} / {figure(b['drain_recipients_per_s_middle_80pct'])}"),
        ("  upstream transactions per message; recipients sent more than once",
         f"{b['upstream_transactions_per_message']:.2f}; {b['recipients_sent_more_than_once']}"),
        ("  new mail during the drain: delay median / max s",
         f"{figure(b['probe_delay_s']['median'], '{:.1f}')} / {figure(b['probe_delay_s']['max'], '{:.1f}')}"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="repetitions per load (medians are reported)")
    parser.add_argument("--messages", type=int, default=5000, help="messages per run of the 5 KB loads")
    parser.add_argument("--only", default="relay,fsync,submission,sizes,idle,sweep", help="comma-separated scenarios")
    parser.add_argument("--sweep", default="1,5,10,20,50,100", help="parallel sessions for the plot")
    parser.add_argument("--idle", type=int, default=1000, help="idle sessions")
    parser.add_argument("--backlog-messages", type=int, default=200_000,
                        help="messages of 5 recipients queued with the upstream down in the backlog scenario (not in the default --only)")
    parser.add_argument("--per-connection", type=int, default=20, help="messages per connection in the submission scenario's reuse pattern")
    parser.add_argument("--submission", default="full,resumed,reuse",
                        help="the submission scenario's client patterns: full (a full TLS handshake per message), "
                             "resumed (a connection per message, TLS session resumed), reuse (--per-connection messages per connection)")
    parser.add_argument("--relay-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a relay config key, e.g. server.processes=1 (repeatable)")
    args = parser.parse_args()
    args.sweep = [int(n) for n in args.sweep.split(",")]
    args.submission = args.submission.split(",")
    scenarios = args.only.split(",")
    if os.geteuid() != 0 or not Path(SMTP_SOURCE).exists():
        raise SystemExit("run as root with Debian's postfix package installed (apt-get install postfix): "
                         "Postfix must start as root, and smtp-source/smtp-sink come with it")
    started = datetime.datetime.now()
    results = {
        "started": started.isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_before": os.getloadavg()},
        "relay_code": os.environ.get("PYTHONPATH", "the installed package"),  # what `python -m relay` ran: a worktree
        "config": {key: value for key, value in vars(args).items()},
        "scenarios": {},
    }
    print(f"load average before: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        bench = Bench(args, Path(tmp))
        with SmtpSink(Path(tmp)) as sink:
            for name in scenarios:
                print(f"== {name}", flush=True)
                method = getattr(bench, f"scenario_{name}")
                results["scenarios"][name] = method() if name == "submission" else method(sink)
    results["machine"]["loadavg_after"] = os.getloadavg()
    results["seconds"] = (datetime.datetime.now() - started).total_seconds()
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / started.strftime("%Y%m%d-%H%M%S")
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(f"\nload average after: {os.getloadavg()}; {results['seconds']:.0f} s")
    print(table(results))
    print(f"\nwrote {stem}.json")
    if "sweep" in results["scenarios"]:
        from plot import plot_sweep

        plot_sweep(results, stem.with_suffix(".png"))
        print(f"wrote {stem}.png")
    if "backlog" in results["scenarios"]:
        from plot import plot_backlog

        plot_backlog(results, stem.with_name(stem.name + "-backlog.png"))
        print(f"wrote {stem}-backlog.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
