"""Configuration: one YAML file validated into typed, frozen objects.

Loading happens in three steps, each with its own reason:

1. YAML is parsed with a loader that remembers the line of every mapping key, so any error
   can name ``file:line: key``.
2. ``${ENV}`` references are substituted in every string and every ``*_file`` key is replaced
   by the content of the file it names; secrets are never required inline.
3. pydantic validates the result (``extra="forbid"``: a misspelt key is an error, not a silently
   ignored setting) and the cross-references (users → channels → accounts) are checked.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)

from relay.limits import Rate, parse_rate

Channel = Literal["trigger", "batch"]
SenderMode = Literal["align", "rewrite", "keep"]
TLSPolicy = Literal["may", "encrypt", "verify"]
_LOCAL_PART = r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$"


class ConfigError(Exception):
    """A configuration problem, already phrased for the operator (``file:line: key: why``)."""


class _Misreference(Exception):
    """A cross-reference error with the key path it belongs to.

    Not a ValueError, so pydantic lets it through untouched and ``parse_config`` can turn it
    into ``file:line: key: why`` (pydantic would report it with no location at all).
    """

    def __init__(self, loc: tuple, message: str):
        super().__init__(message)
        self.loc = loc
        self.message = message


# ---------------------------------------------------------------------------------------------
# Scalar types: durations and sizes as operators write them


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(value: Any) -> float:
    """``"5m"`` → 300.0 seconds; plain numbers are seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration such as 30s, 5m, 4h or 5d")
    if isinstance(value, (int, float)):
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a duration: use e.g. 30s, 5m, 4h or 5d")
    number, unit = match.groups()
    return float(number) * _DURATION_UNITS[unit]


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_positive)]
# ByteSize reads "25MiB", "16MB", "16000000"; stored as a plain int of bytes.
Size = Annotated[ByteSize, AfterValidator(lambda v: int(_positive(v)))]


def _password_hash(value: str) -> str:
    from relay.auth import is_supported_hash  # auth owns the hash formats

    if not is_supported_hash(value):
        raise ValueError(
            "must be a hash made by `sendcloud-relay hash-password` "
            "($argon2id$... or $scrypt$...); plaintext passwords are not accepted"
        )
    return value


PasswordHash = Annotated[str, AfterValidator(_password_hash)]


def _rate(value: Any) -> Any:
    return value if isinstance(value, Rate) else parse_rate(value)


