"""relay.config: parsing, secrets, scalar types, cross-references and where errors point."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from relay.config import ConfigError, load_config, load_demo_config, parse_config
from relay.policy.auth import verify_password
from tests.unit.helpers import BASE, SOURCE, line_of

REPO = Path(__file__).resolve().parents[3]

SCRYPT_HASH = "$scrypt$ln=4,r=8,p=1$c2FsdHNhbHRzYWx0$RGmRx1F4Nyq3G8Wy2qAjT8b6Q2J0yY5mG0S7JdS1mEo"
ARGON2_HASH = "$argon2id$v=19$m=65536,t=3,p=4$fRZqZxxHJRf4lGbMB0mGLw$BJ9kJJ1m3W7uxTx8udNwZ9t17Kiuki/umBQpGK5ay+Q"


def parse(text: str):
    return parse_config(text, source=SOURCE)


def config_error(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    return str(caught.value)


def assert_points_at(message: str, text: str, needle: str, dotted: str) -> None:
    """The error names ``file:line: dotted.key`` with the line of ``needle``."""
    expected = f"{SOURCE}:{line_of(text, needle)}: {dotted}"
    assert expected in message, f"expected {expected!r} in {message!r}"


# -- a valid config ------------------------------------------------------------------------


def test_minimal_config_validates_with_documented_defaults():
    """The smallest useful config loads and gets the defaults the spec and notes promise."""
    config = parse(BASE)
    assert config.server.hostname == "relay.test"
    assert [listener.name for listener in config.server.listeners] == ["smtp"]
    assert config.server.listeners[0].bind == "0.0.0.0"
    assert config.server.max_message_size == 16_000_000  # SendCloud's SIZE 16000000
    assert config.server.max_recipients == 1000  # Postfix's smtpd_recipient_limit
    assert config.server.max_errors == 20
    assert config.server.max_line_length == 1 << 20
    assert config.upstream.kind == "capture"
    assert config.accounts["acme_trigger"].type == "trigger"
    assert config.users["billing"].channels == {"trigger": "acme_trigger"}
    assert config.users["billing"].allowed_senders == []
    assert config.rules == []


# -- errors name file, line and dotted key ----------------------------------------------------


UNKNOWN_KEYS = {
    "listener": (
        BASE.replace("auth: optional}", "auth: optional, colour: blue}"),
        "colour: blue",
        "server.listeners.0.colour",
    ),
    "account": (
        BASE.replace("domain: acme.com}", "domain: acme.com, api_usr: x}"),
        "api_usr: x",
        "accounts.acme_trigger.api_usr",
    ),
    "section": (BASE + "spol: {path: var/x.db}\n", "spol:", "spol"),
    "nested_block": (
        BASE + "spool:\n  path: var/spool.db\n  retries: [1m]\n",
        "retries:",
        "spool.retries",
    ),
}


@pytest.mark.parametrize("text, needle, dotted", UNKNOWN_KEYS.values(), ids=UNKNOWN_KEYS.keys())
def test_unknown_key_names_its_line_and_path(text, needle, dotted):
    """A misspelt key is an error pointing at the line it is on, not a silently ignored setting."""
    message = config_error(text)
    assert_points_at(message, text, needle, dotted)
    assert "unknown key" in message


WRONG_TYPES = {
    "max_recipients_word": (
        BASE.replace("hostname: relay.test", "hostname: relay.test\n  max_recipients: lots"),
        "max_recipients:",
        "server.max_recipients",
    ),
    "port_out_of_range": (
        BASE.replace("port: 2525", "port: 99999"),
        "port: 99999",
        "server.listeners.0.port",
    ),
    "tls_mode": (
        BASE.replace("tls: none", "tls: maybe"),
        "tls: maybe",
        "server.listeners.0.tls",
    ),
    "account_type": (
        BASE.replace("type: trigger", "type: bulk"),
        "type: bulk",
        "accounts.acme_trigger.type",
    ),
}


@pytest.mark.parametrize("text, needle, dotted", WRONG_TYPES.values(), ids=WRONG_TYPES.keys())
def test_wrong_type_names_its_line_and_path(text, needle, dotted):
    """A value of the wrong type or out of range points at its own key."""
    assert_points_at(config_error(text), text, needle, dotted)


def test_yaml_syntax_error_names_file_and_line():
    """Broken YAML is reported with the file and a line, not a traceback."""
    text = BASE + "rules: [\n"
    message = config_error(text)
    assert re.match(rf"^{re.escape(SOURCE)}:\d+: not valid YAML", message), message


def test_channel_pointing_at_account_of_wrong_type_names_line_and_key():
    """A batch channel mapped to a trigger account: the error names the offending key's line."""
    text = BASE.replace("channels: {trigger: acme_trigger}", "channels: {batch: acme_trigger}")
    message = config_error(text)
    assert_points_at(message, text, "channels: {batch", "users.billing.channels.batch")
    assert "type trigger" in message


