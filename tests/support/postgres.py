"""A private PostgreSQL cluster for the tests of the shared spool.

The tests never touch a system PostgreSQL: they ``initdb`` a cluster in a temporary directory
and start it on a port of their own, on loopback only, with the durability settings a
production spool would have (fsync on). PostgreSQL refuses to run as root, so as root the
cluster belongs to Debian's ``postgres`` user. Each test gets a database of its own, made from
the cluster's ``template0`` in a few milliseconds.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from tests.support import free_port


def postgres_bin() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl``: on PATH, else Debian's versioned directory."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


class PostgresCluster:
    """One ``postgres`` server: started by :meth:`start`, stopped (and deleted) by :meth:`stop`."""

    def __init__(self, bindir: Path, settings: dict[str, str] | None = None):
        """``settings``: more ``postgres -c NAME=VALUE`` (the benchmark's autovacuum soak)."""
        self.bindir = bindir
        self.settings = dict(settings or {})
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="relay-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._user = "postgres" if os.geteuid() == 0 else None  # initdb refuses root

    @property
    def dsn(self) -> str:
        """The maintenance database, as the superuser ``relay``."""
        return f"postgresql://relay@127.0.0.1:{self.port}/postgres"

    def dsn_for(self, database: str) -> str:
        return f"postgresql://relay@127.0.0.1:{self.port}/{database}"

    def _run(self, *argv: str) -> None:
        command = [str(self.bindir / argv[0]), *argv[1:]]
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "relay", "--auth=trust", "-E", "UTF8", "--no-instructions")
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200 "
            "-c fsync=on -c synchronous_commit=on -c shared_buffers=64MB"
        ) + "".join(f" -c {name}={value}" for name, value in self.settings.items())
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")

    def create_database(self) -> str:
        """A new empty database; its DSN."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", self.dsn, "-c", f'CREATE DATABASE "{name}" TEMPLATE template0'],
            check=True, capture_output=True, timeout=60,
        )
        return self.dsn_for(name)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


async def migrate_database(dsn: str) -> None:
    """Bring a test database to the relay's schema, as `sendcloud-relay migrate` does."""
    import asyncpg

    from relay.spool.postgres_migrate import migrate

    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()


async def migrated_postgres_spool(dsn: str, spill: Path, node: str = "node-a", **settings):
    """A PostgresSpool (not opened yet) on a migrated database."""
    from relay.spool.postgres import PostgresSpool

    await migrate_database(dsn)
    return PostgresSpool(dsn, node=node, spill_directory=spill, **settings)
