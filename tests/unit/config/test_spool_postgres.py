"""spool.backend postgres: what it needs, its defaults, and its DSN's password kept out of every output."""

from __future__ import annotations

import socket

import pytest

from relay.config import ConfigError
from relay.config.diff import restart_needed
from relay.config.formats import dsn_passwords, mask_dsn_passwords, redacted_dsn
from relay.observe.logs import secrets_of
from tests.unit.helpers import BASE, config_from

DSN = "postgresql://relay:s3cr3t-pw@db.internal:5432/relay"


def with_spool(spool: str):
    return config_from(BASE + f"spool: {spool}\n")


def test_postgres_needs_a_dsn_and_sqlite_ignores_one():
    with pytest.raises(ConfigError, match="backend: postgres needs dsn"):
        with_spool("{backend: postgres}")
    assert with_spool(f"{{backend: sqlite, dsn: '{DSN}'}}").spool.backend == "sqlite"


def test_the_node_is_the_hostname_unless_named_and_the_lease_a_minute():
    spool = with_spool(f"{{backend: postgres, dsn: '{DSN}'}}").spool
    assert (spool.node, spool.lease) == (socket.gethostname(), 60.0)
    assert with_spool(f"{{backend: postgres, dsn: '{DSN}', node: relay-2, lease: 30s}}").spool.node == "relay-2"


def test_the_dsn_is_a_secret_the_logs_mask_and_a_change_needs_a_restart():
    config = with_spool(f"{{backend: postgres, dsn: '{DSN}'}}")
    assert "s3cr3t-pw" not in repr(config) and "s3cr3t-pw" not in str(config.spool)
    assert "s3cr3t-pw" in secrets_of(config)
    moved = with_spool(f"{{backend: postgres, dsn: '{DSN.replace('db.internal', 'db2')}', node: other}}")
    assert restart_needed(config, moved) == ["spool.dsn", "spool.node"]


@pytest.mark.parametrize("dsn, passwords, redacted", [
    (DSN, ["s3cr3t-pw"], "postgresql://relay:***@db.internal:5432/relay"),
    ("postgresql://relay:p@ss@db/relay", ["p@ss"], "postgresql://relay:***@db/relay"),
    ("postgres://u@h/d?password=xyz&sslmode=require", ["xyz"], "postgres://u@h/d?password=***&sslmode=require"),
    ("host=db user=relay password='a b' dbname=x", ["a b"], "host=db user=relay password=*** dbname=x"),
    ("host=db password=plain", ["plain"], "host=db password=***"),
    ("postgresql://relay@db/relay", [], "postgresql://relay@db/relay"),
])
def test_passwords_are_found_in_every_dsn_form(dsn, passwords, redacted):
    assert dsn_passwords(dsn) == passwords
    assert redacted_dsn(dsn) == redacted
    assert mask_dsn_passwords(f"could not connect with {dsn}", dsn).count("***") == len(passwords)
