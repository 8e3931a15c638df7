"""`serve` and `reload`: run the relay; make a running one re-read its config."""

from __future__ import annotations

import argparse
import logging
import sys

from relay.cli.common import NOT_FOUND, config_path, with_config
from relay.config import (
    acceptor_count,
    load_config,
    load_demo_config,
    load_section,
)


def cmd_serve(args: argparse.Namespace) -> int:
    from relay.observe import logs
    from relay.observe.metrics_directory import shared_metrics
    from relay.process.loop import run_event_loop

    path = config_path(args)
    config = load_config(path) if path else load_demo_config()
    logs.configure(config.logging, logs.secrets_of(config), args.verbose)
    if path is None:
        logging.getLogger("relay").warning("%s; running the embedded demo config (capture upstream)", NOT_FOUND)
    with shared_metrics(several_processes=acceptor_count(config) > 1):
        from relay.process.main import serve  # imports relay.observe.metrics: only now
        from relay.process.startup import StartupError

        try:
            run_event_loop(serve(config, path, args.verbose), config.server.event_loop)
        except StartupError as error:
            print(f"fatal: {error}", file=sys.stderr)
            return 1
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the running relay, through its admin endpoint, to re-read its config; print the outcome.

    The admin endpoint rather than a pid file and a signal: the relay answers whether the new
    config was taken, and why not, and it works the same in a container. Only the file's
    ``admin`` section is read here; the relay validates the rest. (SIGHUP does the same
    reload, for `systemctl reload` and `docker kill -s HUP`, but its outcome is only logged.)
    """
    from relay.cli import admin_client

    path = config_path(args)
    if path is None:
        print(NOT_FOUND, file=sys.stderr)
        return 1
    settings = load_section(path, "admin")
    if not settings.listen:
        print("admin.listen is off in this config: send SIGHUP to the relay's process instead", file=sys.stderr)
        return 1
    try:
        answer = admin_client.post(settings, "/api/reload", args.timeout)
    except admin_client.Unreachable as error:
        print(error, file=sys.stderr)
        return 1
    if not answer.get("reloaded"):
        print(f"reload refused by {_relay_named(answer)}; it keeps its running config:\n{answer.get('error')}",
              file=sys.stderr)
        return 1
    print(f"reloaded {_relay_named(answer)}")
    for setting in answer.get("restart_needed", []):
        print(f"  {setting} changed: takes effect at the next restart")
    return 0


def _relay_named(answer: dict) -> str:
    """Which relay took the reload, as its answer names it: the one the operator meant, or not."""
    return (f"the relay on {answer.get('hostname', '?')} (pid {answer.get('pid', '?')}, "
            f"config {answer.get('config') or '<embedded demo>'})")


def register(sub) -> None:
    serve = with_config(sub.add_parser("serve", help="run listeners and delivery"))
    serve.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    serve.set_defaults(func=cmd_serve)

    reload = with_config(sub.add_parser("reload", help="make the running relay re-read its config (via admin.listen)"))
    reload.add_argument("--timeout", type=float, default=30, help="seconds to wait for the relay's answer (default 30)")
    reload.set_defaults(func=cmd_reload)
