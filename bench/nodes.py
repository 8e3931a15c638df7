"""The ``nodes`` scenario: one relay node against two on one PostgreSQL spool (issue 14).

    .venv/bin/python bench/run.py --only nodes [--reps 3] [--messages 5000]

A private PostgreSQL cluster (``tests.support.postgres.PostgresCluster``, as the tests start
it: fsync on, its own port) holds the spool; each run gets a fresh database, migrated by
``sendcloud-relay migrate``. The same load (``smtp-source``, 5 KB, 20 sessions in all) goes
into one node on the default SQLite spool (the yardstick), one node, or split evenly over two nodes (each its own process tree, ports and
``spool.node``), which deliver to the shared ``smtp-sink``. Figures per run: accepted and
end-to-end msgs/s; per message, the database's committed transactions (``xact_commit``,
reads included), its WAL flushes (``pg_stat_wal.wal_sync``: the fsyncs a commit waits for)
and the nodes' own group commits (their shutdown line); the longest transaction seen open;
the statements run most often (``pg_stat_statements``), per message; CPU milliseconds per
message of the relays (by role, summed over the nodes) and of the PostgreSQL server (postmaster
and backends: what each round trip costs on the same two cores).

After the last two-node run, the soak: table and index sizes and dead rows of the hot tables
(messages, recipients, bodies) from ``pg_stat_user_tables``, right after the load and again
once autovacuum has been through each of them (docs/scale-out.md, "Autovacuum").
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from peers import SMTP_SOURCE, OurRelay, cpu_by_role, cpu_ms_per_message, free_port, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ is not installed, only relay/
from relay.spool.postgres_schema import HOT_TABLES_AUTOVACUUM
from tests.support.postgres import PostgresCluster, postgres_bin

HOT_TABLES = ("messages", "recipients", "bodies")

VACUUM_THRESHOLD = 1000  # autovacuum_vacuum_threshold of the hot tables (migration 4, relay/spool/postgres_schema.py)

CLUSTER_SETTINGS = {
    "shared_preload_libraries": "pg_stat_statements",  # which statements the commits and WAL come from
    "autovacuum_naptime": "5s",  # production keeps 1min; the soak should not wait for it
    "log_autovacuum_min_duration": "0",
    "track_wal_io_timing": "on",
}


def sql(dsn: str, query: str) -> list[list[str]]:
    """Rows of ``query`` (psql, tab-separated): the benchmark needs no driver of its own."""
    out = subprocess.run(["psql", "-X", "-q", "-At", "-F", "\t", "-v", "ON_ERROR_STOP=1", dsn, "-c", query],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    return [line.split("\t") for line in out.splitlines() if line]


class SharedSpool:
    """The private cluster, and a fresh migrated database per run."""

    def __init__(self):
        bindir = postgres_bin()
        if bindir is None:
            raise SystemExit("the nodes scenario needs PostgreSQL (apt-get install postgresql; see scripts/test)")
        self.cluster = PostgresCluster(bindir, CLUSTER_SETTINGS)

    def __enter__(self) -> SharedSpool:
        self.cluster.start()
        return self

    def __exit__(self, *exc) -> None:
        self.cluster.stop()

    def cpu(self) -> dict[str, float]:
        """CPU seconds of the server so far: postmaster, backends (``postgres``) and the exited ones."""
        postmaster = int((self.cluster.data / "postmaster.pid").read_text().split()[0])
        return cpu_by_role(postmaster, lambda pid, comm: "postgres")

    def migrate(self, dsn: str, config_path: Path) -> None:
        """``sendcloud-relay migrate`` as an operator runs it (the hot tables' autovacuum settings included)."""
        subprocess.run([sys.executable, "-m", "relay", "migrate", "-c", str(config_path)], check=True,
                       capture_output=True, timeout=120)
        sql(dsn, "CREATE EXTENSION pg_stat_statements")


class LongestTransaction:
    """Samples ``pg_stat_activity`` while the load runs: the oldest open transaction's age.
    A queue table bloats under long transactions (vacuum cannot remove what they might see)."""

    def __init__(self, dsn: str, interval: float = 0.25):
        self.dsn, self.interval = dsn, interval
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        database = self.dsn.rsplit("/", 1)[1]
        query = ("SELECT COALESCE(EXTRACT(EPOCH FROM max(now() - xact_start)), 0) FROM pg_stat_activity "
                 f"WHERE datname = '{database}' AND pid <> pg_backend_pid()")
        while not self._stop.wait(self.interval):
            self.longest = max(self.longest, float(sql(self.dsn, query)[0][0]))

    def __enter__(self) -> LongestTransaction:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def counters(dsn: str) -> tuple[int, int]:
    """(transactions committed in this database, WAL flushes in the cluster) so far."""
    database = dsn.rsplit("/", 1)[1]
    [[commits]] = sql(dsn, f"SELECT xact_commit FROM pg_stat_database WHERE datname = '{database}'")
    [[syncs]] = sql(dsn, "SELECT wal_sync FROM pg_stat_wal")
    return int(commits), int(syncs)


def busiest_statements(dsn: str, messages: int, top: int = 12) -> list[dict]:
    """The statements run most often in this database, per message, with the WAL they wrote."""
    database = dsn.rsplit("/", 1)[1]
    rows = sql(dsn, "SELECT calls, wal_records, left(regexp_replace(query, '\\s+', ' ', 'g'), 100) FROM pg_stat_statements "
                    f"WHERE dbid = (SELECT oid FROM pg_database WHERE datname = '{database}') ORDER BY calls DESC LIMIT {top}")
    return [{"calls_per_message": int(calls) / messages, "wal_records_per_message": int(wal) / messages, "query": query}
            for calls, wal, query in rows]


def table_stats(dsn: str) -> dict[str, dict]:
    """Per hot table: live and dead rows, heap and index bytes, how often autovacuum ran."""
    names = ", ".join(f"'{table}'" for table in HOT_TABLES)
    rows = sql(dsn, "SELECT relname, n_live_tup, n_dead_tup, pg_table_size(relid), pg_indexes_size(relid), "
                    f"autovacuum_count FROM pg_stat_user_tables WHERE relname IN ({names}) ORDER BY relname")
    return {name: {"live": int(live), "dead": int(dead), "table_kb": int(heap) // 1024, "indexes_kb": int(index) // 1024,
                   "autovacuums": int(count)} for name, live, dead, heap, index, count in rows}


def node_config(bench, name: str, dsn: str, sink_port: int) -> tuple[dict, int]:
    port = free_port()
    config = bench.relay_config(port, sink_port)
    config["spool"] = {"backend": "postgres", "dsn": dsn, "node": name}
    return config, port


def run(bench, spool: SharedSpool, sink, count: int, messages: int, sessions: int = 20) -> dict:
    """``messages`` over ``sessions`` split evenly over ``count`` nodes on a fresh database."""
    dsn = spool.cluster.create_database()
    nodes = [OurRelay(bench.workdir, *node_config(bench, f"node{number + 1}", dsn, sink.port)) for number in range(count)]
    spool.migrate(dsn, nodes[0].config_path)
    with ExitStack() as stack:
        for node in nodes:
            stack.enter_context(node)
        counted = sink.count()
        sql(dsn, "SELECT pg_stat_statements_reset()")
        commits, syncs = counters(dsn)
        relay_cpu = [cpu_by_role(node.pid(), node.role) for node in nodes]
        database_cpu = spool.cpu()
        with LongestTransaction(dsn) as longest:
            started = time.monotonic()
            loads = [subprocess.Popen([SMTP_SOURCE, "-s", str(sessions // count), "-m", str(messages // count), "-l", "5120",
                                       "-f", "bench@bench.test", "-t", "sink@example.net", f"127.0.0.1:{node.port}"],
                                      stdout=subprocess.DEVNULL) for node in nodes]
            if any(load.wait() != 0 for load in loads):
                raise RuntimeError("smtp-source stopped at a refusal")
            accepted = time.monotonic() - started
            total = messages // count * count
            wait_until(lambda: sink.count() >= counted + total, 600, f"{total} messages at the sink")
            end_to_end = time.monotonic() - started
            relay_cpu = [cpu_ms_per_message(before, cpu_by_role(node.pid(), node.role), total)
                         for node, before in zip(nodes, relay_cpu, strict=True)]
            database_cpu = cpu_ms_per_message(database_cpu, spool.cpu(), total)["total"]
    time.sleep(1)  # the backends' statistics reach pg_stat_* within a second of their exit
    commits, syncs = (after - before for after, before in zip(counters(dsn), (commits, syncs), strict=True))
    group_commits = [node.spool_stats[1] for node in nodes if node.spool_stats]
    result = {
        "relay": f"{count} node" + "s" * (count > 1), "nodes": count, "messages": total, "sessions": sessions,
        "accepted_per_s": total / accepted, "end_to_end_per_s": total / end_to_end,
        "db_commits_per_message": commits / total, "wal_syncs_per_message": syncs / total,
        "longest_transaction_s": longest.longest,
        "database_cpu_ms_per_message": database_cpu,
        **{f"cpu_ms_per_message_{role}": sum(node.get(role, 0.0) for node in relay_cpu)
           for role in sorted({role for node in relay_cpu for role in node})},
    }
    if len(group_commits) == count:
        result["spool_commits_per_message"] = sum(group_commits) / total
    bench.say(result)
    result["statements"] = busiest_statements(dsn, total)
    result["dsn"] = dsn
    return result


def vacuumed(before: dict, now: dict) -> bool:
    """Autovacuum has been through every hot table that had enough dead rows to call it."""
    return all(row["autovacuums"] > before[name]["autovacuums"] or before[name]["dead"] <= VACUUM_THRESHOLD
               for name, row in now.items())


def soak(dsn: str, timeout: float = 180.0) -> dict:
    """The hot tables right after the load, and once autovacuum has been through each of them."""
    before = table_stats(dsn)
    wait_until(lambda: vacuumed(before, table_stats(dsn)), timeout, "autovacuum on messages, recipients and bodies")
    return {"after_load": before, "after_autovacuum": table_stats(dsn), "settings": HOT_TABLES_AUTOVACUUM,
            "naptime": CLUSTER_SETTINGS["autovacuum_naptime"]}


def scenario(bench, sink) -> dict:
    """Both layouts ``--reps`` times, alternating which goes first; then the soak."""
    runs = []
    with SharedSpool() as spool:
        for rep in range(bench.args.reps):
            sqlite = bench.smtp_source(bench.relay(sink.port), sink, bench.args.messages, 20, 5120)
            runs.append({**sqlite, "relay": "1 node, sqlite"})  # the yardstick: the same load on the default spool
            for count in ((1, 2) if rep % 2 == 0 else (2, 1)):
                runs.append(run(bench, spool, sink, count, bench.args.messages))
        last_two = next(run for run in reversed(runs) if run.get("nodes") == 2)
        soaked = soak(last_two["dsn"])
    for each in runs:
        each.pop("dsn", None)
    return {"soak": soaked, "runs": runs}
