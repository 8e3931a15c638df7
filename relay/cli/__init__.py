"""The `sendcloud-relay` command (argparse: the standard library does this job well).

One module per command group; each registers its subcommands in :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import sys

from relay.cli import check, dkim, domain, passwords, queue, send_test, serve, stats, suppression
from relay.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sendcloud-relay", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (serve, check, passwords, dkim, domain, queue, send_test, suppression, stats):
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "send-test" and not args.to:
        args.to = ["test@example.net"]
    try:
        return args.func(args)
    except ConfigError as error:
        print(f"config error:\n{error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
