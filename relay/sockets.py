"""Listening sockets bound before anything serves (a leaf the admin endpoint and the webhook receiver share)."""

from __future__ import annotations

import socket

from relay.config import split_host_port


def bind_listening(listen: str, key: str) -> socket.socket:
    """A TCP socket bound to ``listen`` (``HOST:PORT``), not yet listening; until it is served a
    connection is refused. An OSError names the address and the config ``key`` that set it."""
    host, port = split_host_port(listen)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(error.errno, error.strerror, f"{listen} ({key})") from None
    return sock
