"""`suppression`, `stats` and check-config's events section, run in-process on a real spool file."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from relay.cli import main
from relay.events import stats
from relay.spool.sqlite import SqliteSpool
from tests.unit.helpers import BASE

CONFIG = BASE + (
    "    events_url: https://billing.example/hook\n    events_secret: s3cret\n"
    "events: {listen: 0.0.0.0:8026, app_key: k}\n"
    "spool: {path: spool.db}\n"
)


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "relay.yaml"
    path.write_text(CONFIG)
    return str(path)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_add_list_export_import_remove(config_file, capsys, tmp_path):
    assert (
        run(
            capsys,
            "suppression",
            "add",
            "A@Example.org",
            "--reason",
            "unsubscribe",
            "--expires",
            "30d",
            "-c",
            config_file,
        )[0]
        == 0
    )
    assert run(capsys, "suppression", "add", "b@example.org", "--account", "acme_trigger", "-c", config_file)[0] == 0
    code, out, _ = run(capsys, "suppression", "list", "--json", "-c", config_file)
    assert code == 0
    listed = json.loads(out)
    assert [(e["address"], e["reason"], e["account"], e["expires_at"] is not None) for e in listed] == [
        ("a@example.org", "unsubscribe", None, True),
        ("b@example.org", "manual", "acme_trigger", False),
    ]
    _, exported, _ = run(capsys, "suppression", "export", "-c", config_file)
    assert exported.splitlines()[0] == "address,reason,account,expires,channels"
    assert run(capsys, "suppression", "remove", "a@example.org", "-c", config_file)[0] == 0
    assert run(capsys, "suppression", "remove", "a@example.org", "-c", config_file)[0] == 1
    (tmp_path / "back.csv").write_text(exported)
    assert (
        run(capsys, "suppression", "import", str(tmp_path / "back.csv"), "-c", config_file)[1] == "2 entries imported\n"
    )
    assert len(json.loads(run(capsys, "suppression", "list", "--json", "-c", config_file)[1])) == 2


def test_a_bad_import_names_every_bad_line_and_adds_nothing(config_file, capsys, tmp_path):
    (tmp_path / "bad.csv").write_text("ok@example.org\nnot-an-address\nx@example.org,bored\n")
    code, _, err = run(capsys, "suppression", "import", str(tmp_path / "bad.csv"), "-c", config_file)
    assert code == 1 and "line 2" in err and "line 3" in err
    assert json.loads(run(capsys, "suppression", "list", "--json", "-c", config_file)[1]) == []


def test_bad_additions_are_refused(config_file, capsys):
    assert run(capsys, "suppression", "add", "a@example.org", "--reason", "bored", "-c", config_file)[0] == 1
    assert run(capsys, "suppression", "add", "-c", config_file)[0] == 2


def test_stats_json_and_table(config_file, capsys, tmp_path):
    async def seed():
        spool = SqliteSpool(tmp_path / "spool.db")
        await spool.open()
        hour = stats.hour_bucket(time.time())
        await spool.add_stats([(hour, "user", "billing", "requested", 10), (hour, "user", "billing", "delivered", 9)])
        await spool.close()

    asyncio.run(seed())
    code, out, _ = run(capsys, "stats", "--since", "1d", "--group", "user", "--json", "-c", config_file)
    assert code == 0
    (row,) = json.loads(out)["rows"]
    assert (row["user"], row["requested"], row["delivered"], row["delivered_rate"]) == ("billing", 10, 9, 0.9)
    _, out, _ = run(capsys, "stats", "-c", config_file)
    header, line = out.splitlines()
    assert header.split()[:3] == ["period", "requested", "delivered"] and line.split()[1:3] == ["10", "9"]
    assert run(capsys, "stats", "--since", "someday", "-c", config_file)[0] == 2


def test_check_config_shows_the_receiver_and_who_fans_out_where(config_file, capsys):
    code, out, _ = run(capsys, "check-config", "-c", config_file)
    assert code == 0
    assert "events: receiver on http://0.0.0.0:8026/webhooks/sendcloud" in out
    assert "events of acme_trigger (acme_trigger) checked with events.app_key" in out
    assert "user billing: events fanned out to https://billing.example/hook" in out
