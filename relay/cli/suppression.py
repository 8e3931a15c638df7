"""`suppression list / add / remove / import / export`: the list the relay refuses recipients by.

Writes go to the spool like the relay's own; a running relay sees them within a second or two
(its cache follows the list's version).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from relay.cli.common import load_spool, with_config
from relay.config import Spool as SpoolSettings


def cmd_suppression(args: argparse.Namespace) -> int:
    return asyncio.run(_suppression(args, load_spool(args)))


async def _suppression(args: argparse.Namespace, settings: SpoolSettings) -> int:
    from relay.events.suppression import parse_csv, to_csv
    from relay.ops import events_view
    from relay.policy.suppression import normalise_address
    from relay.spool import open_spool

    now = time.time()
    if args.action in ("add", "remove", "import") and not args.target:
        print(
            f"suppression {args.action} needs {'a FILE' if args.action == 'import' else 'an address'}", file=sys.stderr
        )
        return 2
    try:
        text = Path(args.target).read_text(encoding="utf-8") if args.action == "import" else None
        rows = parse_csv(text, now) if text is not None else None
        entry = (
            events_view.manual_entry(args.target, args.reason, args.account, args.expires, now)
            if args.action == "add"
            else None
        )
    except (OSError, ValueError) as error:  # SuppressionImportError lists every bad line
        print(f"suppression {args.action}: {error}", file=sys.stderr)
        return 1
    spool = open_spool(settings)
    await spool.open()
    try:
        if args.action == "list":
            found = await events_view.entries(spool, now)
            if args.json:
                print(json.dumps([events_view.entry_record(e) for e in found], indent=2))
            else:
                for e in found:
                    record = events_view.entry_record(e)
                    print(
                        f"{e.address}  {e.reason}  {','.join(record['channels'])}  {e.account or '*'}  "
                        f"added {record['added_at']}" + (f"  expires {record['expires_at']}" if e.expires_at else "")
                    )
                print(f"-- {len(found)} entr{'y' if len(found) == 1 else 'ies'}")
            return 0
        if args.action == "export":
            sys.stdout.write(to_csv(await events_view.entries(spool, now)))
            return 0
        if args.action == "add":
            await spool.add_suppressions([events_view.entry_row(entry)])
            print(
                f"{entry.address}: suppressed ({entry.reason})"
                + (f" for account {entry.account}" if entry.account else "")
            )
            return 0
        if args.action == "import":
            count = await spool.add_suppressions([events_view.entry_row(row.to_entry(now)) for row in rows])
            print(f"{count} entr{'y' if count == 1 else 'ies'} imported")
            return 0
        removed = await spool.remove_suppression(normalise_address(args.target), args.account)
        print(f"{args.target}: {removed} entr{'y' if removed == 1 else 'ies'} removed")
        return 0 if removed else 1
    finally:
        await spool.close()


def register(sub) -> None:
    parser = with_config(sub.add_parser("suppression", help="the suppression list"))
    parser.add_argument("action", choices=["list", "add", "remove", "import", "export"],
                        help="list the entries, add or remove an address, import or export CSV")
    parser.add_argument("target", nargs="?", help="add/remove: the address; import: the CSV file")
    parser.add_argument("--reason", help="add: invalid, report_spam, unsubscribe or manual (default)")
    parser.add_argument("--account", help="add: only for this account; remove: only this account's entry")
    parser.add_argument("--expires", help="add: a duration (30d) or an ISO date")
    parser.add_argument("--json", action="store_true", help="list: a JSON array")
    parser.set_defaults(func=cmd_suppression)
