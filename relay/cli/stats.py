"""`stats`: SendCloud-style statistics from the spool's hourly counters (instant on any span)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from relay.cli.common import load_spool, with_config
from relay.config import Spool as SpoolSettings
from relay.events.stats import COUNTERS, GROUPS


def cmd_stats(args: argparse.Namespace) -> int:
    return asyncio.run(_stats(args, load_spool(args)))


async def _stats(args: argparse.Namespace, settings: SpoolSettings) -> int:
    from relay.ops import events_view
    from relay.spool import open_spool

    spool = open_spool(settings)
    await spool.open()
    try:
        rows = await events_view.stats_rows(spool, args.since, args.until, args.by, args.group, time.time())
    except ValueError as error:
        print(f"stats: {error}", file=sys.stderr)
        return 2
    finally:
        await spool.close()
    if args.json:
        print(json.dumps({"rows": rows}, indent=2))
        return 0
    for line in table(rows, args.group):
        print(line)
    return 0


def table(rows: list[dict], group: str | None) -> list[str]:
    columns = ["period", *([group] if group else []), *COUNTERS, "delivered_rate", "open_rate", "click_rate"]
    cells = [[str(row[column]) for column in columns] for row in rows]
    widths = [max([len(column), *(len(line[i]) for line in cells)]) for i, column in enumerate(columns)]
    return [" ".join(text.rjust(width) for text, width in zip(line, widths, strict=True)) for line in [columns, *cells]]


def register(sub) -> None:
    stats = with_config(sub.add_parser("stats", help="statistics from what the relay sent and SendCloud's events"))
    stats.add_argument("--since", default="7d", help="a duration back from now (7d) or a date (UTC); default 7d")
    stats.add_argument("--until", help="through this date (UTC)")
    stats.add_argument("--by", choices=["day", "hour"], default="day", help="one row per day (default) or hour")
    stats.add_argument("--group", choices=GROUPS, help="one row per user, account, channel, label or recipient domain")
    stats.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    stats.set_defaults(func=cmd_stats)
