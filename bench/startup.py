"""Start-up: `queue list --limit 50` (wall and CPU) and `serve` to its `220`, for one tree or two alternated.

    .venv/bin/python bench/startup.py [--tree DIR ...] [--runs 10] [--messages 2000] [--source] [--out FILE]

Each ``--tree`` is a checkout of the relay (default: this one); with two (``git worktree add
--detach /tmp/base main`` for the other) they alternate run by run, so both see the same load.
The CLI lists a spool of ``--messages`` × 5 recipients built directly (spool_scale.build); what
it measures is the command's own start-up, which the query (a few ms) does not change. ``serve``
runs on an empty spool until its listener greets: in one process (``server.processes: 1``), and
with two acceptor processes (the default ``auto`` on two CPUs), where an acceptor greets.
CPU is user + system time of the command's process (for serve from /proc at the greeting, the
main process only): the figure load disturbs less than wall time. Each tree's ``relay`` is
byte-compiled first, as ``pip install`` does; ``--source`` leaves it as it is (this machine sets
PYTHONDONTWRITEBYTECODE, so an uncompiled checkout compiles every module of the relay at every
start).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from peers import free_port, wait_greeting, write_results
from spool_scale import build, relay_config

from relay.spool.sqlite import open_store

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def environment(tree: Path) -> dict[str, str]:
    """The relay of ``tree``, not the editable install's."""
    return {**os.environ, "PYTHONPATH": str(tree)}


def queue_list(tree: Path, config: Path) -> tuple[float, float]:
    """Wall and CPU milliseconds of one `queue list --limit 50`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "relay", "queue", "list", "--limit", "50", "-c", str(config)],
                   check=True, stdout=subprocess.DEVNULL, cwd=tree, env=environment(tree))
    wall = (time.perf_counter() - started) * 1000
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000


def process_cpu_ms(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / TICK  # utime, stime


def serve_to_220(tree: Path, config: Path, port: int) -> tuple[float, float]:
    """Wall and CPU milliseconds from starting `serve` to its listener's greeting."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "relay", "serve", "-c", str(config)], cwd=config.parent,
                               env=environment(tree), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_greeting(port, 120)
        return (time.perf_counter() - started) * 1000, process_cpu_ms(process.pid)
    finally:
        process.terminate()
        process.wait(60)


# `queue list`'s steps in the order it takes them, CPU ms after each: where the floor is.
STEPS = """
import resource, sys
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (usage.ru_utime + usage.ru_stime) * 1000
marks = [("interpreter and site", cpu())]
import argparse, asyncio, json
marks.append(("argparse, asyncio, json", cpu()))
import yaml
marks.append(("yaml", cpu()))
import pydantic
from pydantic import BaseModel
marks.append(("pydantic", cpu()))
import relay.config
marks.append(("relay.config (the schema's classes)", cpu()))
settings = relay.config.load_section(sys.argv[1], "spool")
marks.append(("read and validate the spool section", cpu()))
import relay.cli
marks.append(("relay.cli (every group, the rest of relay.spool)", cpu()))
from relay.spool import ListQuery, open_spool
async def listing():
    spool = open_spool(settings, create=False)
    await spool.open()
    try:
        return await spool.list(ListQuery(limit=50))
    finally:
        await spool.close()
asyncio.run(listing())
marks.append(("open the spool, list 50, close", cpu()))
print(json.dumps({name: at - before for (name, at), before in zip(marks, [0] + [at for _, at in marks])}))
"""


def steps(tree: Path, config: Path, runs: int) -> dict[str, float]:
    """Median CPU ms of each step of `queue list` (STEPS), over ``runs`` fresh interpreters."""
    samples = [json.loads(subprocess.run([sys.executable, "-c", STEPS, str(config)], check=True, capture_output=True,
                                         text=True, cwd=tree, env=environment(tree)).stdout) for _ in range(runs)]
    return {name: statistics.median(sample[name] for sample in samples) for name in samples[0]}


def summary(samples: list[tuple[float, float]]) -> dict:
    walls, cpus = [wall for wall, _ in samples], [cpu for _, cpu in samples]
    return {"wall_ms_median": statistics.median(walls), "wall_ms_min": min(walls), "wall_ms_max": max(walls),
            "cpu_ms_median": statistics.median(cpus), "wall_ms": walls, "cpu_ms": cpus}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, action="append", help="a checkout of the relay (repeat to compare)")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--source", action="store_true", help="do not byte-compile the trees first")
    parser.add_argument("--steps", action="store_true", help="also time `queue list`'s steps in the last tree")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    trees = [tree.resolve() for tree in args.tree or [ROOT]]
    if not args.source:
        for tree in trees:
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "relay")], check=True)
    started = datetime.datetime.now()
    results: dict = {"started": started.isoformat(timespec="seconds"), "runs": args.runs, "messages": args.messages,
                     "byte_compiled": not args.source, "loadavg_before": os.getloadavg(), "trees": {}}
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        workdir = Path(tmp)
        backlog, empty = workdir / "backlog" / "spool.db", workdir / "empty" / "spool.db"
        build(backlog, args.messages, 5, 5120)
        open_store(empty).conn.close()
        listing = workdir / "list.yaml"
        listing.write_text(yaml.safe_dump(relay_config(backlog, free_port())))
        port = free_port()
        serving = {}
        for processes in (1, 2):
            config = relay_config(empty, port)
            config["server"]["processes"] = processes
            serving[processes] = workdir / f"serve-{processes}.yaml"
            serving[processes].write_text(yaml.safe_dump(config))
        samples = {tree: {"queue_list": [], 1: [], 2: []} for tree in trees}
        for _ in range(args.runs):
            for tree in trees:
                samples[tree]["queue_list"].append(queue_list(tree, listing))
            for processes, tree in ((processes, tree) for processes in (1, 2) for tree in trees):
                samples[tree][processes].append(serve_to_220(tree, serving[processes], port))
        if args.steps:
            results["queue_list_steps_cpu_ms"] = steps(trees[-1], listing, args.runs)
            for name, cpu in results["queue_list_steps_cpu_ms"].items():
                print(f"  {cpu:6.1f} ms  {name}")
    for tree in trees:
        commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=False).stdout.strip()
        figures = {"commit": commit, "queue_list_limit_50": summary(samples[tree]["queue_list"]),
                   "serve_to_220_empty": summary(samples[tree][1]),
                   "serve_to_220_empty_two_acceptors": summary(samples[tree][2])}
        results["trees"][str(tree)] = figures
        print(f"{tree} ({commit}):")
        for name in ("queue_list_limit_50", "serve_to_220_empty", "serve_to_220_empty_two_acceptors"):
            print(f"  {name}: {figures[name]['wall_ms_median']:.0f} ms wall, {figures[name]['cpu_ms_median']:.0f} ms cpu")
    out = write_results(results, args.out, "startup", started)
    print(f"load {results['loadavg_before'][0]:.1f} -> {results['loadavg_after'][0]:.1f}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
