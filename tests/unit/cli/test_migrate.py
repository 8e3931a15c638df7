"""`migrate`, then `queue list`, on a config whose spool is PostgreSQL (the private cluster), in-process."""

from __future__ import annotations

import asyncio

import pytest

from relay.cli import main
from relay.spool.postgres import PostgresSpool
from relay.spool.postgres_schema import LATEST, MIGRATIONS
from tests.unit.helpers import BASE
from tests.unit.spool.test_postgres import message

PASSWORD = "pw-never-shown"  # the test cluster trusts loopback, so any password connects


@pytest.fixture
def config_file(tmp_path, monkeypatch, postgres_dsn):
    monkeypatch.chdir(tmp_path)
    dsn = postgres_dsn.replace("postgresql://relay@", f"postgresql://relay:{PASSWORD}@")
    (tmp_path / "dsn").write_text(dsn + "\n")
    path = tmp_path / "relay.yaml"
    path.write_text(BASE + "spool: {backend: postgres, dsn_file: dsn, node: cli-test}\n")
    return str(path), dsn


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_migrate_then_queue_list_on_postgres(config_file, capsys, tmp_path):
    path, dsn = config_file
    code, _, err = run(capsys, "queue", "list", "-c", path)
    assert code == 1 and "run sendcloud-relay migrate" in err
    applied = "".join(f"applied migration {version} ({name})\n" for version, name, _ in MIGRATIONS)
    assert run(capsys, "migrate", "-c", path) == (0, applied, "")
    assert run(capsys, "migrate", "-c", path) == (0, f"schema is current (version {LATEST})\n", "")

    async def store() -> None:
        spool = PostgresSpool(dsn, node="a", spill_directory=tmp_path)
        await spool.open()
        await spool.store(message("3ZK7Q9M2XD4HWT", recipients=("someone@example.org",)))
        await spool.close()

    asyncio.run(store())
    code, out, err = run(capsys, "queue", "list", "-c", path)
    assert code == 0 and "3ZK7Q9M2XD4HWT" in out and "1/1  queued" in out, (out, err)
    code, retried, err = run(capsys, "queue", "retry", "3ZK7Q9M2XD4HWT", "-c", path)  # `show` waits for the events store
    assert code == 0 and "1" in retried, err
    for output in (out, retried, err, *run(capsys, "check-config", "-c", path)[1:]):
        assert PASSWORD not in output


def test_migrate_on_sqlite_has_nothing_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "relay.yaml").write_text(BASE)
    code, out, _ = run(capsys, "migrate", "-c", str(tmp_path / "relay.yaml"))
    assert code == 0 and "nothing to migrate" in out
    assert not (tmp_path / "var").exists()  # not even an empty spool made


def test_a_postgres_spool_without_a_dsn_is_a_config_error(tmp_path, capsys):
    (tmp_path / "relay.yaml").write_text(BASE + "spool: {backend: postgres}\n")
    code, _, err = run(capsys, "migrate", "-c", str(tmp_path / "relay.yaml"))
    assert code == 1 and "backend: postgres needs dsn (or dsn_file)" in err
