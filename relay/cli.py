"""The `sendcloud-relay` command (argparse: the standard library does this job well)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import smtplib
import ssl
import sys
import time
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

from relay import admin
from relay.config import Config, ConfigError, load_config, load_demo_config


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config) if args.config else load_demo_config()


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# -- serve / check-config / hash-password -----------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from relay.server import serve

    _setup_logging(args.verbose)
    config = _config(args)
    if not args.config:
        logging.getLogger("relay").info("no -c given: running the embedded demo config (capture upstream)")
    asyncio.run(serve(config))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _config(args)
    print(f"config {args.config or '<embedded demo>'}: ok\n")
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
    if config.rules:
        print("\nrules (first match wins):")
        for index, rule in enumerate(config.rules):
            conditions = rule.match.model_dump(exclude_none=True) or "always"
            print(f"  {index}: {conditions} -> {rule.channel}")
    upstream = config.upstream
    target = str(upstream.path) if upstream.kind == "capture" else f"{upstream.host}:{upstream.port} tls={upstream.tls}"
    print(f"\nupstream: {upstream.kind} {target}, {upstream.connections_per_account} connection(s) per account")
    print("limits:")
    print(f"  max_message_size {config.server.max_message_size} bytes, max_recipients {config.server.max_recipients}")
    print(f"  retry {', '.join(f'{s:g}s' for s in config.spool.retry)}; max_lifetime {config.spool.max_lifetime:g}s")
    print(f"spool: {config.spool.backend} {config.spool.path}")
    return 0


def cmd_hash_password(args: argparse.Namespace) -> int:
    from relay.auth import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("empty password refused", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


# -- queue --------------------------------------------------------------------------------


def cmd_queue(args: argparse.Namespace) -> int:
    from relay.spool.sqlite import open_store

    config = _config(args)
    store = open_store(config.spool.path)
    try:
        if args.action == "list":
            for line in admin.list_lines(store.list(include_final=args.all)):
                print(line)
            return 0
        if args.action == "flush":
            print(f"{store.retry()} deferred recipient(s) made due now")
            return 0
        if not args.id:
            print(f"queue {args.action} needs a message ID", file=sys.stderr)
            return 2
        if args.action == "show":
            message = store.get(args.id)
            if message is None:
                print(f"{args.id}: no such message", file=sys.stderr)
                return 1
            for line in admin.show_lines(message, config):
                print(line)
            return 0
        if args.action == "retry":
            count = store.retry(args.id)
            print(f"{args.id}: {count} recipient(s) made due now" if count else f"{args.id}: nothing pending")
            return 0 if count else 1
        if args.action == "delete":
            if store.delete(args.id):
                print(f"{args.id}: deleted")
                return 0
            print(f"{args.id}: no such message", file=sys.stderr)
            return 1
    finally:
        store.conn.close()
    return 2


# -- send-test ----------------------------------------------------------------------------


def cmd_send_test(args: argparse.Namespace) -> int:
    """Talk to a running relay like an application would, printing every reply."""
    host, _, port = args.server.rpartition(":")
    password = args.password or os.environ.get("RELAY_PASSWORD")
    if args.password_file:
        password = Path(args.password_file).read_text().rstrip("\r\n")
    if args.user and password is None:
        password = getpass.getpass(f"Password for {args.user}: ")
    context = ssl.create_default_context(cafile=args.ca_file)
    if args.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE

    def show(step: str, reply: tuple[int, bytes]) -> None:
        lines = reply[1].decode(errors="replace").splitlines() or [""]
        print(f"{step:<28} -> {reply[0]} {lines[0]}")
        for line in lines[1:]:
            print(f"{'':<28}    {reply[0]} {line}")

    message = EmailMessage()
    message["From"] = args.sender
    message["To"] = ", ".join(args.to)
    message["Subject"] = args.subject
    message["Date"] = time.strftime("%a, %d %b %Y %H:%M:%S %z")
    message["Message-ID"] = make_msgid(domain=args.sender.rpartition("@")[2] or None)
    message.set_content("This is a test message sent by `sendcloud-relay send-test`.\n")
    smtp_class = smtplib.SMTP_SSL if args.tls == "implicit" else smtplib.SMTP
    kwargs = {"context": context} if args.tls == "implicit" else {}
    try:
        with smtp_class(host or "127.0.0.1", int(port), timeout=args.timeout, **kwargs) as client:
            show("EHLO", client.ehlo())
            if args.tls == "starttls" or (args.tls == "auto" and client.has_extn("starttls")):
                show("STARTTLS", client.starttls(context=context))
                show("EHLO", client.ehlo())
            if args.user:
                try:
                    show(f"AUTH as {args.user}", client.login(args.user, password))
                except smtplib.SMTPAuthenticationError as error:
                    show(f"AUTH as {args.user}", (error.smtp_code, error.smtp_error))
                    return 1
            show(f"MAIL FROM:<{args.sender}>", client.mail(args.sender))
            accepted = 0
            for rcpt in args.to:
                reply = client.rcpt(rcpt)
                show(f"RCPT TO:<{rcpt}>", reply)
                accepted += reply[0] in (250, 251)
            if not accepted:
                client.rset()
                return 1
            reply = client.data(message.as_bytes())
            show("DATA", reply)
            return 0 if reply[0] == 250 else 1
    except (OSError, smtplib.SMTPException) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


# -- parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sendcloud-relay", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("-c", "--config", type=Path, help="config file (default: the embedded demo config)")
        return p

    serve = with_config(sub.add_parser("serve", help="run listeners and delivery"))
    serve.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    serve.set_defaults(func=cmd_serve)

    with_config(sub.add_parser("check-config", help="validate and print the effective routing table")).set_defaults(
        func=cmd_check_config
    )
    sub.add_parser("hash-password", help="read a password on stdin, print its hash").set_defaults(func=cmd_hash_password)

    queue = with_config(sub.add_parser("queue", help="inspect and act on the spool"))
    queue.add_argument("action", choices=["list", "show", "retry", "delete", "flush"])
    queue.add_argument("id", nargs="?")
    queue.add_argument("--all", action="store_true", help="list: include delivered and failed messages")
    queue.set_defaults(func=cmd_queue)

    test = sub.add_parser("send-test", help="send a test message through a running relay")
    test.add_argument("--server", default="127.0.0.1:2525", help="HOST:PORT of the relay")
    test.add_argument("--user", help="AUTH username (omit to rely on a trusted network)")
    test.add_argument("--password", help="AUTH password (prefer --password-file or $RELAY_PASSWORD)")
    test.add_argument("--password-file")
    test.add_argument("--from", dest="sender", default="test@example.com")
    test.add_argument("--to", action="append", default=None, help="recipient (repeatable)")
    test.add_argument("--subject", default="sendcloud-relay test")
    test.add_argument("--tls", choices=["auto", "starttls", "implicit", "none"], default="auto")
    test.add_argument("--ca-file", help="CA to verify the relay's certificate")
    test.add_argument("--insecure", action="store_true", help="do not verify the certificate (self-signed demo)")
    test.add_argument("--timeout", type=float, default=30)
    test.set_defaults(func=cmd_send_test)
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
