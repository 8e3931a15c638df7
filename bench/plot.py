"""The throughput-against-parallel-sessions plot (matplotlib, a bench-only extra)."""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_sweep(results: dict, path: Path) -> None:
    sweep = results["scenarios"]["sweep"]
    sessions = sorted(sweep, key=int)
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, color in (("relay", "tab:blue"), ("postfix", "tab:red")):
        for key, label, style in (("end_to_end_per_s", "end to end", "o-"), ("accepted_per_s", "accepted", "x:")):
            points = [(int(n), sweep[n][name]["median"][key]) for n in sessions if name in sweep[n]]
            if points:
                xs, ys = zip(*points, strict=True)
                axes.plot(xs, ys, style, color=color, label=f"{'sendcloud-relay' if name == 'relay' else 'Postfix'} {label}")
    axes.set_xscale("log")
    axes.set_xticks([int(n) for n in sessions], labels=sessions)
    axes.set_xlabel("parallel sessions (smtp-source -s)")
    axes.set_ylabel("messages/s (5 KB, median of runs)")
    axes.set_ylim(bottom=0)
    axes.grid(True, alpha=0.3)
    axes.legend()
    load = results["machine"]
    axes.set_title(
        f"smtp-source → relay → smtp-sink on 127.0.0.1, {load['cpus']} CPUs, {results['started']}\n"
        f"load average before {load['loadavg_before'][0]:.1f}, after {load['loadavg_after'][0]:.1f}",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_backlog(results: dict, path: Path) -> None:
    """Acceptance, recipients waiting and the drain over time, and the relay's RSS."""
    backlog = results["scenarios"]["backlog"]
    samples = [s for s in backlog["samples"] if "messages" in s]
    figure, (rates, waiting) = plt.subplots(2, 1, figsize=(8, 6.5), dpi=120, sharex=True)
    for phase, color, label in (("inject", "tab:blue", "accepted msgs/s"), ("drain", "tab:green", "drained recipients/s")):
        points = [s for s in samples if s["phase"] == phase]
        key = "messages" if phase == "inject" else None
        xs, ys = [], []
        for before, after in itertools.pairwise(points):
            if key:
                change = after[key] - before[key]
            else:
                change = (before["queued"] + before["deferred"]) - (after["queued"] + after["deferred"])
            xs.append(after["t"])
            ys.append(max(0.0, change / (after["t"] - before["t"])))
        rates.plot(xs, ys, color=color, label=label, linewidth=0.8)
    rates.set_ylabel("per second")
    rates.set_ylim(bottom=0)
    rates.grid(True, alpha=0.3)
    rates.legend(loc="upper right")
    waiting.plot([s["t"] for s in samples], [s["queued"] + s["deferred"] for s in samples], color="tab:red",
                 label="recipients waiting")
    waiting.set_ylabel("recipients waiting")
    waiting.set_xlabel("seconds since the relay started")
    waiting.grid(True, alpha=0.3)
    memory = waiting.twinx()
    with_rss = [s for s in backlog["samples"] if s.get("rss_mb", 0) > 1]  # not the moment a process exits
    memory.plot([s["t"] for s in with_rss], [s["rss_mb"] for s in with_rss], color="tab:gray", linewidth=0.8, label="RSS MB")
    memory.set_ylabel("RSS MB (sum over the relay's processes)")
    memory.set_ylim(bottom=0)
    waiting.legend(loc="upper left")
    memory.legend(loc="upper right")
    load = results["machine"]
    rates.set_title(
        f"backlog: {backlog['messages']} x {backlog['recipients_per_message']} recipients, upstream down then back "
        f"(queue flush), {load['cpus']} CPUs, {results['started']}\n"
        f"load average before {load['loadavg_before'][0]:.1f}, after {load['loadavg_after'][0]:.1f}",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


if __name__ == "__main__":  # plot a backlog result again: python bench/plot.py bench/results/<time>.json
    import json
    import sys

    source = Path(sys.argv[1])
    plot_backlog(json.loads(source.read_text()), source.with_name(source.stem + "-backlog.png"))