def test_channel_pointing_at_missing_account_names_line_and_key():
    """A user whose channel names an account that does not exist: file, line and key."""
    text = BASE.replace("channels: {trigger: acme_trigger}", "channels: {trigger: nosuch}")
    message = config_error(text)
    assert_points_at(message, text, "channels: {trigger: nosuch}", "users.billing.channels.trigger")
    assert "'nosuch'" in message


def test_trusted_network_with_unknown_user_names_line_and_key():
    """A trusted network mapped to a user that does not exist: file, line and key."""
    text = BASE.replace(
        "upstream:", "  trusted_networks:\n    - {cidr: 10.20.0.0/16, user: mailhub}\nupstream:"
    )
    message = config_error(text)
    assert_points_at(message, text, "user: mailhub", "server.trusted_networks.0")
    assert "'mailhub'" in message


# -- secrets: ${ENV} and *_file ---------------------------------------------------------------


def test_env_reference_is_substituted(monkeypatch):
    """``${ENV}`` works for a whole secret and inside a longer string."""
    monkeypatch.setenv("SC_TEST_KEY", "k3y-from-env")
    monkeypatch.setenv("SC_NODE", "n7")
    text = BASE.replace("domain: acme.com}", 'domain: acme.com, api_key: "${SC_TEST_KEY}"}').replace(
        "hostname: relay.test", "hostname: relay-${SC_NODE}.test"
    )
    config = parse(text)
    assert config.accounts["acme_trigger"].api_key.get_secret_value() == "k3y-from-env"
    assert config.server.hostname == "relay-n7.test"


def test_missing_env_variable_names_line_key_and_variable(monkeypatch):
    """An unset variable is an error naming the variable and where it is used."""
    monkeypatch.delenv("SC_UNSET_KEY", raising=False)
    text = BASE.replace("domain: acme.com}", 'domain: acme.com, api_key: "${SC_UNSET_KEY}"}')
    message = config_error(text)
    assert_points_at(message, text, "SC_UNSET_KEY", "accounts.acme_trigger.api_key")
    assert "SC_UNSET_KEY" in message


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    """A folder holding the config; the working directory is elsewhere on purpose."""
    folder = tmp_path / "etc"
    (folder / "secrets").mkdir(parents=True)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return folder


def test_key_file_is_read_relative_to_the_config_folder(config_dir):
    """``api_key_file`` reads the secret next to the config, without its trailing newline."""
    (config_dir / "secrets" / "sc_trigger").write_text("s3cret-key\n")
    path = config_dir / "relay.yaml"
    path.write_text(BASE.replace("domain: acme.com}", "domain: acme.com, api_key_file: secrets/sc_trigger}"))
    config = load_config(path)
    assert config.accounts["acme_trigger"].api_key.get_secret_value() == "s3cret-key"


def test_key_file_path_may_come_from_env(config_dir, monkeypatch):
    """``${ENV}`` is substituted in a ``*_file`` path before the file is read."""
    (config_dir / "secrets" / "sc_trigger").write_text("from-env-path\n")
    monkeypatch.setenv("SC_SECRETS", str(config_dir / "secrets"))
    path = config_dir / "relay.yaml"
    path.write_text(
        BASE.replace("domain: acme.com}", 'domain: acme.com, api_key_file: "${SC_SECRETS}/sc_trigger"}')
    )
    assert load_config(path).accounts["acme_trigger"].api_key.get_secret_value() == "from-env-path"


