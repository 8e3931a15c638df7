"""The config's shape: typed, frozen pydantic models, one per section of the YAML file.

``extra="forbid"`` everywhere: a misspelt key is an error, not a silently ignored setting.
Cross-references (users → channels → accounts, trusted networks → users, TLS rules →
accounts) are checked in :meth:`Config._references_resolve`.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    model_validator,
)

from relay.config.formats import is_supported_hash, key_algorithm
from relay.config.units import Duration, HostPort, RateLimit, Size

# Validation context key: the config was loaded or sent without the upstream secrets.
SECRETS_WITHHELD = "secrets_withheld"

Channel = Literal["trigger", "batch"]
SenderMode = Literal["align", "rewrite", "keep"]
TLSPolicy = Literal["may", "encrypt", "verify"]
_LOCAL_PART = r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$"


class CrossReferenceError(Exception):
    """A cross-reference error with the key path it belongs to.

    Not a ValueError, so pydantic lets it through untouched and ``parse_config`` can turn it
    into ``file:line: key: why`` (pydantic would report it with no location at all).
    """

    def __init__(self, loc: tuple, message: str):
        super().__init__(message)
        self.loc = loc
        self.message = message



def _password_hash(value: str) -> str:
    if not is_supported_hash(value):
        raise ValueError(
            "must be a hash made by `sendcloud-relay hash-password` "
            "($argon2id$... or $scrypt$...); plaintext passwords are not accepted"
        )
    return value


PasswordHash = Annotated[str, AfterValidator(_password_hash)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


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
    max_recipients: int = Field(default=1000, ge=1)  # Postfix's smtpd_recipient_limit; upstream splits by 100
    max_errors: int = Field(default=20, ge=1)  # error replies per session, then 421 4.7.0 (smtpd_hard_error_limit)
    max_line_length: Size = ByteSize(1 << 20)  # of a DATA line (CRLF excluded); longer: 552 5.3.4
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
    # SMTP acceptor processes sharing the listening sockets and one spool (relay/process/supervisor.py):
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
    backend: Literal["sqlite", "postgres"] = "sqlite"
    path: Path = Path("var/spool.db")  # sqlite: the database; postgres: its folder holds spilled bodies
    dsn: SecretStr | None = None  # postgres: libpq URI or key=value string (dsn_file: PATH reads it from a file)
    lease: Duration = 60.0  # postgres: how long a node's claim on a message lasts unless renewed
    # postgres: this node's name in leases and logs; the hostname by default, so a restarted node
    # (same pod name, same host) is the same node and takes its own leases back at once
    node: str = Field(default_factory=socket.gethostname, min_length=1, max_length=200)
    retry: list[Duration] = Field(default=[60.0, 300.0, 900.0, 3600.0, 14400.0], min_length=1)
    retry_jitter: float = Field(default=0.1, ge=0, lt=1)
    max_lifetime: Duration = 5 * 86400.0
    poll_interval: Duration = 1.0
    active_limit: int = Field(default=20000, ge=1)  # messages delivery holds in memory (qmgr_message_active_limit)
    keep_final: Duration = 7 * 86400.0  # delivered/failed records kept for `queue list --all`
    commit_timeout: Duration = Field(default=30.0, gt=0)  # a write not committed by then fails (451 4.3.0)

    @model_validator(mode="after")
    def _postgres_needs_a_dsn(self) -> Spool:
        if self.backend == "postgres" and (self.dsn is None or not self.dsn.get_secret_value().strip()):
            raise ValueError("backend: postgres needs dsn (or dsn_file)")
        return self


class Upstream(_Model):
    kind: Literal["sendcloud", "smtp", "capture"] = "sendcloud"
    host: str = "smtp.sendcloud.net"
    port: int = Field(default=587, ge=1, le=65535)
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    ca_file: Path | None = None
    timeout: Duration = 60.0
    data_timeout: Duration = Field(default=600.0, gt=0)  # for the reply to the final dot (smtp_data_done_timeout)
    connections_per_account: int = Field(default=4, ge=1)
    max_recipients_per_transaction: int = Field(default=100, ge=1)
    allow_plaintext_auth: bool = False
    throttle_pause: Duration = 30.0  # an account told to slow down (536, quota) pauses this long,
    throttle_max_pause: Duration = 900.0  # doubling while the replies go on, up to this
    unreachable_backoff: Duration = Field(default=1.0, gt=0)  # connect failed: one probe after this,
    unreachable_max_backoff: Duration = Field(default=300.0, gt=0)  # doubling while probes fail, up to this
    path: Path = Path("var/capture")  # where `capture` writes .eml files

    @model_validator(mode="after")
    def _never_plaintext_to_sendcloud(self) -> Upstream:
        if self.kind == "sendcloud" and self.tls == "none":
            raise ValueError("kind: sendcloud needs tls: starttls or implicit")
        return self


class Account(_Model):
    api_user: str = Field(pattern=r"^[A-Za-z0-9@_-]{1,64}$")
    api_key: SecretStr | None = None
    app_key: SecretStr | None = None  # the console's WebHook APP KEY for this API_USER; else events.app_key
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


def _events_url(value: str) -> str:
    parsed = urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    return value


EventsURL = Annotated[str, AfterValidator(_events_url)]


class MessageOptions(_Model):
    """What a user or a rule may set for its messages; unset values are inherited (rule > user > global)."""

    ad_marker: Literal["prefix", "suffix"] | None = None
    label: int | None = Field(default=None, ge=1)  # SendCloud label ID: AUTH LOGIN as api_user#label
    tracking: Tracking | None = None
    sender: SenderOverride | None = None


class User(MessageOptions):
    password_hash: PasswordHash | None = None
    api_keys: list[PasswordHash] = []  # keys for HTTP submission (apiKey), hashed like password_hash
    channels: dict[Channel, str] = Field(min_length=1)
    allowed_senders: list[str] = []
    rate_limit: RateLimit | None = None  # recipients accepted per period, e.g. 600/hour
    events_url: EventsURL | None = None  # this team's events, POSTed as signed JSON (Team fan-out)
    events_secret: SecretStr | None = None

    @model_validator(mode="after")
    def _events_url_is_signed(self) -> User:
        if self.events_url is not None and self.events_secret is None:
            raise ValueError("events_url needs events_secret (or events_secret_file): teams must be able to check the signature")
        return self


class RuleMatch(_Model):
    user: str | list[str] | None = None
    listener: str | list[str] | None = None
    sender: str | None = None  # glob on the envelope sender
    recipient_domains: list[str] | None = None
    header: dict[str, str] | None = None  # header name → glob on its value
    recipients_more_than: int | None = Field(default=None, ge=0)


class Rule(MessageOptions):
    match: RuleMatch = Field(default_factory=RuleMatch)
    channel: Channel


class TLSRule(_Model):
    """Upstream TLS for an account (any, when omitted) and recipient domains (any, when omitted)."""

    account: str | None = None
    domains: list[str] | None = None  # a domain matches itself and its subdomains
    rule: TLSPolicy


def _dkim_key(value: SecretStr) -> SecretStr:
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


class AdminUser(_Model):
    """Someone who signs in to the dashboard: viewers read, operators also change."""

    password_hash: PasswordHash
    role: Literal["viewer", "operator"] = "viewer"


class Admin(_Model):
    """The admin HTTP endpoint: /metrics, /healthz, /readyz, /api/queue, /api/reload, the dashboard at /."""

    listen: HostPort | None = "127.0.0.1:8025"  # null: off
    token: SecretStr | None = None  # bearer token for /metrics and /api/* (probes need none)
    users: dict[str, AdminUser] = {}  # the dashboard's sign-in; none: nobody can sign in
    session_secret: SecretStr | None = None  # signs session cookies; null: a random key per process
    session_lifetime: Duration = 8 * 3600.0
    # Proxies whose X-Forwarded-Proto is believed: "https" from one of them marks cookies Secure.
    trusted_proxies: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    upstream_unready_after: Duration | None = 900.0  # /readyz fails once upstream fails this long


SuppressSetting = Literal["all", "batch", "trigger", "none"]


class Events(_Model):
    """SendCloud's webhooks (``/webhooks/sendcloud``): the receiver, its key, what events change."""

    listen: HostPort | None = None  # null: no receiver (SendCloud's servers must reach it)
    tls: TLSFiles | None = None  # HTTPS on the receiver itself; else a reverse proxy terminates TLS
    app_key: SecretStr | None = None  # the console's WebHook APP KEY; accounts.*.app_key overrides
    max_age: Duration = 3600.0  # events whose timestamp is further from now are refused (403)
    suppress: dict[Literal["invalid", "report_spam", "unsubscribe"], SuppressSetting] = {
        "invalid": "all", "report_spam": "all", "unsubscribe": "batch",
    }
    retention: Duration = 30 * 86400.0  # events, message history and bodies kept this long


