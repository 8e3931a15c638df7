"""`queue list / show / retry / delete / flush`: the spool, through the same Spool protocol the relay uses."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from relay.cli.common import load, with_config
from relay.config import (
    Config,
)
from relay.ops import queue_view
from relay.spool import open_spool


def cmd_queue(args: argparse.Namespace) -> int:
    config = load(args)
    return asyncio.run(_queue(args, config))


async def _queue(args: argparse.Namespace, config: Config) -> int:
    if args.action in ("show", "retry", "delete") and not args.id:
        print(f"queue {args.action} needs a message ID", file=sys.stderr)
        return 2
    spool = open_spool(config.spool)
    await spool.open()
    try:
        if args.action == "list":
            for line in queue_view.list_lines(await spool.list(include_final=args.all)):
                print(line)
            return 0
        if args.action == "flush":
            print(f"{await spool.retry()} deferred recipient(s) made due now")
            return 0
        if args.action == "show":
            message = await spool.get(args.id)
            if message is None:
                print(f"{args.id}: no such message", file=sys.stderr)
                return 1
            if args.json:
                print(json.dumps(queue_view.show_record(message, time.time(), await spool.fates(args.id)), indent=2))
                return 0
            for line in queue_view.show_lines(message, config, fates=await spool.fates(args.id)):
                print(line)
            return 0
        if args.action == "retry":
            count = await spool.retry(args.id)
            print(f"{args.id}: {count} recipient(s) made due now" if count else f"{args.id}: nothing pending")
            return 0 if count else 1
        if await spool.delete(args.id):
            print(f"{args.id}: deleted")
            return 0
        print(f"{args.id}: no such message", file=sys.stderr)
        return 1
    finally:
        await spool.close()


def register(sub) -> None:
    queue = with_config(sub.add_parser("queue", help="inspect and act on the spool"))
    queue.add_argument("action", choices=["list", "show", "retry", "delete", "flush"])
    queue.add_argument("id", nargs="?")
    queue.add_argument("--all", action="store_true", help="list: include delivered and failed messages")
    queue.add_argument("--json", action="store_true", help="show: one JSON object, SendCloud's events included")
    queue.set_defaults(func=cmd_queue)