def test_key_and_key_file_together_are_refused(config_dir):
    """Setting both the secret and its ``_file`` is ambiguous: refused, naming the key."""
    (config_dir / "secrets" / "sc_trigger").write_text("x\n")
    text = BASE.replace(
        "domain: acme.com}", "domain: acme.com,\n                 api_key: a, api_key_file: secrets/sc_trigger}"
    )
    path = config_dir / "relay.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert f"{path}:{line_of(text, 'api_key_file')}: accounts.acme_trigger.api_key_file" in message
    assert "set api_key or api_key_file, not both" in message


def test_missing_key_file_names_line_and_key(config_dir):
    """An unreadable secret file is a config error at its key, not a traceback."""
    text = BASE.replace("domain: acme.com}", "domain: acme.com, api_key_file: secrets/absent}")
    path = config_dir / "relay.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert f"{path}:{line_of(text, 'api_key_file')}: accounts.acme_trigger.api_key_file" in str(caught.value)


def test_load_config_names_the_file_in_errors(tmp_path):
    """Errors from a file name that file's path."""
    path = tmp_path / "relay.yaml"
    path.write_text(BASE.replace("port: 2525", "port: nope"))
    with pytest.raises(ConfigError, match=re.escape(f"{path}:4: server.listeners.0.port")):
        load_config(path)


def test_load_config_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


# -- sizes and durations ---------------------------------------------------------------------


def with_server_key(key: str, value: str) -> str:
    return BASE.replace("hostname: relay.test", f"hostname: relay.test\n  {key}: {value}")


SIZES = {
    "mebibytes": ("25MiB", 25 * 1024 * 1024),
    "megabytes": ("16MB", 16_000_000),
    "kibibytes": ("64KiB", 65536),
    "plain_int": ("1000000", 1_000_000),
}


@pytest.mark.parametrize("written, expected", SIZES.values(), ids=SIZES.keys())
def test_sizes_accept_units(written, expected):
    """Sizes read as operators write them (25MiB, 16MB) or as plain bytes."""
    assert parse(with_server_key("max_message_size", written)).server.max_message_size == expected


BAD_SIZES = {"word": "huge", "unknown_unit": "25 parsecs", "zero": "0", "negative": "-5"}


@pytest.mark.parametrize("written", BAD_SIZES.values(), ids=BAD_SIZES.keys())
def test_bad_sizes_are_refused_at_their_key(written):
    text = with_server_key("max_message_size", written)
    assert_points_at(config_error(text), text, "max_message_size", "server.max_message_size")


def with_spool(body: str) -> str:
    return BASE + "spool:\n" + body


DURATIONS = {
    "seconds": ("30s", 30.0),
    "minutes": ("5m", 300.0),
    "hours": ("4h", 14400.0),
    "days": ("5d", 432000.0),
    "plain_int_is_seconds": ("90", 90.0),
    "fraction": ("1.5h", 5400.0),
}


@pytest.mark.parametrize("written, expected", DURATIONS.values(), ids=DURATIONS.keys())
def test_durations_accept_units(written, expected):
    """Durations read as 30s, 5m, 4h, 5d; a plain number is seconds."""
    assert parse(with_spool(f"  max_lifetime: {written}\n")).spool.max_lifetime == expected


def test_retry_schedule_is_a_list_of_durations():
    config = parse(with_spool("  retry: [1m, 5m, 15m, 1h, 4h]\n"))
    assert config.spool.retry == [60.0, 300.0, 900.0, 3600.0, 14400.0]


BAD_DURATIONS = {
    "words": "5 minutes",
    "unknown_unit": "5y",
    "negative": "-5s",
    "zero": "0s",
    "unit_only": "m",
    "boolean": "true",
}


@pytest.mark.parametrize("written", BAD_DURATIONS.values(), ids=BAD_DURATIONS.keys())
def test_bad_durations_are_refused_at_their_key(written):
    text = with_spool(f"  max_lifetime: {written}\n")
    assert_points_at(config_error(text), text, "max_lifetime", "spool.max_lifetime")


