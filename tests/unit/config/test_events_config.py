"""The ``events`` section, ``accounts.*.app_key`` and ``users.*.events_url / events_secret``."""

from __future__ import annotations

import pytest

from relay.config import ConfigError, load_config, parse_config
from relay.observe.logs import secrets_of
from tests.unit.helpers import BASE, SOURCE, line_of

EVENTS = BASE + "events:\n  listen: 0.0.0.0:8026\n  app_key: console-app-key\n"


def test_defaults_are_the_specs():
    events = parse_config(BASE, source=SOURCE).events
    assert events.listen is None and events.tls is None and events.app_key is None
    assert events.max_age == 3600.0
    assert events.retention == 30 * 86400.0
    assert events.suppress == {"invalid": "all", "report_spam": "all", "unsubscribe": "batch"}


def test_durations_and_suppress_are_read():
    text = EVENTS + "  max_age: 10m\n  retention: 7d\n  suppress: {unsubscribe: all, invalid: none}\n"
    events = parse_config(text, source=SOURCE).events
    assert (events.max_age, events.retention) == (600.0, 7 * 86400.0)
    assert events.suppress["unsubscribe"] == "all" and events.suppress["invalid"] == "none"


@pytest.mark.parametrize("value", ["everything", "soft"])
def test_a_bad_suppress_value_names_its_line(value):
    text = EVENTS + f"  suppress: {{invalid: {value}}}\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source=SOURCE)
    assert f"{SOURCE}:{line_of(text, 'suppress:')}: events.suppress.invalid" in str(caught.value)


def test_a_receiver_without_any_app_key_is_refused():
    text = BASE + "events:\n  listen: 0.0.0.0:8026\n"
    with pytest.raises(ConfigError, match="events.app_key"):
        parse_config(text, source=SOURCE)


def test_per_account_app_keys_are_enough():
    text = (
        BASE.replace("domain: acme.com}", "domain: acme.com, app_key: per-account}")
        + "events: {listen: 0.0.0.0:8026}\n"
    )
    assert parse_config(text, source=SOURCE).accounts["acme_trigger"].app_key.get_secret_value() == "per-account"


USER_EVENTS = "    events_url: {url}\n    events_secret: team-secret\n"


@pytest.mark.parametrize("url", ["https://billing.acme.internal/mail-events", "http://127.0.0.1:9000/hook"])
def test_events_url_is_kept(url):
    config = parse_config(BASE + USER_EVENTS.format(url=url), source=SOURCE)
    assert config.users["billing"].events_url == url


@pytest.mark.parametrize("url", ["ftp://x.example/hook", "billing.acme.internal/hook", "https:///nohost"])
def test_a_bad_events_url_names_its_line(url):
    text = BASE + USER_EVENTS.format(url=url)
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source=SOURCE)
    assert f"{SOURCE}:{line_of(text, 'events_url')}: users.billing.events_url" in str(caught.value)


def test_events_url_needs_a_secret():
    with pytest.raises(ConfigError, match="events_secret"):
        parse_config(BASE + "    events_url: https://x.example/hook\n", source=SOURCE)


def test_secrets_come_from_files_and_are_never_logged(tmp_path):
    (tmp_path / "team").write_text("secret-from-file\n")
    (tmp_path / "app").write_text("app-key-from-file\n")
    text = (
        BASE.replace("domain: acme.com}", "domain: acme.com, app_key: account-app-key}")
        + "    events_url: https://x.example/hook\n    events_secret_file: team\n"
        + "events: {listen: 127.0.0.1:8026, app_key_file: app}\n"
    )
    (tmp_path / "relay.yaml").write_text(text)
    config = load_config(tmp_path / "relay.yaml")
    assert config.users["billing"].events_secret.get_secret_value() == "secret-from-file"
    assert {"secret-from-file", "app-key-from-file", "account-app-key"} <= set(secrets_of(config))
