"""The `sendcloud-relay` command (argparse: the standard library does this job well)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import smtplib
import ssl
import sys
import time
import urllib.error
import urllib.request
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

from relay import admin, logs
from relay.allocator import return_large_blocks_to_the_os
from relay.config import (
    Config,
    ConfigError,
    acceptor_count,
    load_admin_settings,
    load_config,
    load_demo_config,
    split_host_port,
)
from relay.metrics_directory import shared_metrics


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config) if args.config else load_demo_config()


# -- serve / reload / check-config / hash-password --------------------------------------------


def run_event_loop(main, choice: str = "auto"):
    """Run ``main`` on ``server.event_loop``: uvloop (``auto`` when installed) or asyncio's loop.

    Every relay process (the server and its acceptors) starts here, so the allocator setting
    for large messages is made here too, before any message is read.
    """
    return_large_blocks_to_the_os()
    if choice == "asyncio":
        return asyncio.run(main)
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit("server.event_loop: uvloop is not installed (pip install uvloop)") from None
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def cmd_serve(args: argparse.Namespace) -> int:
    config = _config(args)
    logs.configure(config.logging, logs.secrets_of(config), args.verbose)
    if not args.config:
        logging.getLogger("relay").info("no -c given: running the embedded demo config (capture upstream)")
    with shared_metrics(several_processes=acceptor_count(config) > 1):
        from relay.server import serve  # imports relay.metrics: only now

        run_event_loop(serve(config, args.config, args.verbose), config.server.event_loop)
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the running relay, through its admin endpoint, to re-read its config; print the outcome.

    The admin endpoint rather than a pid file and a signal: the relay answers whether the new
    config was taken, and why not, and it works the same in a container. Only the file's
    ``admin`` section is read here; the relay validates the rest. (SIGHUP does the same
    reload, for `systemctl reload` and `docker kill -s HUP`, but its outcome is only logged.)
    """
    settings = load_admin_settings(args.config) if args.config else load_demo_config().admin
    if not settings.listen:
        print("admin.listen is off in this config: send SIGHUP to the relay's process instead", file=sys.stderr)
        return 1
    host, port = split_host_port(settings.listen)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/api/reload"
    request = urllib.request.Request(url, method="POST", data=b"")
    if settings.token is not None:
        request.add_header("Authorization", f"Bearer {settings.token.get_secret_value()}")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as error:
        try:
            answer = json.load(error)
        except ValueError:
            answer = {"error": f"HTTP {error.code}"}
    except OSError as error:
        print(f"cannot reach the relay's admin endpoint at {url}: {error}", file=sys.stderr)
        return 1
    if not answer.get("reloaded"):
        print(f"reload refused, the relay keeps its running config:\n{answer.get('error')}", file=sys.stderr)
        return 1
    print("reloaded")
    for setting in answer.get("restart_needed", []):
        print(f"  {setting} changed: takes effect at the next restart")
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
    print(f"\nsender mode: {config.sender.mode} (rewrite uses {config.sender.from_local}@<account domain>)")
    for name, user in config.users.items():
        if _options_text(user):
            print(f"  user {name}: {_options_text(user)}")
    if config.rules:
        print("\nrules (first match wins):")
        for index, rule in enumerate(config.rules):
            conditions = rule.match.model_dump(exclude_none=True) or "always"
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
    return 0


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

    config = _config(args)
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


def cmd_dkim_keygen(args: argparse.Namespace) -> int:
    from relay.signing import dns_record, generate

    path = Path(args.out) / f"{args.domain}.{args.selector}.key"
    if path.exists():
        print(f"{path} exists; not overwriting a key that may be published", file=sys.stderr)
        return 1
    key = generate(args.algorithm, args.bits)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key)
    record = dns_record(key)
    print(f"wrote {path} ({args.algorithm})\n")
    print("publish this DNS TXT record:")
    print(f'  {args.selector}._domainkey.{args.domain}. IN TXT "{record}"\n')
    print("and add to the config:")
    print(f"  dkim:\n    {args.domain}: {{selector: {args.selector}, key_file: {path.resolve()}}}")
    return 0