def test_bad_duration_inside_retry_list_names_the_list():
    text = with_spool("  retry: [1m, soon]\n")
    assert_points_at(config_error(text), text, "retry:", "spool.retry.1")


# -- password hashes ---------------------------------------------------------------------------


@pytest.mark.parametrize("password_hash", [ARGON2_HASH, SCRYPT_HASH], ids=["argon2id", "scrypt"])
def test_supported_password_hashes_are_accepted(password_hash):
    text = BASE.replace("  billing:\n", f'  billing:\n    password_hash: "{password_hash}"\n')
    assert parse(text).users["billing"].password_hash == password_hash


@pytest.mark.parametrize("value", ["hunter2", "$1$md5crypt$xyz", "{PLAIN}secret"], ids=["plain", "md5crypt", "dovecot_plain"])
def test_plaintext_password_is_refused(value):
    """``password_hash`` must be a hash: a plaintext password is refused at its line."""
    text = BASE.replace("  billing:\n", f'  billing:\n    password_hash: "{value}"\n')
    message = config_error(text)
    assert_points_at(message, text, "password_hash", "users.billing.password_hash")
    assert "plaintext" in message


# -- upstream TLS and credentials ---------------------------------------------------------------


def test_sendcloud_upstream_without_tls_is_refused():
    """SendCloud credentials must never cross in plaintext: kind sendcloud with tls none fails."""
    text = BASE.replace("upstream: {kind: capture}", "upstream: {kind: sendcloud, tls: none}").replace(
        "domain: acme.com}", "domain: acme.com, api_key: k}"
    )
    message = config_error(text)
    assert re.search(rf"{re.escape(SOURCE)}:\d+: upstream", message), message
    assert "tls" in message


def test_sendcloud_upstream_requires_an_api_key():
    text = BASE.replace("upstream: {kind: capture}", "upstream: {kind: sendcloud}")
    message = config_error(text)
    assert "accounts.acme_trigger" in message and "api_key" in message


def smtp_upstream(extra: str = "", api_key: bool = True) -> str:
    text = BASE.replace("upstream: {kind: capture}", f"upstream: {{kind: smtp, host: sink.test, tls: none{extra}}}")
    if api_key:
        text = text.replace("domain: acme.com}", "domain: acme.com, api_key: k}")
    return text


def test_plaintext_smtp_upstream_with_api_key_is_refused():
    """An api_key over ``tls: none`` is refused unless the operator opts in."""
    message = config_error(smtp_upstream())
    assert "accounts.acme_trigger" in message
    assert "allow_plaintext_auth" in message


PLAINTEXT_ALLOWED = {
    "opted_in": smtp_upstream(", allow_plaintext_auth: true"),
    "no_api_key": smtp_upstream(api_key=False),
}


@pytest.mark.parametrize("text", PLAINTEXT_ALLOWED.values(), ids=PLAINTEXT_ALLOWED.keys())
def test_plaintext_smtp_upstream_allowed_when_opted_in_or_without_credentials(text):
    assert parse(text).upstream.tls == "none"


def test_listener_tls_needs_server_certificate():
    text = BASE.replace("tls: none", "tls: starttls")
    message = config_error(text)
    assert "server.tls" in message


# -- trusted networks ---------------------------------------------------------------------------

TRUSTED = BASE.replace(
    "upstream:",
    "  trusted_networks:\n"
    "    - {cidr: 10.20.0.0/16, user: mailhub}\n"
    "    - {cidr: '2001:db8::/32', user: billing}\n"
    "upstream:",
) + "  mailhub:\n    channels: {trigger: acme_trigger}\n"

ADDRESSES = {
    "inside_v4": ("10.20.3.4", "mailhub"),
    "network_edge": ("10.20.255.255", "mailhub"),
    "outside_v4": ("10.21.0.1", None),
    "loopback_untrusted": ("127.0.0.1", None),
    "inside_v6": ("2001:db8::25", "billing"),
    "outside_v6": ("2001:db9::1", None),
    "not_an_address": ("mail.example.org", None),
    "empty": ("", None),
}


