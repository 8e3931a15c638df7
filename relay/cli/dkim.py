"""`dkim keygen`: a DKIM private key and the DNS record that publishes it."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

TXT_STRING_MAX = 255  # bytes in one character-string of a TXT record (RFC 1035 3.3.14)


def zone_text(value: str) -> str:
    """A TXT value as zone-file text: quoted strings of at most 255 bytes, which resolvers join
    (RFC 6376 3.6.2.2); one string of a 2048-bit key's 400 bytes is refused by DNS servers."""
    data = value.encode("ascii")
    pieces = [data[start : start + TXT_STRING_MAX] for start in range(0, len(data), TXT_STRING_MAX)] or [b""]
    return " ".join(f'"{piece.decode()}"' for piece in pieces)


def cmd_dkim_keygen(args: argparse.Namespace) -> int:
    from relay.rewrite.dkim import dns_record, generate

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
    print(f"  {args.selector}._domainkey.{args.domain}. IN TXT {zone_text(record)}\n")
    print("and add to the config:")
    print(f"  dkim:\n    {args.domain}: {{selector: {args.selector}, key_file: {path.resolve()}}}")
    return 0


def register(sub) -> None:
    dkim = sub.add_parser("dkim", help="DKIM keys").add_subparsers(dest="dkim_command", required=True)
    keygen = dkim.add_parser("keygen", help="write a private key and print its DNS TXT record")
    keygen.add_argument("domain", help="the signing domain (the From address's domain)")
    keygen.add_argument("--selector", required=True, help="the DNS label the key is published under")
    keygen.add_argument("--algorithm", choices=["rsa", "ed25519"], default="rsa",
                        help="rsa (default: every verifier knows it) or ed25519")
    keygen.add_argument("--bits", type=int, default=2048, help="RSA key size")
    keygen.add_argument("--out", default=".", help="folder for DOMAIN.SELECTOR.key")
    keygen.set_defaults(func=cmd_dkim_keygen)
