"""The spool at backlog scale, built directly (no SMTP): operator reads, metrics, restart, purge.

    .venv/bin/python bench/spool_scale.py [--messages 200000] [--recipients 5] [--size 5120]
        [--purge 100000] [--out bench/results/spool-scale-<time>.json]

Builds a scratch spool of ``--messages`` pending messages of ``--recipients`` recipients each
through ``SpoolStore.insert`` in large transactions (a minute instead of the benchmark's
quarter of an hour), then measures on it: ``queue list --limit 50`` (the query in process,
and the CLI command's wall time next to the same command on an empty spool, which is
Python's start-up), ``pending_summary`` (what every /metrics scrape runs), ``serve`` from
start to the listener's ``220`` with that backlog, and the latency of single-message commits
while ``purge_final`` forgets ``--purge`` final messages (on a spool of their own), in
batches (this branch) and as one DELETE (what the spool did before).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from peers import free_port, wait_greeting, write_results

from relay.spool import NewMessage, RecipientUpdate, State
from relay.spool.sqlite import SqliteSpool, open_store

ROOT = Path(__file__).resolve().parent.parent
RECEIVED = time.time() - 3600  # recent: older than spool.max_lifetime would fail at the first attempt
ACCOUNT = "sink"


def message(number: int, recipients: int, size: int, received_at: float = RECEIVED) -> NewMessage:
    header = f"From: bench@bench.test\r\nSubject: backlog {number}\r\n\r\n".encode()
    return NewMessage(f"B{number:010d}", received_at + number / 1000, "trusted", "smtp", "127.0.0.1", ACCOUNT,
                      "trigger", "bench@bench.test", [f"r{n}@example.net" for n in range(recipients)],
                      header + b"x" * max(0, size - len(header)))


def build(path: Path, messages: int, recipients: int, size: int, first: int = 0) -> float:
    """``messages`` pending messages through SpoolStore.insert, 5,000 per transaction; seconds taken."""
    store = open_store(path)
    started = time.monotonic()
    try:
        for start in range(first, first + messages, 5000):
            store.conn.execute("BEGIN")
            for number in range(start, min(start + 5000, first + messages)):
                store.insert(message(number, recipients, size))
            store.conn.execute("COMMIT")
    finally:
        store.conn.close()
    return time.monotonic() - started


def timed(fn, repeat: int = 5) -> dict:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return {"median_ms": statistics.median(times), "max_ms": max(times)}


def relay_config(spool: Path, port: int) -> dict:
    """Enough of a relay to serve: a trusted listener, the spool, an upstream nobody listens on."""
    return {
        "server": {"hostname": "relay.bench.test", "processes": 1,
                   "listeners": [{"name": "smtp", "bind": "127.0.0.1", "port": port, "tls": "none", "auth": "none"}],
                   "trusted_networks": [{"cidr": "127.0.0.0/8", "user": "trusted"}]},
        "spool": {"path": str(spool)},
        "upstream": {"kind": "smtp", "host": "127.0.0.1", "port": free_port(), "tls": "none"},
        "admin": {"listen": None},
        "accounts": {ACCOUNT: {"api_user": "sink_user", "type": "trigger", "domain": "bench.test"}},
        "users": {"trusted": {"channels": {"trigger": ACCOUNT}}},
    }


def cli_list(config: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "relay", "queue", "list", "--limit", "50", "-c", str(config)],
                   check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    return (time.perf_counter() - started) * 1000


def serve_to_220(config: Path) -> float:
    """Seconds from starting ``serve`` to its listener's 220, then SIGTERM."""
    port = yaml.safe_load(config.read_text())["server"]["listeners"][0]["port"]
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "relay", "serve", "-c", str(config)], cwd=config.parent,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_greeting(port, 120)
        return time.monotonic() - started
    finally:
        process.terminate()
        process.wait(60)


def reads(path: Path, workdir: Path) -> dict:
    store = open_store(path)
    try:
        from relay.spool import ListQuery

        figures = {
            "list_limit_50_query": timed(lambda: store.list(ListQuery(limit=50))),
            "pending_summary": timed(store.pending_summary),
            "pending_summary_value": list(store.pending_summary()[:2]),
        }
    finally:
        store.conn.close()
    empty = workdir / "empty" / "spool.db"
    open_store(empty).conn.close()
    for name, spool in (("empty", empty), ("backlog", path)):
        config = workdir / f"{name}.yaml"
        config.write_text(yaml.safe_dump(relay_config(spool, free_port())))
        figures[f"cli_queue_list_limit_50_{name}_ms"] = statistics.median(cli_list(config) for _ in range(3))
        figures[f"serve_to_220_{name}_s"] = statistics.median(serve_to_220(config) for _ in range(3))
    return figures


async def purge_latency(path: Path, final: int, batched: bool) -> dict:
    """Commit latency of single stores (one at a time, as a quiet client) while ``final``
    delivered messages are forgotten."""
    spool = SqliteSpool(path)
    await spool.open()
    try:
        size = 5120
        for start in range(0, final, 5000):  # the messages to forget, delivered
            batch = [message(10**8 + n, 1, size) for n in range(start, min(start + 5000, final))]
            await asyncio.gather(*(spool.store(m) for m in batch))
            await spool.record([RecipientUpdate(m.id, 0, State.DELIVERED, 1, 0, "250 ok", None) for m in batch])
        purging = asyncio.create_task(
            spool.purge_final(RECEIVED + 10**9) if batched
            else spool._write(lambda store: store.conn.execute(
                "DELETE FROM messages WHERE pending = 0 AND received_at < ?", (RECEIVED + 10**9,)).rowcount)
        )
        latencies, number, started = [], 2 * 10**8, time.monotonic()
        await asyncio.sleep(0)
        while not purging.done():
            number += 1
            began = time.perf_counter()
            await spool.store(dataclasses.replace(message(number, 1, size), received_at=time.time()))
            latencies.append((time.perf_counter() - began) * 1000)
        purged, seconds = await purging, time.monotonic() - started
    finally:
        await spool.close()
    latencies.sort()
    return {"purged": purged, "seconds": seconds, "stores_meanwhile": len(latencies),
            "p50_ms": latencies[len(latencies) // 2] if latencies else None,
            "p99_ms": latencies[int(len(latencies) * 0.99)] if latencies else None,
            "max_ms": latencies[-1] if latencies else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--recipients", type=int, default=5)
    parser.add_argument("--size", type=int, default=5120)
    parser.add_argument("--purge", type=int, default=100_000, help="final messages forgotten while commits are timed")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--spool", type=Path, help="a spool built by an earlier run to measure again (built there if missing; kept)")
    args = parser.parse_args()
    started = datetime.datetime.now()
    results = {"started": started.isoformat(timespec="seconds"), "config": {k: str(v) for k, v in vars(args).items()},
               "loadavg_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="spool-scale-", dir=os.environ.get("SPOOL_SCALE_DIR")) as tmp:
        workdir = Path(tmp)
        path = args.spool or workdir / "backlog" / "spool.db"
        if not path.exists():
            results["build_s"] = build(path, args.messages, args.recipients, args.size)
        results["spool_db_mb"] = path.stat().st_size / 2**20
        results.update(reads(path, workdir))
        print(json.dumps(results, indent=1), flush=True)
        for batched in (False, True):
            scratch = workdir / f"purge-{batched}" / "spool.db"
            name = "purge_batched" if batched else "purge_one_delete"
            results[name] = asyncio.run(purge_latency(scratch, args.purge, batched))
            print(name, results[name], flush=True)
            shutil.rmtree(scratch.parent)
    out = write_results(results, args.out, "spool-scale", started)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
