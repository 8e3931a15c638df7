"""Bringing a PostgreSQL spool's schema to :data:`~relay.spool.postgres_schema.LATEST`, and checking it.

Each migration runs in one transaction that first takes a transaction-scoped advisory lock,
so nodes migrating at once queue up: the second one finds the version recorded and skips it.
``schema_migrations`` is created under the same lock, so even the first run is safe twice.
"""

from __future__ import annotations

import asyncpg

from relay.config.formats import mask_dsn_passwords, redacted_dsn
from relay.spool.base import SchemaMismatch
from relay.spool.postgres_schema import LATEST, MIGRATIONS

_LOCK = 0x5EDC_10D0  # pg_advisory_xact_lock key: the relay's migrations, whatever the database
_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


async def connect(dsn: str, **options) -> asyncpg.Connection:
    """A connection to the spool database; an error that says which one, with every password masked."""
    try:
        return await asyncpg.connect(dsn, **options)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError, TimeoutError) as error:
        raise OSError(f"cannot connect to the spool database {redacted_dsn(dsn)}: "
                      f"{mask_dsn_passwords(str(error), dsn)}") from None


async def schema_version(conn: asyncpg.Connection) -> int:
    """The highest migration recorded; 0 for an empty database."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return 0
    return await conn.fetchval("SELECT COALESCE(max(version), 0) FROM schema_migrations")


async def migrate(conn: asyncpg.Connection) -> list[tuple[int, str]]:
    """Apply what is missing of MIGRATIONS, in order, one transaction each; what was applied."""
    applied = []
    for version, name, sql in MIGRATIONS:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK)
            await conn.execute(_BOOKKEEPING)
            if await conn.fetchval("SELECT 1 FROM schema_migrations WHERE version = $1", version):
                continue
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
            applied.append((version, name))
    return applied


def mismatch(found: int, needed: int = LATEST) -> str | None:
    """What is wrong with a database at schema ``found`` for a relay that needs ``needed`` (None: nothing)."""
    if found < needed:
        return f"spool database is at schema version {found}, this relay needs {needed}: run sendcloud-relay migrate"
    if found > needed:
        return f"spool database is newer ({found}) than this relay ({needed}): upgrade the relay"
    return None


async def check_schema(conn: asyncpg.Connection) -> None:
    """Raise :class:`SchemaMismatch` unless the database is at exactly this relay's schema."""
    problem = mismatch(await schema_version(conn))
    if problem is not None:
        raise SchemaMismatch(problem)