@pytest.mark.parametrize("address, user", ADDRESSES.values(), ids=ADDRESSES.keys())
def test_user_for_address_maps_trusted_networks(address, user):
    """Clients inside a trusted network belong to its user; everyone else to nobody."""
    assert parse(TRUSTED).user_for_address(address) == user


# -- the shipped configs -------------------------------------------------------------------------


def test_embedded_demo_config_loads():
    """The demo the README starts: capture upstream, a demo user, loopback trusted."""
    config = load_demo_config()
    assert config.upstream.kind == "capture"
    assert set(config.users) >= {"demo", "local"}
    assert config.user_for_address("127.0.0.1") == "local"
    assert all(listener.port >= 1024 for listener in config.server.listeners)
    assert verify_password(config.users["demo"].password_hash, "demo-password")


def test_config_demo_yaml_matches_the_embedded_demo():
    """``config/demo.yaml`` is the embedded default (spec): same file, and it validates."""
    path = REPO / "config" / "demo.yaml"
    assert path.read_text() == (REPO / "relay" / "demo.yaml").read_text()
    assert load_config(path).users.keys() == load_demo_config().users.keys()


def _shipped_configs() -> dict[str, str]:
    """Every config the project ships: the documented example and the deployment samples."""
    configs = {"config/relay.example.yaml": (REPO / "config" / "relay.example.yaml").read_text()}
    configs["deploy/relay.yaml"] = (REPO / "deploy" / "relay.yaml").read_text()
    configmap = yaml.safe_load((REPO / "deploy" / "kubernetes" / "configmap.yaml").read_text())
    configs["deploy/kubernetes/configmap.yaml"] = configmap["data"]["relay.yaml"]
    scale_out = yaml.safe_load((REPO / "deploy" / "kubernetes-scale-out" / "configmap.yaml").read_text())
    configs["deploy/kubernetes-scale-out/configmap.yaml"] = scale_out["data"]["relay.yaml"]
    return configs


@pytest.mark.parametrize("name", list(_shipped_configs()))
def test_shipped_configs_validate(name, tmp_path, monkeypatch):
    """The example documents every key, and the deploy samples must start as shipped."""
    text = _shipped_configs()[name]
    for variable in set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text)):
        monkeypatch.setenv(variable, f"test-{variable.lower()}")
    secret = tmp_path / "secret"
    secret.write_text("test-secret\n")
    # Secret files named in them do not exist here: point every *_file (but ca_file) at one.
    text = re.sub(r"(\b(?!ca_)\w+_file:\s*)[^\s,}#]+", lambda m: f"{m.group(1)}{secret}", text)
    config = parse_config(text, source=name, base=tmp_path)
    assert config.accounts and config.users


# -- routing options, TLS rules, DKIM -------------------------------------------------------


def test_tls_rule_naming_an_unknown_account_points_at_it():
    text = BASE + "tls_rules:\n  - {account: acme_trigerr, domains: [qq.com], rule: verify}\n"
    assert_points_at(config_error(text), text, "acme_trigerr", "tls_rules.0.account")


def test_rule_options_are_validated():
    text = BASE + "rules:\n  - channel: trigger\n    ad_marker: middle\n    label: x12\n"
    message = config_error(text)
    assert_points_at(message, text, "ad_marker: middle", "rules.0.ad_marker")
    assert_points_at(message, text, "label: x12", "rules.0.label")


def test_dkim_key_file_is_read_and_checked(tmp_path):
    from relay.rewrite.dkim import generate

    (tmp_path / "good.key").write_bytes(generate("ed25519"))
    (tmp_path / "bad.key").write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    good = BASE + "dkim:\n  acme.com: {selector: s1, key_file: good.key}\n"
    assert parse_config(good, source=SOURCE, base=tmp_path).dkim["acme.com"].selector == "s1"
    bad = BASE + "dkim:\n  acme.com: {selector: s1, key_file: bad.key}\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(bad, source=SOURCE, base=tmp_path)
    assert "dkim.acme.com.key" in str(caught.value) and "PKCS#1" in str(caught.value)


