"""A config read without secrets (`queue`): secret keys are left out unresolved, nothing else is."""

from __future__ import annotations

import pytest

from relay.config import ConfigError, parse_config

TEXT = """\
server:
  hostname: relay.test
  listeners:
    - {name: smtp, port: 2525, tls: none, auth: optional}
upstream: {kind: sendcloud}
admin: {token: "${UNSET_TOKEN}"}
spool: {path: "SPOOL"}
accounts:
  acme: {api_user: acme, api_key: "${UNSET_KEY}", type: trigger, domain: acme.com}
  news: {api_user: news, api_key_file: /nonexistent/key, type: batch, domain: acme.com}
users:
  billing: {password_hash_file: /nonexistent/hash, channels: {trigger: acme, batch: news}}
dkim:
  acme.com: {selector: mail, key_file: /nonexistent/dkim.key}
"""


def test_secrets_left_out_are_neither_resolved_nor_required():
    config = parse_config(TEXT.replace("SPOOL", "spool.db"), "relay.yaml", secrets=False)
    assert [account.api_key for account in config.accounts.values()] == [None, None]
    assert config.users["billing"].password_hash is None and config.admin.token is None and config.dkim == {}
    assert str(config.spool.path) == "spool.db"


def test_a_setting_that_is_no_secret_still_needs_its_variable():
    with pytest.raises(ConfigError, match="relay.yaml:7: spool.path: environment variable UNSET_PATH is not set"):
        parse_config(TEXT.replace("SPOOL", "${UNSET_PATH}"), "relay.yaml", secrets=False)


def test_with_secrets_the_first_missing_one_is_named():
    with pytest.raises(ConfigError, match="environment variable UNSET_TOKEN is not set"):
        parse_config(TEXT.replace("SPOOL", "spool.db"), "relay.yaml")