# "600/hour", "20/minute", "50/10m": recipients accepted per period (limits owns the syntax).
RateLimit = Annotated[Rate, BeforeValidator(_rate)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------
# Sections


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxyProtocol(_Model):
    """HAProxy's PROXY protocol (v1 or v2) in front of a listener: the header names the client."""

    proxies: list[Network] = Field(min_length=1)  # who may send the header; others are cut off
    timeout: Duration = 5.0  # for the header to arrive after connect


class Listener(_Model):
    name: str
    bind: str = "0.0.0.0"
    port: int = Field(ge=1, le=65535)
    tls: Literal["none", "starttls", "implicit"] = "starttls"
    auth: Literal["required", "optional", "none"] = "optional"
    allow_plaintext_auth: bool = False
    proxy_protocol: ProxyProtocol | None = None

    @model_validator(mode="after")
    def _proxy_protocol_without_implicit_tls(self) -> Listener:
        if self.proxy_protocol is not None and self.tls == "implicit":
            # aiosmtpd would expect the header inside TLS, where no load balancer puts it (#559).
            raise ValueError("proxy_protocol does not work with tls: implicit; use starttls or none")
        return self


class TLSFiles(_Model):
    cert: Path
    key: Path
    self_signed: bool = False  # make a self-signed pair on first run if the files are missing


class TrustedNetwork(_Model):
    cidr: Network
    user: str


class Server(_Model):
    hostname: str = Field(default_factory=socket.getfqdn)
    listeners: list[Listener] = Field(min_length=1)
    tls: TLSFiles | None = None
    max_message_size: Size = ByteSize(16_000_000)  # SendCloud advertises SIZE 16000000
    max_recipients: int = Field(default=100, ge=1)
    trusted_networks: list[TrustedNetwork] = []
    idle_timeout: Duration = 300.0
    data_timeout: Duration = 600.0  # from 354 to the final dot, however the bytes trickle in
    session_timeout: Duration = 3600.0  # a whole connection, however busy
    max_connections: int = Field(default=1000, ge=1)
    max_connections_per_address: int = Field(default=50, ge=1)  # trusted networks are exempt
    client_rate_limit: RateLimit | None = None  # recipients per client address; trusted networks exempt
    auth_failure_delay: Duration = 1.0
    auth_failure_window: Duration = 600.0
    auth_lockout_failures: int = Field(default=10, ge=1)
    auth_lockout_duration: Duration = 900.0
    shutdown_grace: Duration = 30.0
    # SMTP acceptor processes sharing the listening sockets and one spool (relay/workers.py):
    # 1 runs everything in one process; "auto" one per CPU, at least 2 and at most 8.
    processes: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = "auto"
    # auto: uvloop when installed (a dependency except on Windows), else asyncio's own loop.
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"

    @model_validator(mode="after")
    def _listeners_consistent(self) -> Server:
        names = [listener.name for listener in self.listeners]
        if len(set(names)) != len(names):
            raise ValueError("listener names must be unique")
        addresses = [(listener.bind, listener.port) for listener in self.listeners]
        if len(set(addresses)) != len(addresses):
            raise ValueError("two listeners share the same bind address and port")
        if self.tls is None and any(listener.tls != "none" for listener in self.listeners):
            raise ValueError("server.tls (cert and key) is required by listeners with tls")
        return self


class Spool(_Model):
    backend: Literal["sqlite"] = "sqlite"
    path: Path = Path("var/spool.db")
    retry: list[Duration] = Field(default=[60.0, 300.0, 900.0, 3600.0, 14400.0], min_length=1)
    retry_jitter: float = Field(default=0.1, ge=0, lt=1)
    max_lifetime: Duration = 5 * 86400.0
    poll_interval: Duration = 1.0
    keep_final: Duration = 7 * 86400.0  # delivered/failed records kept for `queue list --all`


class Upstream(_Model):
    kind: Literal["sendcloud", "smtp", "capture"] = "sendcloud"
    host: str = "smtp.sendcloud.net"
    port: int = Field(default=587, ge=1, le=65535)
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    ca_file: Path | None = None
    timeout: Duration = 60.0
    connections_per_account: int = Field(default=4, ge=1)
    max_recipients_per_transaction: int = Field(default=100, ge=1)
    allow_plaintext_auth: bool = False
    throttle_pause: Duration = 30.0  # an account told to slow down (536, quota) pauses this long,
    throttle_max_pause: Duration = 900.0  # doubling while the replies go on, up to this
    path: Path = Path("var/capture")  # where `capture` writes .eml files

    @model_validator(mode="after")
    def _never_plaintext_to_sendcloud(self) -> Upstream:
        if self.kind == "sendcloud" and self.tls == "none":
            raise ValueError("kind: sendcloud needs tls: starttls or implicit")
        return self


class Account(_Model):
    api_user: str = Field(pattern=r"^[A-Za-z0-9@_-]{1,64}$")
    api_key: SecretStr | None = None
    type: Channel
    domain: str


class Tracking(_Model):
    """SendCloud's tracking switches; an unset one is left to the client's X-SMTPAPI (or the console)."""

    open: bool | None = None
    click: bool | None = None
    unsubscribe: bool | None = None


class SenderOverride(_Model):
    mode: SenderMode | None = None
    from_local: str | None = Field(default=None, pattern=_LOCAL_PART)


class Sender(_Model):
    mode: SenderMode = "align"
    from_local: str = Field(default="noreply", pattern=_LOCAL_PART)  # local part `rewrite` uses


class MessageOptions(_Model):
    """What a user or a rule may set for its messages; unset values are inherited (rule > user > global)."""

    ad_marker: Literal["prefix", "suffix"] | None = None
    label: int | None = Field(default=None, ge=1)  # SendCloud label ID: AUTH LOGIN as api_user#label
    tracking: Tracking | None = None
    sender: SenderOverride | None = None


class User(MessageOptions):
    password_hash: PasswordHash | None = None
    channels: dict[Channel, str] = Field(min_length=1)
    allowed_senders: list[str] = []
    rate_limit: RateLimit | None = None  # recipients accepted per period, e.g. 600/hour


class RuleMatch(_Model):
    user: str | list[str] | None = None
    listener: str | list[str] | None = None
    sender: str | None = None  # glob on the envelope sender
    recipient_domains: list[str] | None = None
    header: dict[str, str] | None = None  # header name → glob on its value
    recipients_more_than: int | None = Field(default=None, ge=0)


class Rule(MessageOptions):
    match: RuleMatch = RuleMatch()
    channel: Channel


class TLSRule(_Model):
    """Upstream TLS for an account (any, when omitted) and recipient domains (any, when omitted)."""

    account: str | None = None
    domains: list[str] | None = None  # a domain matches itself and its subdomains
    rule: TLSPolicy


def _dkim_key(value: SecretStr) -> SecretStr:
    from relay.signing import key_algorithm  # signing owns the key formats

    key_algorithm(value.get_secret_value().encode())
    return value


class DkimKey(_Model):
    selector: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    key: Annotated[SecretStr, AfterValidator(_dkim_key)]  # usually key_file: written by `dkim keygen`


class Resolver(_Model):
    """DNS for `domain check`; no nameservers means the system's (/etc/resolv.conf)."""

    nameservers: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    port: int = Field(default=53, ge=1, le=65535)
    timeout: Duration = 5.0


def _host_port(value: str) -> str:
    host, port = split_host_port(value)
    if not host or not 1 <= port <= 65535:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8025 or [::1]:8025")
    return value


def split_host_port(value: str) -> tuple[str, int]:
    """``127.0.0.1:8025`` / ``[::1]:8025`` → (host, port); port 0 when it does not parse."""
    host, _, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host, int(port) if port.isdigit() else 0


class Admin(_Model):
    """The admin HTTP endpoint: /metrics, /healthz, /readyz, /api/queue, /api/reload."""

    listen: Annotated[str, AfterValidator(_host_port)] | None = "127.0.0.1:8025"  # null: off
    token: SecretStr | None = None  # bearer token for /metrics and /api/* (probes need none)
    upstream_unready_after: Duration | None = 900.0  # /readyz fails once upstream fails this long


class Logging(_Model):
    format: Literal["plain", "json"] = "plain"
    level: Literal["debug", "info", "warning"] = "info"
    mask_addresses: bool = False  # j***@example.com in every log line


class Config(_Model):
    server: Server
    spool: Spool = Spool()
    upstream: Upstream = Upstream()
    admin: Admin = Admin()
    logging: Logging = Logging()
    accounts: dict[str, Account] = Field(min_length=1)
    users: dict[str, User] = Field(min_length=1)
    rules: list[Rule] = []
    sender: Sender = Sender()
    ad_marker_text: str = Field(default="(AD)", min_length=1)
    tls_rules: list[TLSRule] = []
    dkim: dict[str, DkimKey] = {}  # signing domain → selector and private key
    resolver: Resolver = Resolver()

    @model_validator(mode="after")
    def _references_resolve(self) -> Config:
        for name, user in self.users.items():
            for channel, account_name in user.channels.items():
                account = self.accounts.get(account_name)
                loc = ("users", name, "channels", channel)
                if account is None:
                    raise _Misreference(loc, f"no account named {account_name!r}")
                if account.type != channel:
                    raise _Misreference(
                        loc,
                        f"account {account_name!r} is of type {account.type}; "
                        f"a {channel} channel needs a {channel} account",
                    )
        for index, network in enumerate(self.server.trusted_networks):
            if network.user not in self.users:
                raise _Misreference(
                    ("server", "trusted_networks", index, "user"), f"{network.cidr}: no user {network.user!r}"
                )
        for index, tls_rule in enumerate(self.tls_rules):
            if tls_rule.account is not None and tls_rule.account not in self.accounts:
                raise _Misreference(("tls_rules", index, "account"), f"no account named {tls_rule.account!r}")
            if tls_rule.rule != "may" and self.upstream.kind == "smtp" and self.upstream.tls == "none":
                raise _Misreference(
                    ("tls_rules", index, "rule"), f"{tls_rule.rule} can never be met: upstream.tls is none"
                )
        for name, account in self.accounts.items():
            if account.api_key is None and self.upstream.kind == "sendcloud":
                raise _Misreference(("accounts", name), "api_key (or api_key_file) is required")
            if (
                account.api_key is not None
                and self.upstream.kind == "smtp"
                and self.upstream.tls == "none"
                and not self.upstream.allow_plaintext_auth
            ):
                raise _Misreference(
                    ("accounts", name),
                    "an api_key would cross upstream in plaintext (upstream.tls: none); set "
                    "upstream.allow_plaintext_auth: true for a local staging relay, or use TLS",
                )
        return self

    def user_for_address(self, address: str) -> str | None:
        """The local user a trusted network maps this client address to, if any."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return None
        for network in self.server.trusted_networks:
            if ip.version == network.cidr.version and ip in network.cidr:
                return network.user
        return None


# ---------------------------------------------------------------------------------------------
# Loading


class _LineDict(dict):
    """A mapping that knows the YAML line (1-based) of each of its keys."""

    lines: dict[Any, int]


class _LineLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):  # noqa: D102 - PyYAML hook
        mapping = _LineDict(super().construct_mapping(node, deep=True))
        mapping.lines = {
            self.construct_object(key_node, deep=True): key_node.start_mark.line + 1
            for key_node, _ in node.value
        }
        return mapping


_LineLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _LineLoader.construct_mapping
)

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


AUTO_PROCESSES_MAX = 8  # each acceptor costs ~40-70 MB; past this the main process is the bottleneck


def acceptor_count(config: Config) -> int:
    """How many acceptor processes ``server.processes`` asks for (1 means none: all in one process).

    ``auto``: one per CPU this process may run on (a container's cpuset, not the host's
    count), at least 2 so that SMTP parsing and the spool/delivery never share one loop, and
    at most :data:`AUTO_PROCESSES_MAX`: every acceptor feeds the one main process (spool
    writer, scheduler, delivery), which saturates long before 64 acceptors would.
    """
    wanted = config.server.processes
    if wanted != "auto":
        return wanted
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(max(2, cpus), AUTO_PROCESSES_MAX)


def _line_of(data: Any, loc: tuple) -> tuple[int | None, str]:
    """Deepest known line for a key path, and the path as dotted text."""
    line = None
    node = data
    for part in loc:
        if isinstance(node, _LineDict) and part in node:
            line = node.lines.get(part, line)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            break
    return line, ".".join(str(part) for part in loc)


def _resolve_secrets(node: Any, path: tuple, source: str, root: Any, base: Path) -> Any:
    """Substitute ``${ENV}`` and replace ``key_file: PATH`` by ``key: <file content>``."""
    if isinstance(node, str):

        def env(match: re.Match) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise ConfigError(_where(source, root, path, f"environment variable {name} is not set"))
            return os.environ[name]

        return _ENV_REF.sub(env, node)
    if isinstance(node, list):
        return [_resolve_secrets(item, path + (i,), source, root, base) for i, item in enumerate(node)]
    if isinstance(node, dict):
        resolved = _LineDict()
        resolved.lines = dict(getattr(node, "lines", {}))
        for key, value in node.items():
            value = _resolve_secrets(value, path + (key,), source, root, base)
            if isinstance(key, str) and key.endswith("_file") and key != "ca_file":
                target = key[: -len("_file")]
                if target in node:
                    raise ConfigError(_where(source, root, path + (key,), f"set {target} or {key}, not both"))
                file = base / str(value)
                try:
                    value = file.read_text().rstrip("\r\n")
                except OSError as error:
                    raise ConfigError(_where(source, root, path + (key,), f"cannot read {file}: {error.strerror}")) from None
                resolved.lines[target] = resolved.lines.get(key)
                key = target
            resolved[key] = value
        return resolved
    return node


def _where(source: str, root: Any, loc: tuple, message: str) -> str:
    line, dotted = _line_of(root, loc)
    position = f"{source}:{line}" if line else source
    return f"{position}: {dotted}: {message}" if dotted else f"{position}: {message}"


def parse_config(text: str, source: str = "<config>", base: Path | None = None) -> Config:
    """Validate YAML text into a :class:`Config`; raise :class:`ConfigError` naming file and line."""
    try:
        raw = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - _LineLoader is a SafeLoader
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}{line}: not valid YAML: {getattr(error, 'problem', error)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    data = _resolve_secrets(raw, (), source, raw, base or Path.cwd())
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_problems(error, source, data)) from None
    except _Misreference as error:
        raise ConfigError(_where(source, data, error.loc, error.message)) from None


def _problems(error: ValidationError, source: str, data: Any, prefix: tuple = ()) -> str:
    problems = []
    for item in error.errors():
        loc = prefix + tuple(part for part in item["loc"] if not str(part).startswith("function-"))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (misspelt, or not supported by this version)"
        problems.append(_where(source, data, loc, message))
    return "\n".join(problems)


def load_admin_settings(path: Path | str) -> Admin:
    """Only the ``admin`` section, for `sendcloud-relay reload`: the rest of the file may be
    exactly what is broken, and the running relay is the one to judge it."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_LineLoader)  # noqa: S506 - a SafeLoader
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {getattr(error, 'problem', error)}") from None
    section = raw.get("admin") if isinstance(raw, dict) else None
    data = _resolve_secrets(section or {}, ("admin",), str(path), raw, path.parent)
    try:
        return Admin.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_problems(error, str(path), raw, ("admin",))) from None


def load_config(path: Path | str) -> Config:
    """Read and validate a config file; ``*_file`` paths are relative to the file's folder."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    return parse_config(text, source=str(path), base=path.parent)


def load_demo_config() -> Config:
    """The embedded demo config (`relay/demo.yaml`): what `serve` runs without ``-c``."""
    from importlib import resources

    text = resources.files("relay").joinpath("demo.yaml").read_text()
    return parse_config(text, source="<embedded demo.yaml>")
