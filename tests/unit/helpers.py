"""Small helpers shared by the unit tests: configs from YAML snippets, line numbers in them."""

from __future__ import annotations

import textwrap

from relay.config import Config, parse_config

SOURCE = "relay.yaml"

# A config that validates and needs no secrets: capture upstream, one plain listener.
BASE = """\
server:
  hostname: relay.test
  listeners:
    - {name: smtp, port: 2525, tls: none, auth: optional}
upstream: {kind: capture}
accounts:
  acme_trigger: {api_user: acme_trigger, type: trigger, domain: acme.com}
users:
  billing:
    channels: {trigger: acme_trigger}
"""


def yaml_text(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def config_from(text: str) -> Config:
    return parse_config(yaml_text(text), source=SOURCE)


def line_of(text: str, needle: str) -> int:
    """1-based number of the only line of ``text`` containing ``needle``."""
    found = [number for number, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(found) == 1, f"{needle!r} is on lines {found}"
    return found[0]
