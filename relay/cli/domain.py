"""`domain check`: a sending domain's DNS records, as SendCloud's domain page checks them."""

from __future__ import annotations

import argparse
import asyncio
import sys

from relay.cli.common import config_path, with_config
from relay.config import (
    load_config,
)


def cmd_domain_check(args: argparse.Namespace) -> int:
    import json

    from relay.config import Resolver
    from relay.ops.domaincheck import Expected, check_domain, make_resolver, table
    from relay.rewrite.dkim import dns_record

    path = config_path(args)
    config = load_config(path) if path else None
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


def register(sub) -> None:
    domain = sub.add_parser("domain", help="sending domain DNS").add_subparsers(dest="domain_command", required=True)
    check = domain.add_parser("check", help="check SPF, DKIM, MX and DMARC as SendCloud's domain page does")
    check.add_argument("domain", help="the sending domain")
    with_config(check)  # optional here: its resolver settings and own DKIM keys, when there is one
    check.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    check.add_argument("--nameserver", help="IP[:PORT] to ask instead of the system resolver")
    check.add_argument("--selector", help="DKIM selector (default: the config's for this domain, else mail)")
    check.add_argument("--spf-include", default="spf.sendcloud.org", help="the SPF include needed (default %(default)s)")
    check.add_argument("--mx", default="mx.sendcloud.org", help="the MX host needed (default %(default)s)")
    check.set_defaults(func=cmd_domain_check)
