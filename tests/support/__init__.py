"""Helpers shared by the test suites: real-peer gating and local port allocation."""

import os
import socket

import pytest


def require_peer(available: bool, what: str) -> None:
    """Skip the calling test when a real peer (Postfix, swaks, ...) is missing.

    End-to-end tests talk to real programs installed on the machine. On a developer laptop
    without them a skip is the right answer, but in CI a silent skip would hide a broken
    environment: with ``RELAY_REQUIRE_PEERS=1`` in the environment the test fails instead.
    """
    if available:
        return
    reason = f"{what} is not available on this machine"
    if os.environ.get("RELAY_REQUIRE_PEERS") == "1":
        pytest.fail(f"{reason}, and RELAY_REQUIRE_PEERS=1 requires it", pytrace=False)
    pytest.skip(reason)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago.

    For servers that cannot report the port they bound (Postfix's master, aiosmtpd's
    Controller with port 0). Another process could take it before it is bound again; on a
    test machine that race is rare enough to accept.

    A port is handed out once per test process: the kernel may give a port just closed to the
    next bind(0), and two listeners of one config then got the same one (CI saw it).
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


_HANDED_OUT: set[int] = set()