class HttpApi(_Model):
    """HTTP submission in SendCloud's Web API shape (``POST /apiv2/mail/send``)."""

    listen: HostPort | None = None  # null: off
    tls: TLSFiles | None = None  # HTTPS on the listener itself; else a reverse proxy terminates TLS


class Logging(_Model):
    format: Literal["plain", "json"] = "plain"
    level: Literal["debug", "info", "warning"] = "info"
    mask_addresses: bool = False  # j***@example.com in every log line


class Config(_Model):
    server: Server
    events: Events = Field(default_factory=Events)
    http_api: HttpApi = Field(default_factory=HttpApi)
    spool: Spool = Field(default_factory=Spool)
    upstream: Upstream = Field(default_factory=Upstream)
    admin: Admin = Field(default_factory=Admin)
    logging: Logging = Field(default_factory=Logging)
    accounts: dict[str, Account] = Field(min_length=1)
    users: dict[str, User] = Field(min_length=1)
    rules: list[Rule] = []
    sender: Sender = Field(default_factory=Sender)
    ad_marker_text: str = Field(default="(AD)", min_length=1)
    tls_rules: list[TLSRule] = []
    dkim: dict[str, DkimKey] = {}  # signing domain → selector and private key
    resolver: Resolver = Field(default_factory=Resolver)

    @model_validator(mode="after")
    def _references_resolve(self, info: ValidationInfo) -> Config:
        for name, user in self.users.items():
            for channel, account_name in user.channels.items():
                account = self.accounts.get(account_name)
                loc = ("users", name, "channels", channel)
                if account is None:
                    raise CrossReferenceError(loc, f"no account named {account_name!r}")
                if account.type != channel:
                    raise CrossReferenceError(
                        loc,
                        f"account {account_name!r} is of type {account.type}; "
                        f"a {channel} channel needs a {channel} account",
                    )
        for index, network in enumerate(self.server.trusted_networks):
            if network.user not in self.users:
                raise CrossReferenceError(
                    ("server", "trusted_networks", index, "user"), f"{network.cidr}: no user {network.user!r}"
                )
        for index, tls_rule in enumerate(self.tls_rules):
            if tls_rule.account is not None and tls_rule.account not in self.accounts:
                raise CrossReferenceError(("tls_rules", index, "account"), f"no account named {tls_rule.account!r}")
            if tls_rule.rule != "may" and self.upstream.kind == "smtp" and self.upstream.tls == "none":
                raise CrossReferenceError(
                    ("tls_rules", index, "rule"), f"{tls_rule.rule} can never be met: upstream.tls is none"
                )
        if self.events.listen and self.events.app_key is None and any(a.app_key is None for a in self.accounts.values()):
            missing = ", ".join(name for name, a in self.accounts.items() if a.app_key is None)
            raise CrossReferenceError(
                ("events", "app_key"),
                f"events.listen is set but no APP KEY checks the events of {missing}: set events.app_key "
                "or accounts.*.app_key (unsigned events are never accepted)",
            )
        for name, account in self.accounts.items():
            # Withheld: an acceptor process's config (relay.process.ipc), a read-only command's.
            withheld = bool(info.context and info.context.get(SECRETS_WITHHELD))
            if account.api_key is None and self.upstream.kind == "sendcloud" and not withheld:
                raise CrossReferenceError(("accounts", name), "api_key (or api_key_file) is required")
            if (
                account.api_key is not None
                and self.upstream.kind == "smtp"
                and self.upstream.tls == "none"
                and not self.upstream.allow_plaintext_auth
            ):
                raise CrossReferenceError(
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

