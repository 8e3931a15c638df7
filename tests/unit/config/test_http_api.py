"""users.*.api_keys and http_api: hashes only, off unless set."""

from __future__ import annotations

import pytest

from relay.config import ConfigError
from relay.policy.auth import hash_password
from tests.unit.helpers import BASE, config_from


def test_http_api_is_off_unless_set():
    assert config_from(BASE).http_api.listen is None


def test_api_keys_are_hashes():
    key = hash_password("k")
    config = config_from(BASE + f"    api_keys: ['{key}']\nhttp_api: {{listen: 127.0.0.1:8027}}\n")
    assert config.users["billing"].api_keys == [key] and config.http_api.listen == "127.0.0.1:8027"


def test_a_plaintext_api_key_is_an_error_with_its_line():
    with pytest.raises(ConfigError, match=r"relay.yaml:11: users.billing.api_keys.0: .*plaintext"):
        config_from(BASE + "    api_keys: [plain-key]\n")
