"""`queue list / show / retry / delete / flush`: the spool, through the same Spool protocol the relay uses.

No action uses a secret: `queue` works on a host (or in a shell) where ``${SC_KEY}`` and the
key files are not there. Every action but `show` (which names each account's api_user) reads
only the ``spool`` section. Every action refuses a spool that does not exist rather than
creating an empty one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from relay.cli.common import load, load_spool, with_config
from relay.config import Config
from relay.config import Spool as SpoolSettings
from relay.events.status import STATUSES
from relay.ops import queue_view
from relay.spool import SchemaMismatch, SpoolMissing, State, open_spool


def cmd_queue(args: argparse.Namespace) -> int:
    if args.action == "show":  # names the message's account's api_user: the whole config
        action = _show(args, load(args, secrets=False))
    else:
        action = _ACTIONS[args.action](args, load_spool(args))
    try:
        return asyncio.run(action)
    except SpoolMissing as error:
        print(f"{error} (spool.path): nothing was ever queued here, or the config is not the relay's", file=sys.stderr)
        return 1
    except BrokenPipeError:  # piped into `head`: relay.cli.main ends it quietly
        raise
    except (SchemaMismatch, OSError) as error:  # a shared spool not migrated, or not reachable
        print(f"queue {args.action}: {error}", file=sys.stderr)
        return 1


async def _with_spool(settings: SpoolSettings, act):
    spool = open_spool(settings, create=False)
    await spool.open()
    try:
        return await act(spool)
    finally:
        await spool.close()


async def _list(args: argparse.Namespace, settings: SpoolSettings) -> int:
    now = time.time()
    try:
        query = queue_view.list_query(include_final=args.all, user=args.user, to=args.to, state=args.state,
                                      since=args.since, status=args.status, email_id=args.email_id,
                                      after=args.after, limit=args.limit, now=now)
    except ValueError as error:
        print(f"queue list: {error}", file=sys.stderr)
        return 2
    messages, more_after = queue_view.page(await _with_spool(settings, lambda spool: spool.list(query)), query)
    if args.json:
        print(json.dumps({"messages": [queue_view.list_record(m, now) for m in messages],
                          "count": len(messages), "next_after": more_after}, indent=2))
    else:
        for line in queue_view.list_lines(messages, now, more_after):
            print(line)
    return 0


async def _show(args: argparse.Namespace, config: Config) -> int:
    async def message_and_fates(spool):
        return await spool.get(args.id), await spool.fates(args.id)

    message, fates = await _with_spool(config.spool, message_and_fates)
    if message is None:
        print(f"{args.id}: no such message", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(queue_view.show_record(message, time.time(), fates), indent=2))
    else:
        for line in queue_view.show_lines(message, config, fates=fates):
            print(line)
    return 0


async def _retry(args: argparse.Namespace, settings: SpoolSettings) -> int:
    count = await _with_spool(settings, lambda spool: spool.retry(args.id))
    print(f"{args.id}: {count} recipient(s) made due now" if count else f"{args.id}: nothing pending")
    return 0 if count else 1


async def _flush(args: argparse.Namespace, settings: SpoolSettings) -> int:
    print(f"{await _with_spool(settings, lambda spool: spool.retry())} deferred recipient(s) made due now")
    return 0


async def _delete(args: argparse.Namespace, settings: SpoolSettings) -> int:
    if await _with_spool(settings, lambda spool: spool.delete(args.id)):
        print(f"{args.id}: deleted")
        return 0
    print(f"{args.id}: no such message", file=sys.stderr)
    return 1


_ACTIONS = {"list": _list, "retry": _retry, "flush": _flush, "delete": _delete}  # and show, with the whole config


def register(sub) -> None:
    queue = sub.add_parser("queue", help="inspect and act on the spool", description="Inspect and act on the spool.")
    actions = queue.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = with_config(actions.add_parser(
        "list", help="one line per message: ID, age, user, account, recipients, state",
        description="Messages waiting for delivery, oldest first (all messages with --all).",
    ))
    listing.add_argument("--all", action="store_true", help="include messages whose recipients are all delivered or failed")
    listing.add_argument("--user", help="only this local user's messages")
    listing.add_argument("--to", metavar="ADDR", help="only messages with this recipient")
    listing.add_argument("--state", choices=[state.value for state in State],
                         help="only messages with a recipient in this state")
    listing.add_argument("--since", metavar="AGE|DATE", help="only messages received since: 1d, 90m, or 2026-12-01")
    listing.add_argument("--status", choices=STATUSES, help="only messages with a recipient of this SendCloud status")
    listing.add_argument("--email-id", metavar="ID", help="the message with this SendCloud emailId")
    listing.add_argument("--limit", type=int, metavar="N", help="at most N messages")
    listing.add_argument("--after", metavar="ID", help="start after this queue ID (the next page)")
    listing.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    show = with_config(actions.add_parser("show", help="every recipient's state, attempts, last reply and why it waits"))
    show.add_argument("id", metavar="ID", help="the queue ID (from queue list, or the 250 reply)")
    show.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    retry = with_config(actions.add_parser("retry", help="make one message's waiting recipients due now"))
    retry.add_argument("id", metavar="ID", help="the queue ID")
    delete = with_config(actions.add_parser("delete", help="remove a message from the spool"))
    delete.add_argument("id", metavar="ID", help="the queue ID")
    with_config(actions.add_parser("flush", help="make every deferred recipient due now (postqueue -f)"))
    queue.set_defaults(func=cmd_queue)
