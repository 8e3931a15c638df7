#!/usr/bin/env python3
"""Health check for sendcloud-relay: an admin endpoint URL must answer 200, or an SMTP
listener must greet with 220.

    healthcheck.py [--timeout SECONDS] [--wait SECONDS] [URL | HOST:PORT]
                                                (default http://127.0.0.1:8025/healthz)

Exit status 0 when healthy within the timeout, 1 otherwise (and on a usage error: Docker
reserves exit status 2 in HEALTHCHECK). One line says why, on stdout when healthy and on
stderr when not. ``--wait`` retries until healthy or the time is up; the systemd unit uses it
to hold ``systemctl start`` until the relay is serving.

Used where an HTTP probe cannot be declared: the Docker HEALTHCHECK (the image has no curl)
and the systemd unit's ExecStartPost. Kubernetes probes use httpGet directly. Standard
library only, so any python3 runs it.

``http://.../healthz`` (liveness) or ``http://.../readyz`` (readiness) on ``admin.listen``.
``HOST:PORT`` checks an SMTP listener's greeting instead: point it at a ``tls: none`` or
``starttls`` listener (a ``tls: implicit`` one would need a TLS handshake first).
"""

from __future__ import annotations

import argparse
import smtplib
import sys
import time
import urllib.error
import urllib.request

DEFAULT_ADDRESS = "http://127.0.0.1:8025/healthz"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # exit 1, not argparse's 2 (reserved by Docker)
        self.print_usage(sys.stderr)
        print(f"healthcheck: {message}", file=sys.stderr)
        sys.exit(1)


def parse_address(text: str) -> tuple[str, int]:
    """``host:port``, ``[v6addr]:port`` → (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT (IPv6: [ADDR]:PORT)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def check_http(url: str, timeout: float) -> tuple[bool, str]:
    """One attempt at an admin endpoint probe: 200 is healthy; 503 says why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return True, f"{url}: {response.status}"
    except urllib.error.HTTPError as error:
        reasons = " ".join(error.read().decode(errors="replace").split())
        return False, f"{url}: {error.code} {reasons}"
    except (OSError, ValueError) as error:  # refused, timeout, bad URL
        return False, f"{url}: {getattr(error, 'reason', None) or error}"


def check(host: str, port: int, timeout: float) -> tuple[bool, str]:
    """One attempt at an SMTP listener: (healthy, what happened)."""
    where = f"{host}:{port}"
    try:
        # smtplib reads the (possibly multi-line) greeting and raises unless it is 220.
        client = smtplib.SMTP(host, port, timeout=timeout, local_hostname="healthcheck.invalid")
    except smtplib.SMTPConnectError as error:
        text = error.smtp_error
        text = text.decode(errors="replace") if isinstance(text, bytes) else text
        return False, f"{where}: greeting {error.smtp_code} {text}"
    except smtplib.SMTPServerDisconnected as error:  # closed, or no greeting within the timeout
        return False, f"{where}: no greeting ({error})"
    except (OSError, smtplib.SMTPException) as error:  # refused, unreachable, timeout, DNS
        return False, f"{where}: {error or type(error).__name__}"
    try:
        client.quit()  # polite close; a failure here does not make the listener unhealthy
    except (OSError, smtplib.SMTPException):
        client.close()
    return True, f"{where}: 220 greeting"


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(description="Exit 0 if the admin URL answers 200 (or an SMTP HOST:PORT greets with 220), else 1.")
    parser.add_argument("address", nargs="?", default=DEFAULT_ADDRESS,
                        help=f"http://HOST:PORT/healthz|readyz or an SMTP HOST:PORT (default {DEFAULT_ADDRESS})")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds for each attempt (default 5)")
    parser.add_argument("--wait", type=float, default=0.0,
                        help="keep trying for up to this many seconds (default: one try)")
    args = parser.parse_args(argv)
    if args.address.startswith(("http://", "https://")):
        attempt = lambda: check_http(args.address, args.timeout)  # noqa: E731
    else:
        try:
            host, port = parse_address(args.address)
        except ValueError as error:
            parser.error(str(error))
        attempt = lambda: check(host, port, args.timeout)  # noqa: E731
    deadline = time.monotonic() + args.wait
    while True:
        healthy, detail = attempt()
        if healthy:
            print(f"healthy: {detail}")
            return 0
        if time.monotonic() >= deadline:
            print(f"unhealthy: {detail}", file=sys.stderr)
            return 1
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


if __name__ == "__main__":
    sys.exit(main())