# -- admin, logging, PROXY protocol ----------------------------------------------------------------


def test_admin_and_logging_defaults():
    config = parse(BASE)
    assert config.admin.listen == "127.0.0.1:8025" and config.admin.token is None
    assert config.admin.upstream_unready_after == 900.0
    assert (config.logging.format, config.logging.level, config.logging.mask_addresses) == ("plain", "info", False)


@pytest.mark.parametrize("listen", ["127.0.0.1:8025", "[::1]:9100", "0.0.0.0:80", None])
def test_admin_listen_accepts_host_port_or_null(listen):
    text = BASE + f"admin: {{listen: {listen if listen else 'null'}}}\n"
    assert parse(text.replace("[::1]:9100", "'[::1]:9100'")).admin.listen == listen


@pytest.mark.parametrize("listen", ["8025", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000"])
def test_admin_listen_refuses_what_is_not_host_port(listen):
    message = config_error(BASE + f"admin:\n  listen: '{listen}'\n")
    assert f"{SOURCE}:{line_of(BASE + 'admin:', 'admin:') + 1}: admin.listen: must be HOST:PORT" in message


def test_proxy_protocol_per_listener():
    text = BASE.replace("auth: optional}", "auth: optional, proxy_protocol: {proxies: [10.0.0.0/8, 'fd00::/8']}}")
    proxy = parse(text).server.listeners[0].proxy_protocol
    assert [str(n) for n in proxy.proxies] == ["10.0.0.0/8", "fd00::/8"] and proxy.timeout == 5.0
    assert parse(BASE).server.listeners[0].proxy_protocol is None


def test_proxy_protocol_needs_proxies_and_refuses_implicit_tls():
    assert "proxy_protocol.proxies" in config_error(BASE.replace("auth: optional}", "proxy_protocol: {proxies: []}}"))
    text = BASE.replace("tls: none, auth: optional}", "tls: implicit, proxy_protocol: {proxies: [10.0.0.0/8]}}")
    text = text.replace("upstream:", "  tls: {cert: c.pem, key: k.pem}\nupstream:")
    assert "proxy_protocol does not work with tls: implicit" in config_error(text)


def test_the_spools_commands_read_only_the_spool_section(tmp_path, monkeypatch):
    """`queue list`, `stats` and `suppression` validate one small model, and nothing else of the file."""
    from relay.config import load_section

    monkeypatch.setenv("SPOOL_DSN", "postgresql://relay:pw@db/relay")
    path = tmp_path / "relay.yaml"
    path.write_text("server: {broken: yes}\nspool:\n  backend: postgres\n  dsn: '${SPOOL_DSN}'\n  lease: 2m\n")
    settings = load_section(path, "spool")
    assert (settings.backend, settings.dsn.get_secret_value(), settings.lease) == (
        "postgres", "postgresql://relay:pw@db/relay", 120.0)
    path.write_text("accounts: {}\n")
    assert load_section(path, "spool").path == Path("var/spool.db")  # no section: the defaults, as in the whole config
    path.write_text("server: {}\nspool:\n  path: spool.db\n  lease: soon\n")
    with pytest.raises(ConfigError, match=r"relay.yaml:4: spool.lease: 'soon' is not a duration"):
        load_section(path, "spool")


def test_reload_reads_only_the_admin_section(tmp_path, monkeypatch):
    """`sendcloud-relay reload` must reach the relay even when the rest of the file is broken."""
    from relay.config import load_section

    monkeypatch.setenv("ADMIN_TOKEN", "t0ken-from-env")
    path = tmp_path / "relay.yaml"
    path.write_text("server: {broken: yes}\nadmin: {listen: '127.0.0.1:9025', token: '${ADMIN_TOKEN}'}\n")
    settings = load_section(path, "admin")
    assert settings.listen == "127.0.0.1:9025" and settings.token.get_secret_value() == "t0ken-from-env"
    path.write_text("server: {}\nadmin:\n  listen: nowhere\n")
    with pytest.raises(ConfigError, match=r"relay.yaml:3: admin.listen: must be HOST:PORT"):
        load_section(path, "admin")
