"""HTTP submission against SMTP submission, in one run on one relay: requests/s for 5 KB messages.

Starts a relay like ``bench/peers.py OurRelay`` (loopback only, one process, the SQLite spool
fsynced before every answer, ``upstream.kind: capture``), then sends ``--messages`` 5 KB
messages through each front with ``--concurrency`` clients, alternating which goes first:
SMTP with aiosmtplib (AUTH once per connection, then message after message: a smarthost) and
HTTP with aiohttp (keep-alive connections, one ``apiv2/mail/send`` form per message: a
service). Both count an answer only after the relay's spool commit. Prints JSON.

    .venv/bin/python bench/http_submission.py --messages 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

import aiohttp
import aiosmtplib

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.peers import OurRelay
from relay.policy.auth import hash_password
from tests.support import free_port

USER, PASSWORD, KEY = "bench", "bench-password", "bench-api-key"
BODY = ("x" * 76 + "\n") * (5 * 1024 // 77)  # about 5 KB of text


def relay_config(smtp_port: int, http_port: int, capture: Path) -> dict:
    return {
        "server": {
            "hostname": "relay.bench.test",
            "listeners": [{"name": "submission", "bind": "127.0.0.1", "port": smtp_port, "tls": "none",
                           "auth": "required", "allow_plaintext_auth": True}],
            "max_connections": 1000, "processes": 1,
        },
        "http_api": {"listen": f"127.0.0.1:{http_port}"},
        "spool": {"path": "spool.db"},
        "upstream": {"kind": "capture", "path": str(capture)},
        "admin": {"listen": None},
        "accounts": {"sink": {"api_user": "sink", "type": "trigger", "domain": "bench.test"}},
        "users": {USER: {"password_hash": hash_password(PASSWORD), "api_keys": [hash_password(KEY)],
                         "channels": {"trigger": "sink"}}},
    }


async def smtp_load(port: int, count: int, concurrency: int) -> float:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "app@bench.test", "rcpt@example.net", "bench"
    message.set_content(BODY)
    data = message.as_bytes()
    remaining = iter(range(count))

    async def session() -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, use_tls=False)
        await client.connect()
        await client.login(USER, PASSWORD)
        for _ in remaining:
            await client.sendmail("app@bench.test", ["rcpt@example.net"], data)
        await client.quit()

    started = time.perf_counter()
    await asyncio.gather(*(session() for _ in range(concurrency)))
    return count / (time.perf_counter() - started)


async def http_load(port: int, count: int, concurrency: int) -> float:
    form = {"apiUser": USER, "apiKey": KEY, "from": "app@bench.test", "to": "rcpt@example.net",
            "subject": "bench", "plain": BODY}
    remaining = iter(range(count))
    url = f"http://127.0.0.1:{port}/apiv2/mail/send"

    async def worker(session: aiohttp.ClientSession) -> None:
        for _ in remaining:
            async with session.post(url, data=form) as response:
                answer = await response.json()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {answer}")

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(url, data=form) as response:  # warm: the key's hash verified once
            await response.read()
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000, help="per front and repetition (default 2000)")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"smtp": [], "http": []}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as work:
        smtp_port, http_port = free_port(), free_port()
        relay = OurRelay(Path(work), relay_config(smtp_port, http_port, Path(work) / "capture"), smtp_port)
        with relay:
            for rep in range(args.reps):
                order = ["smtp", "http"] if rep % 2 == 0 else ["http", "smtp"]
                for front in order:
                    load = smtp_load(smtp_port, args.messages, args.concurrency) if front == "smtp" else \
                        http_load(http_port, args.messages, args.concurrency)
                    results[front].append(asyncio.run(load))
    print(json.dumps({
        "messages_per_front_and_rep": args.messages, "concurrency": args.concurrency, "size": "5 KB",
        "smtp_msgs_per_s": [round(value, 1) for value in results["smtp"]],
        "http_requests_per_s": [round(value, 1) for value in results["http"]],
        "median_smtp": round(statistics.median(results["smtp"]), 1),
        "median_http": round(statistics.median(results["http"]), 1),
        "http_over_smtp": round(statistics.median(results["http"]) / statistics.median(results["smtp"]), 2),
        "spool_writes_commits": relay.spool_stats,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "cpus": os.cpu_count(),
    }, indent=2))


if __name__ == "__main__":
    main()
