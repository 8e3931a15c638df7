"""`check-config` and `route`: what a config does, before it runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from relay.cli.common import config_path, load, with_config


def cmd_check_config(args: argparse.Namespace) -> int:
    from relay.ops import events_view
    from relay.process.startup import tls_problem

    config = load(args)
    problem = tls_problem(config)
    if problem is not None:
        print(f"config {config_path(args)}: {problem}", file=sys.stderr)
        return 1
    print(f"config {config_path(args)}: ok\n")
    print("listeners:")
    for listener in config.server.listeners:
        print(f"  {listener.name:<12} {listener.bind}:{listener.port:<5} tls={listener.tls:<8} auth={listener.auth}"
              + ("  (plaintext AUTH allowed)" if listener.allow_plaintext_auth else ""))
    print("\nusers -> channels -> SendCloud accounts:")
    for name, user in config.users.items():
        login = "password" if user.password_hash else "no password (trusted networks only)"
        networks = [str(n.cidr) for n in config.server.trusted_networks if n.user == name]
        print(f"  {name}: {login}" + (f"; trusted networks {', '.join(networks)}" if networks else ""))
        if user.allowed_senders:
            print(f"    allowed senders: {', '.join(user.allowed_senders)}")
        for channel, account_name in user.channels.items():
            account = config.accounts[account_name]
            print(f"    {channel:<8} -> {account_name} (api_user {account.api_user}, type {account.type}, domain {account.domain})")
    print(f"\nsender mode: {config.sender.mode} (rewrite uses {config.sender.from_local}@<account domain>)")
    for name, user in config.users.items():
        if _options_text(user):
            print(f"  user {name}: {_options_text(user)}")
    if config.rules:
        print("\nrules (first match wins):")
        for index, rule in enumerate(config.rules):
            conditions = _yaml(rule.match.model_dump(mode="json", exclude_none=True))
            print(f"  {index}: {conditions} -> {rule.channel}" + (f"; {_options_text(rule)}" if _options_text(rule) else ""))
    if config.tls_rules:
        print("\nupstream TLS rules (first match wins; default verify):")
        for index, tls_rule in enumerate(config.tls_rules):
            domains = ", ".join(tls_rule.domains) if tls_rule.domains else "any domain"
            print(f"  {index}: account {tls_rule.account or 'any'}, {domains} -> {tls_rule.rule}")
    if config.dkim:
        print("\nDKIM signing: " + ", ".join(f"{domain} (selector {key.selector})" for domain, key in config.dkim.items()))
    upstream = config.upstream
    target = str(upstream.path) if upstream.kind == "capture" else f"{upstream.host}:{upstream.port} tls={upstream.tls}"
    print(f"\nupstream: {upstream.kind} {target}, {upstream.connections_per_account} connection(s) per account")
    print("limits:")
    print(f"  max_message_size {config.server.max_message_size} bytes, max_recipients {config.server.max_recipients}")
    print(f"  retry {', '.join(f'{s:g}s' for s in config.spool.retry)}; max_lifetime {config.spool.max_lifetime:g}s")
    print(f"spool: {config.spool.backend} {config.spool.path}")
    for line in events_view.config_lines(config):
        print(line)
    return 0


def _yaml(value: object) -> str:
    """A rule's conditions as they are written in the config (YAML flow style), on one line."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip() if value else "always"


def _options_text(options) -> str:
    """A rule's or user's own options in one line (unset ones are inherited, so not shown)."""
    parts = []
    if options.sender and options.sender.mode:
        parts.append(f"sender {options.sender.mode}")
    if options.sender and options.sender.from_local:
        parts.append(f"from_local {options.sender.from_local}")
    if options.ad_marker:
        parts.append(f"ad_marker {options.ad_marker}")
    if options.label is not None:
        parts.append(f"label {options.label}")
    if options.tracking:
        parts.append("tracking " + ", ".join(f"{k}={'on' if v else 'off'}" for k, v in options.tracking.model_dump(exclude_none=True).items()))
    return "; ".join(parts)


def cmd_route(args: argparse.Namespace) -> int:
    """Which rule a sample message hits, and everything that follows from it."""
    from email.parser import BytesHeaderParser
    from email.policy import default

    from relay.routing import Envelope, tls_policy, trace_route

    config = load(args)
    if args.user not in config.users:
        print(f"no user {args.user!r} (users: {', '.join(config.users)})", file=sys.stderr)
        return 2
    headers = args.message.read_bytes() if args.message else b""
    headers = b"".join(line.encode() + b"\r\n" for line in args.header) + headers
    parsed = BytesHeaderParser(policy=default).parsebytes(headers)
    listener = args.listener or config.server.listeners[0].name
    envelope = Envelope(args.user, listener, args.sender, args.to)
    route, trace = trace_route(config, envelope, lambda name: None if parsed.get(name) is None else str(parsed.get(name)))
    for line in trace:
        print(line)
    account = config.accounts[route.account]
    options = route.options
    login = account.api_user + (f"#{options.label}" if options.label is not None else "")
    print(f"\nroute:     channel {route.channel} -> account {route.account} (AUTH LOGIN as {login}, domain {account.domain})")
    from_local = f" (from_local {options.from_local})" if options.sender_mode != "keep" else ""
    print(f"sender:    {options.sender_mode}{from_local}")
    marker = f"{options.ad_marker} {config.ad_marker_text!r}" if options.ad_marker else "none"
    print(f"ad_marker: {marker}")
    tracking = options.tracking.model_dump()
    print("tracking:  " + ", ".join(f"{k}={'client' if v is None else 'on' if v else 'off'}" for k, v in tracking.items()))
    print("upstream TLS:")
    for recipient in args.to:
        print(f"  <{recipient}> {tls_policy(config, route.account, recipient)}")
    return 0


def register(sub) -> None:
    with_config(sub.add_parser("check-config", help="validate and print the effective routing table")).set_defaults(
        func=cmd_check_config
    )
    route = with_config(sub.add_parser("route", help="show which rule a sample message hits, and its options"))
    route.add_argument("--user", required=True, help="the local user sending (AUTH user or trusted network's)")
    route.add_argument("--listener", help="listener name (default: the first)")
    route.add_argument("--from", dest="sender", default="", help="envelope sender")
    route.add_argument("--to", action="append", required=True, help="recipient (repeatable)")
    route.add_argument("--header", action="append", default=[], help="'Name: value' (repeatable)")
    route.add_argument("--message", type=Path, help="a message file whose headers are used")
    route.set_defaults(func=cmd_route)
