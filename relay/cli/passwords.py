"""`hash-password`: a hash for ``users.*.password_hash``."""

from __future__ import annotations

import argparse
import getpass
import sys


def cmd_hash_password(args: argparse.Namespace) -> int:
    from relay.policy.auth import hash_password

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


def register(sub) -> None:
    sub.add_parser("hash-password", help="read a password on stdin, print its hash").set_defaults(func=cmd_hash_password)
