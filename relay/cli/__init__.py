"""The `sendcloud-relay` command: one module per command group, each registering its subcommands.

Every command imports every group (the parser needs them all), so a stage or a third-party
package that only some commands run is imported inside them, not at a group's top: start-up is
most of a read-only command's time (tests/unit/cli/test_start_up_imports.py pins what `queue
list` and the other read-only commands load).
"""

from __future__ import annotations

import argparse
import os
import sys

from relay import __version__
from relay.cli import check, dkim, domain, migrate, passwords, queue, send_test, serve, stats, suppression
from relay.config import ConfigError

_BROKEN_PIPE = 141  # what a shell reports for a command whose reader went away (128 + SIGPIPE)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sendcloud-relay",
        description="An SMTP relay and submission gateway in front of SendCloud.",
        epilog="Each command finds its config as -c FILE, else $SENDCLOUD_RELAY_CONFIG, else "
               "/etc/sendcloud-relay/relay.yaml. `sendcloud-relay COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"sendcloud-relay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (serve, check, migrate, passwords, dkim, domain, queue, send_test, suppression, stats):
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
    except BrokenPipeError:  # piped into `head`: the rest of the output has no reader
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush fails silently
        return _BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
