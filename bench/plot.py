"""The throughput-against-parallel-sessions plot (matplotlib, a bench-only extra)."""

from __future__ import annotations

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
