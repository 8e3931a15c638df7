"""A small HTTP client (urllib) for the running relay's admin endpoint, as the CLI's commands need it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from relay.config import Admin, split_host_port


class Unreachable(Exception):
    """The admin endpoint did not answer (not running, wrong address)."""


def base_url(settings: Admin) -> str:
    """Where to reach ``admin.listen`` from this machine (a wildcard bind is reached on loopback)."""
    host, port = split_host_port(settings.listen or "")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def post(settings: Admin, path: str, timeout: float) -> dict:
    """POST to ``path`` with the admin token; the JSON answer, also for an HTTP error status."""
    url = base_url(settings) + path
    request = urllib.request.Request(url, method="POST", data=b"")
    if settings.token is not None:
        request.add_header("Authorization", f"Bearer {settings.token.get_secret_value()}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        try:
            return json.load(error)
        except ValueError:
            return {"error": f"HTTP {error.code}"}
    except OSError as error:
        raise Unreachable(f"cannot reach the relay's admin endpoint at {url}: {error}") from None
