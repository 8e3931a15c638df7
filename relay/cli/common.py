"""What every command shares: where its config comes from."""

from __future__ import annotations

import argparse
from pathlib import Path

from relay.config import Config, load_config, load_demo_config


def load(args: argparse.Namespace) -> Config:
    return load_config(args.config) if args.config else load_demo_config()


def with_config(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("-c", "--config", type=Path, help="config file (default: the embedded demo config)")
    return parser
