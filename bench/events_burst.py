"""A burst of signed SendCloud webhook events against a running relay: answered how fast, applied how fast.

    .venv/bin/python bench/events_burst.py [--events 5000] [--rate 1000] [--recipients 100]

Starts ``python -m relay serve`` on a generated config (capture upstream, SQLite spool with
``synchronous=FULL``, ``events.listen``), sends one message with ``--recipients`` recipients
through it, then POSTs ``--events`` signed events (deliver, open, click in turn, mapped by
``SC-Custom-Relay-Id`` + recipient) at ``--rate`` per second, open-loop: each request starts
at its scheduled time whether or not earlier ones were answered, as SendCloud's senders do.
Reports the answer time (p50, p99, max: SendCloud retries after 3 s), the answered rate, and
how long until every event was applied (read from the spool file, as an operator could).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import secrets
import smtplib
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import yaml

REPO = Path(__file__).resolve().parents[1]
APP_KEY = "bench-app-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"the relay did not listen on {port}")


def config(workdir: Path, smtp_port: int, events_port: int) -> dict:
    return {
        "server": {
            "hostname": "bench.test",
            "listeners": [{"name": "smtp", "bind": "127.0.0.1", "port": smtp_port, "tls": "none", "auth": "none"}],
            "trusted_networks": [{"cidr": "127.0.0.1/32", "user": "bench"}],
            "max_recipients": 1000,
            "processes": 1,
        },
        "spool": {"path": str(workdir / "spool.db")},
        "upstream": {"kind": "capture", "path": str(workdir / "capture")},
        "accounts": {"bench_trigger": {"api_user": "bench_trigger", "type": "trigger", "domain": "bench.test"}},
        "users": {"bench": {"channels": {"trigger": "bench_trigger"}}},
        "admin": {"listen": None},
        "events": {"listen": f"127.0.0.1:{events_port}", "app_key": APP_KEY},
    }


def signed(fields: dict) -> dict:
    timestamp = str(int(time.time() * 1000))
    token = secrets.token_hex(25)
    signature = hmac.new(APP_KEY.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()
    return {**fields, "timestamp": timestamp, "token": token, "signature": signature}


def unapplied(db: Path) -> int:
    with sqlite3.connect(db, timeout=10) as conn:
        return conn.execute("SELECT COUNT(*) FROM events WHERE applied = 0").fetchone()[0]


def applied(db: Path) -> int:
    with sqlite3.connect(db, timeout=10) as conn:
        return conn.execute("SELECT COUNT(*) FROM events WHERE applied = 1").fetchone()[0]


async def burst(port: int, queue_id: str, recipients: list[str], count: int, rate: float) -> tuple[list[float], int]:
    url = f"http://127.0.0.1:{port}/webhooks/sendcloud"
    headers = json.dumps({"SC-Custom-Relay-Id": queue_id})
    names = ("deliver", "open", "click")
    latencies: list[float] = []
    failures = 0
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def one(n: int, at: float) -> None:
            nonlocal failures
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            recipient = recipients[n % len(recipients)]
            fields = signed(
                {
                    "event": names[n % 3],
                    "apiUser": "bench_trigger",
                    "recipient": recipient,
                    "userHeaders": headers,
                    "ip": "203.0.113.9",
                }
            )
            started = time.monotonic()
            try:
                async with session.post(
                    url, data=urlencode(fields), headers={"Content-Type": "application/x-www-form-urlencoded"}
                ) as response:
                    await response.read()
                    if response.status != 200:
                        failures += 1
            except aiohttp.ClientError:
                failures += 1
            latencies.append(time.monotonic() - started)

        start = time.monotonic() + 0.2
        await asyncio.gather(*(one(n, start + n / rate) for n in range(count)))
    return latencies, failures


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--recipients", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="events-burst-") as tmp:
        workdir = Path(tmp)
        smtp_port, events_port = free_port(), free_port()
        (workdir / "relay.yaml").write_text(yaml.safe_dump(config(workdir, smtp_port, events_port)))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(workdir / "relay.log", "wb") as log:
            relay = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "-c", str(workdir / "relay.yaml")],
                cwd=workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for_port(smtp_port)
            wait_for_port(events_port)
            recipients = [f"r{n}@example.net" for n in range(args.recipients)]
            with smtplib.SMTP("127.0.0.1", smtp_port) as client:
                client.ehlo()
                client.mail("app@bench.test")
                for address in recipients:
                    client.rcpt(address)
                _, reply = client.data(b"From: app@bench.test\r\nSubject: burst\r\n\r\nhello\r\n")
            queue_id = reply.decode().rsplit(" ", 1)[1]
            sent_at = time.monotonic()
            latencies, failures = asyncio.run(burst(events_port, queue_id, recipients, args.events, args.rate))
            answered_in = time.monotonic() - sent_at
            db = workdir / "spool.db"
            while unapplied(db) and time.monotonic() - sent_at < 600:
                time.sleep(0.05)
            applied_in = time.monotonic() - sent_at
            result = {
                "events": args.events,
                "target_rate": args.rate,
                "failures": failures,
                "answered_per_s": round(args.events / answered_in, 1),
                "p50_ms": round(statistics.median(latencies) * 1000, 1),
                "p99_ms": round(percentile(latencies, 99) * 1000, 1),
                "max_ms": round(max(latencies) * 1000, 1),
                "applied": applied(db),
                "applied_per_s": round(args.events / applied_in, 1),
                "all_applied_after_s": round(applied_in, 2),
            }
            print(json.dumps(result))
        finally:
            relay.terminate()
            relay.wait(30)


if __name__ == "__main__":
    main()
