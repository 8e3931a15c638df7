"""Configuration: one YAML file validated into typed, frozen objects.

``schema`` is the shape (pydantic models), ``load`` reads a file into it (YAML marks for
``file:line: key`` errors, ``${ENV}``, ``*_file``), ``units`` and ``formats`` are how values
are written (durations, sizes, rates; password hashes, DKIM keys), ``diff`` says what a
reload can change. The names below are what the rest of the relay imports.
"""

from relay.config.load import (
    ConfigError,
    load_config,
    load_demo_config,
    load_section,
    parse_config,
)
from relay.config.schema import (
    Account,
    Admin,
    Channel,
    Config,
    DkimKey,
    Events,
    HttpApi,
    Listener,
    Logging,
    MessageOptions,
    Resolver,
    Rule,
    Server,
    Spool,
    TLSFiles,
    TLSPolicy,
    TLSRule,
    Tracking,
    Upstream,
    User,
    acceptor_count,
)
from relay.config.units import Rate, parse_duration, parse_rate, split_host_port

__all__ = [
    "Account", "Admin", "Channel", "Config", "ConfigError", "DkimKey", "Events", "HttpApi", "Listener", "Logging", "MessageOptions",
    "Rate", "Resolver", "Rule", "Server", "Spool", "TLSFiles", "TLSPolicy", "TLSRule", "Tracking", "Upstream",
    "User", "acceptor_count", "load_config", "load_demo_config", "load_section", "parse_config",
    "parse_duration", "parse_rate", "split_host_port",
]