def cmd_domain_check(args: argparse.Namespace) -> int:
    import json

    from relay.config import Resolver
    from relay.domaincheck import Expected, check_domain, make_resolver, table
    from relay.signing import dns_record

    config = load_config(args.config) if args.config else None
    settings = config.resolver if config else Resolver()
    if args.nameserver:
        host, _, port = args.nameserver.rpartition(":") if args.nameserver.count(":") == 1 else (args.nameserver, "", "")
        settings = Resolver(nameservers=[host], port=int(port) if port else 53, timeout=settings.timeout)
    own = config.dkim.get(args.domain) if config else None
    selector = args.selector or (own.selector if own else "mail")
    expected = Expected(
        spf_include=args.spf_include,
        mx=args.mx,
        dkim_selector=selector,
        dkim_value=dns_record(own.key.get_secret_value().encode()) if own and own.selector == selector else None,
    )
    records = asyncio.run(check_domain(args.domain, make_resolver(settings), expected))
    if args.json:
        print(json.dumps({"domain": args.domain, "records": [record.as_dict() for record in records]}, indent=2))
    else:
        for line in table(records):
            print(line)
    failed = [record.name for record in records if record.required and record.status != "ok"]
    if failed and not args.json:
        print(f"\nrequired record(s) not in place: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


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

    reload = with_config(sub.add_parser("reload", help="make the running relay re-read its config (via admin.listen)"))
    reload.add_argument("--timeout", type=float, default=30)
    reload.set_defaults(func=cmd_reload)

    with_config(sub.add_parser("check-config", help="validate and print the effective routing table")).set_defaults(
        func=cmd_check_config
    )
    sub.add_parser("hash-password", help="read a password on stdin, print its hash").set_defaults(func=cmd_hash_password)

    route = with_config(sub.add_parser("route", help="show which rule a sample message hits, and its options"))
    route.add_argument("--user", required=True)
    route.add_argument("--listener", help="listener name (default: the first)")
    route.add_argument("--from", dest="sender", default="", help="envelope sender")
    route.add_argument("--to", action="append", required=True, help="recipient (repeatable)")
    route.add_argument("--header", action="append", default=[], help="'Name: value' (repeatable)")
    route.add_argument("--message", type=Path, help="a message file whose headers are used")
    route.set_defaults(func=cmd_route)

    dkim = sub.add_parser("dkim", help="DKIM keys").add_subparsers(dest="dkim_command", required=True)
    keygen = dkim.add_parser("keygen", help="write a private key and print its DNS TXT record")
    keygen.add_argument("domain")
    keygen.add_argument("--selector", required=True)
    keygen.add_argument("--algorithm", choices=["rsa", "ed25519"], default="rsa")
    keygen.add_argument("--bits", type=int, default=2048, help="RSA key size")
    keygen.add_argument("--out", default=".", help="folder for DOMAIN.SELECTOR.key")
    keygen.set_defaults(func=cmd_dkim_keygen)

    domain = sub.add_parser("domain", help="sending domain DNS").add_subparsers(dest="domain_command", required=True)
    check = domain.add_parser("check", help="check SPF, DKIM, MX and DMARC as SendCloud's domain page does")
    check.add_argument("domain")
    check.add_argument("-c", "--config", type=Path, help="config: resolver settings and own DKIM keys")
    check.add_argument("--json", action="store_true")
    check.add_argument("--nameserver", help="IP[:PORT] to ask instead of the system resolver")
    check.add_argument("--selector", help="DKIM selector (default: the config's for this domain, else mail)")
    check.add_argument("--spf-include", default="spf.sendcloud.org")
    check.add_argument("--mx", default="mx.sendcloud.org")
    check.set_defaults(func=cmd_domain_check)

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
