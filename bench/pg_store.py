"""Stores per second into the PostgreSQL spool: N concurrent `store` calls of 5 KB on one node.

Starts a private cluster as the tests do (tests/support/postgres.py: fsync and synchronous_commit
on), migrates a fresh database and keeps ``--concurrency`` stores in flight until ``--messages``
are committed; prints the rate and the commits per message from the spool's own counters, and
the CPU milliseconds per store of this process (the relay's side) and of the PostgreSQL server.

    PYTHONPATH=$PWD .venv/bin/python bench/pg_store.py --messages 5000 --concurrency 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from peers import cpu_by_role

from relay.spool import NewMessage, new_queue_id
from tests.support.postgres import PostgresCluster, migrated_postgres_spool, postgres_bin

BODY = b"From: bench@acme.com\r\nSubject: bench\r\n\r\n" + b"x" * 74 + b"\r\n"


def server_cpu(cluster: PostgresCluster) -> float:
    """CPU seconds of the server so far: postmaster, backends, and those that exited."""
    postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
    return sum(cpu_by_role(postmaster, lambda pid, comm: "postgres").values())


async def measure(cluster: PostgresCluster, dsn: str, messages: int, concurrency: int, size: int) -> None:
    body = (BODY * (size // len(BODY) + 1))[:size]
    spool = await migrated_postgres_spool(dsn, Path(tempfile.gettempdir()), node="bench")
    await spool.open()
    left = messages

    async def sender() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await spool.store(NewMessage(new_queue_id(), time.time(), "bench", "smtp", "127.0.0.1", "acme_trigger",
                                         "trigger", "bench@acme.com", ["to@example.org"], body))

    started, cpu, database = time.perf_counter(), time.process_time(), server_cpu(cluster)
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    cpu, database = time.process_time() - cpu, server_cpu(cluster) - database
    print(f"{messages} stores of {size} B, {concurrency} concurrent: {elapsed:.2f} s, "
          f"{messages / elapsed:.0f} stores/s, {spool.commits} commits, "
          f"{spool.commits / messages:.3f} commits/message, CPU ms/store: relay {1000 * cpu / messages:.3f}, "
          f"database {1000 * database / messages:.3f}; load average {os.getloadavg()[0]:.2f}")
    await spool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--size", type=int, default=5000)
    args = parser.parse_args()
    bindir = postgres_bin()
    if bindir is None:
        raise SystemExit("PostgreSQL (initdb, pg_ctl) is not installed")
    cluster = PostgresCluster(bindir)
    cluster.start()
    try:
        asyncio.run(measure(cluster, cluster.create_database(), args.messages, args.concurrency, args.size))
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
