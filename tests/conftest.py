"""Fixtures every suite may use: the private PostgreSQL cluster of the shared-spool tests."""

from __future__ import annotations

import pytest

from tests.support import require_peer
from tests.support.postgres import PostgresCluster, postgres_bin


@pytest.fixture(scope="session")
def postgres_cluster():
    """One private cluster for the whole run (started on first use); skips without PostgreSQL,
    fails under RELAY_REQUIRE_PEERS=1."""
    bindir = postgres_bin()
    require_peer(bindir is not None, "PostgreSQL (initdb, pg_ctl)")
    cluster = PostgresCluster(bindir)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def postgres_dsn(postgres_cluster) -> str:
    """A fresh, empty database of the private cluster, for this test alone."""
    return postgres_cluster.create_database()
