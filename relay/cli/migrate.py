"""`migrate`: bring a PostgreSQL spool's schema to this relay's version (SQLite needs none).

Safe to run from every node at once (each migration takes an advisory lock) and again and
again (what is recorded is skipped); `serve` refuses a database that is not exactly current.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from relay.cli.common import load, with_config
from relay.config import Spool


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = load(args, secrets=False).spool
    if settings.backend != "postgres":
        print(f"spool.backend is {settings.backend}: nothing to migrate (its schema is kept up to date on open)")
        return 0
    try:
        applied, version = asyncio.run(_migrate(settings))
    except OSError as error:
        print(f"migrate: {error}", file=sys.stderr)
        return 1
    for number, name in applied:
        print(f"applied migration {number} ({name})")
    if not applied:
        print(f"schema is current (version {version})")
    return 0


async def _migrate(settings: Spool) -> tuple[list[tuple[int, str]], int]:
    from relay.spool.postgres_migrate import connect, migrate, schema_version  # asyncpg only for postgres

    assert settings.dsn is not None  # the config requires it
    conn = await connect(settings.dsn.get_secret_value())
    try:
        applied = await migrate(conn)
        return applied, await schema_version(conn)
    finally:
        await conn.close()


def register(sub) -> None:
    migrate = with_config(sub.add_parser("migrate", help="bring the PostgreSQL spool's schema up to date"))
    migrate.set_defaults(func=cmd_migrate)
