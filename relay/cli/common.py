"""What every command shares: where its config comes from.

As the spec's Commands section says: ``-c FILE``, else ``$SENDCLOUD_RELAY_CONFIG``, else
``/etc/sendcloud-relay/relay.yaml`` when it exists; only `serve` falls back to the embedded
demo config (and says so).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path

from relay.config import Config, ConfigError, Spool, load_config, load_section

ENVIRONMENT_VARIABLE = "SENDCLOUD_RELAY_CONFIG"
SYSTEM_PATH = Path("/etc/sendcloud-relay/relay.yaml")
NOT_FOUND = f"no config found: give -c FILE, set ${ENVIRONMENT_VARIABLE}, or create {SYSTEM_PATH}"


def find_config(given: Path | None, environ: Mapping[str, str], system_path: Path = SYSTEM_PATH) -> Path | None:
    """The config file a command uses, or None when there is none to use."""
    if given is not None:
        return given
    if environ.get(ENVIRONMENT_VARIABLE):
        return Path(environ[ENVIRONMENT_VARIABLE])
    return system_path if system_path.exists() else None


def config_path(args: argparse.Namespace) -> Path | None:
    return find_config(args.config, os.environ)


def load(args: argparse.Namespace, secrets: bool = True) -> Config:
    """The whole config; ``secrets=False`` for a command that uses none (`queue show`)."""
    return load_config(_found(args), secrets=secrets)


def load_spool(args: argparse.Namespace) -> Spool:
    """Only the ``spool`` section: what the spool's commands read, validated alone (the rest of
    the file is the relay's to judge), so they start without building the whole schema."""
    return load_section(_found(args), "spool")


def _found(args: argparse.Namespace) -> Path:
    path = config_path(args)
    if path is None:
        raise ConfigError(NOT_FOUND)
    return path


def with_config(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "-c", "--config", type=Path,
        help=f"config file (default: ${ENVIRONMENT_VARIABLE}, else {SYSTEM_PATH})",
    )
    return parser
