"""What a command imports before it answers: start-up is most of a read-only command's time.

Each command runs in a fresh interpreter (this one has everything loaded) on a real spool, and
reports the modules it loaded. The read-only commands must not load what only the running relay
uses: SMTP on either side, DKIM and DNS, the PostgreSQL driver, metrics, the HTTP stack, the
event loop; a relay that signs nothing must not load dkimpy or dnspython at all.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from relay.rewrite.dkim import generate
from relay.spool import NewMessage
from relay.spool.sqlite import SqliteSpool
from tests.unit.helpers import BASE

ROOT = Path(__file__).resolve().parents[3]
RUNNING_RELAY_ONLY = ("dkim", "dns", "aiosmtplib", "aiosmtpd", "asyncpg", "prometheus_client", "aiohttp", "uvloop",
                      "argon2", "relay.smtp", "relay.delivery", "relay.rewrite", "relay.intake", "relay.process",
                      "relay.webapi", "relay.observe.metrics")
SIGNING_ONLY = ("dkim", "dns")


@pytest.fixture(scope="module")
def relay_config(tmp_path_factory) -> Path:
    """A config whose secrets and DKIM key a read-only command must not touch, and a spool with one message."""
    folder = tmp_path_factory.mktemp("start-up")
    (folder / "dkim.key").write_bytes(generate("rsa", 1024))  # a PEM key: reading it would import dkimpy
    config = folder / "relay.yaml"
    config.write_text(BASE.replace("domain: acme.com}", "domain: acme.com, api_key: '${START_UP_UNSET_KEY}'}")
                      + f"spool: {{path: {folder / 'spool.db'}}}\n"
                      + f"dkim: {{acme.com: {{selector: s1, key_file: {folder / 'dkim.key'}}}}}\n")

    async def one_message() -> None:
        spool = SqliteSpool(folder / "spool.db")
        await spool.open()
        await spool.store(NewMessage("M0000000001", 1_700_000_000.0, "billing", "smtp", "10.0.0.5", "acme_trigger",
                                     "trigger", "a@acme.com", ["b@example.net"], b"Subject: x\r\n\r\nbody\r\n"))
        await spool.close()

    asyncio.run(one_message())
    return config


def loaded_by(code: str, tmp_path: Path) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``code``."""
    report = tmp_path / "modules.json"
    program = f"import json, sys\n{code}\nopen({str(report)!r}, 'w').write(json.dumps(sorted(sys.modules)))\n"
    finished = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert finished.returncode == 0, finished.stderr
    return set(json.loads(report.read_text()))


def of_packages(modules: set[str], packages: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in packages))


READ_ONLY_COMMANDS = {
    "queue_list": ["queue", "list", "--limit", "50"],
    "queue_show": ["queue", "show", "M0000000001"],
    "stats": ["stats"],
    "suppression_list": ["suppression", "list"],
}


@pytest.mark.parametrize("argv", READ_ONLY_COMMANDS.values(), ids=READ_ONLY_COMMANDS.keys())
def test_a_read_only_command_loads_nothing_of_the_running_relay(relay_config, tmp_path, argv):
    code = f"from relay.cli import main\nassert main({[*argv, '-c', str(relay_config)]!r}) == 0"
    modules = loaded_by(code, tmp_path)
    assert "relay.spool.sqlite" in modules  # it did read the spool
    assert of_packages(modules, RUNNING_RELAY_ONLY) == []


def test_a_relay_that_signs_nothing_loads_no_dkim_or_dns(tmp_path):
    modules = loaded_by("import relay.process.main", tmp_path)
    assert "relay.rewrite.dkim" in modules
    assert of_packages(modules, SIGNING_ONLY) == []
