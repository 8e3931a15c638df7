#!/usr/bin/env python3
"""Health check for sendcloud-relay: connect to an SMTP listener, expect a 220 greeting, QUIT.

    healthcheck.py [--timeout SECONDS] [--wait SECONDS] [HOST:PORT]     (default 127.0.0.1:25)

Exit status 0 when the listener greets with 220 within the timeout, 1 otherwise (and on a usage
error: Docker reserves exit status 2 in HEALTHCHECK). One line says why, on stdout when healthy
and on stderr when not. ``--wait`` retries until the listener answers or the time is up; the
systemd unit uses it to hold ``systemctl start`` until the relay is serving.

Used by all three deployment styles (Docker HEALTHCHECK, Kubernetes exec probes, systemd
ExecStartPost). Standard library only, so any python3 runs it. It stands in until the admin
HTTP endpoint (/healthz, /readyz) exists; then HTTP probes replace it.

Point it at a listener with ``tls: none`` or ``starttls`` (the greeting comes before TLS);
a ``tls: implicit`` listener would need a TLS handshake first and is not supported here.
"""

from __future__ import annotations

import argparse
import smtplib
import sys
import time

DEFAULT_ADDRESS = "127.0.0.1:25"


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


def check(host: str, port: int, timeout: float) -> tuple[bool, str]:
    """One attempt: (healthy, what happened)."""
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
    parser = _Parser(description="Exit 0 if an SMTP listener answers with a 220 greeting, else 1.")
    parser.add_argument("address", nargs="?", default=DEFAULT_ADDRESS,
                        help=f"HOST:PORT (default {DEFAULT_ADDRESS})")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds for each attempt (default 5)")
    parser.add_argument("--wait", type=float, default=0.0,
                        help="keep trying for up to this many seconds (default: one try)")
    args = parser.parse_args(argv)
    try:
        host, port = parse_address(args.address)
    except ValueError as error:
        parser.error(str(error))
    deadline = time.monotonic() + args.wait
    while True:
        healthy, detail = check(host, port, args.timeout)
        if healthy:
            print(f"healthy: {detail}")
            return 0
        if time.monotonic() >= deadline:
            print(f"unhealthy: {detail}", file=sys.stderr)
            return 1
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


if __name__ == "__main__":
    sys.exit(main())
