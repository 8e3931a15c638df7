"""Fixtures for end-to-end tests: a CA, a fake SendCloud, and a relay process pointed at it.

The standard relay config mirrors a real deployment: a port-25-style listener (STARTTLS,
AUTH optional, a trusted network), a submission listener (AUTH required) and an implicit-TLS
listener, two SendCloud accounts (trigger and batch) whose keys come from an environment
variable and a file, and a team user with ``allowed_senders``. Tests connect from 127.0.0.1,
which is NOT trusted; the trusted network is 127.0.0.2, used as a source address.
"""

from __future__ import annotations

import functools
import ssl
from pathlib import Path

import pytest
import trustme

from relay.policy.auth import hash_password
from tests.support import free_port
from tests.support.fake_sendcloud import FakeSendCloud
from tests.support.relay import RelayProcess

TRUSTED_SOURCE = "127.0.0.2"
USER, PASSWORD = "billing", "billing-secret"
KEYS = {"acme_trigger": "trigger-key-123", "acme_batch": "batch-key-456"}


@functools.cache
def _password_hash() -> str:
    return hash_password(PASSWORD)


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def client_tls(ca_file) -> ssl.SSLContext:
    """What an application verifying the relay's certificate uses."""
    return ssl.create_default_context(cafile=str(ca_file))


@pytest.fixture
def sendcloud(ca):
    with FakeSendCloud(ca, KEYS) as fake:
        yield fake


def relay_config(workdir: Path, ca, ca_file: Path, upstream_port: int, **server_overrides) -> dict:
    """The standard test config (see the module docstring); ``server_overrides`` patch `server`."""
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    leaf.cert_chain_pems[0].write_to_path(str(workdir / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(workdir / "key.pem"))
    (workdir / "batch.key").write_text(KEYS["acme_batch"] + "\n")
    server = {
        "hostname": "relay.test",
        "listeners": [
            {"name": "smtp", "bind": "127.0.0.1", "port": free_port(), "tls": "starttls", "auth": "optional"},
            {"name": "submission", "bind": "127.0.0.1", "port": free_port(), "tls": "starttls", "auth": "required"},
            {"name": "smtps", "bind": "127.0.0.1", "port": free_port(), "tls": "implicit", "auth": "required"},
            {"name": "internal", "bind": "127.0.0.1", "port": free_port(), "tls": "none", "auth": "none"},
        ],
        "tls": {"cert": "cert.pem", "key": "key.pem"},
        "max_message_size": "64KiB",
        "max_recipients": 5,
        "trusted_networks": [{"cidr": f"{TRUSTED_SOURCE}/32", "user": "mailhub"}],
        "auth_failure_delay": "50ms",
        "event_loop": "auto",  # uvloop, as a plain `pip install .` runs; asyncio is tested where it matters
        "processes": 1,  # quicker to start; acceptor processes are tested where they matter
        "shutdown_grace": "5s",
    }
    server.update(server_overrides)
    return {
        "server": server,
        "spool": {"path": "spool.db", "retry": ["1s", "2s"], "max_lifetime": "1h", "poll_interval": "200ms"},
        "upstream": {
            "kind": "sendcloud",
            "host": "127.0.0.1",
            "port": upstream_port,
            "ca_file": str(ca_file),
            "timeout": "10s",
            "connections_per_account": 2,
        },
        "accounts": {
            "acme_trigger": {"api_user": "acme_trigger", "api_key": "${SC_TRIGGER_KEY}", "type": "trigger", "domain": "info.acme.com"},
            "acme_batch": {"api_user": "acme_batch", "api_key_file": "batch.key", "type": "batch", "domain": "news.acme.com"},
        },
        "users": {
            USER: {
                "password_hash": _password_hash(),
                "channels": {"trigger": "acme_trigger", "batch": "acme_batch"},
                "allowed_senders": ["*@acme.com", "*@info.acme.com"],
            },
            "mailhub": {"channels": {"trigger": "acme_trigger"}},
        },
        "rules": [
            {"match": {"header": {"X-Mail-Type": "newsletter"}}, "channel": "batch"},
            {"match": {"recipients_more_than": 3}, "channel": "batch"},
        ],
        "admin": {"listen": f"127.0.0.1:{free_port()}"},
    }


@pytest.fixture
def make_relay(tmp_path, ca, ca_file, sendcloud):
    """Factory: ``make_relay(**server_overrides)`` → a started RelayProcess (stopped after)."""
    started: list[RelayProcess] = []

    def make(config_patch=None, **server_overrides) -> RelayProcess:
        config = relay_config(tmp_path, ca, ca_file, sendcloud.port, **server_overrides)
        if config_patch:
            config_patch(config)
        relay = RelayProcess(tmp_path, config, env={"SC_TRIGGER_KEY": KEYS["acme_trigger"]})
        started.append(relay)
        return relay.start()

    yield make
    for relay in started:
        relay.__exit__(None, None, None)


@pytest.fixture
def relay(make_relay) -> RelayProcess:
    return make_relay()
