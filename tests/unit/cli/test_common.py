"""Where a command finds its config: -c, else $SENDCLOUD_RELAY_CONFIG, else /etc/... when it exists."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.cli.common import find_config

CASES = {
    "given_wins": (Path("given.yaml"), {"SENDCLOUD_RELAY_CONFIG": "env.yaml"}, True, Path("given.yaml")),
    "environment_next": (None, {"SENDCLOUD_RELAY_CONFIG": "env.yaml"}, True, Path("env.yaml")),
    "empty_environment_is_unset": (None, {"SENDCLOUD_RELAY_CONFIG": ""}, True, "system"),
    "system_file_when_it_exists": (None, {}, True, "system"),
    "nothing": (None, {}, False, None),
}


@pytest.mark.parametrize("given, environ, system_exists, expected", CASES.values(), ids=CASES.keys())
def test_find_config(tmp_path, given, environ, system_exists, expected):
    system = tmp_path / "relay.yaml"
    if system_exists:
        system.write_text("")
    assert find_config(given, environ, system) == (system if expected == "system" else expected)
