"""An asyncio SMTP load client (aiosmtplib) for what smtp-source cannot do: STARTTLS, AUTH, idle sessions.

    python bench/loadgen.py load --port P --messages N --sessions S --size BYTES
                                 [--per-connection K] [--starttls --cafile F [--resume] --user U --password W]
    python bench/loadgen.py idle --port P --idle 1000 --probes 200

``load`` runs S sessions in parallel; each connects (STARTTLS and AUTH when asked), sends up
to K messages, says QUIT and starts over, until N messages got their 250. It prints one JSON
object: messages, seconds, errors.

``idle`` opens that many sessions (connected, EHLO said, then silent), prints ``READY`` and
waits for a line on stdin (the caller measures the relay's memory meanwhile), then sends
``probes`` messages one after another, each on a new connection, and prints the latency of
each from connect to the 250 (p50, p99, max) as JSON. Run in its own process, so its CPU is
not the relay's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import ssl
import statistics
import sys
import time

import aiosmtplib

from relay.process.loop import run_event_loop as run  # uvloop when installed: less CPU taken from the relay

SENDER = "bench@bench.test"
RECIPIENT = "sink@example.net"


def message(size: int, number: int) -> bytes:
    """A plain message of about ``size`` bytes in 78-character lines."""
    head = (
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: bench {number}\r\n"
        f"Message-ID: <{number}.{time.time_ns()}@bench.test>\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    lines = max(1, (size - len(head)) // len(line))
    return head + line * lines


class ResumingContext(ssl.SSLContext):
    """A client context that offers the session of the latest connection to the next one.

    asyncio's ``start_tls`` (and uvloop's) takes no ``session=``, but both build the TLS
    object with ``context.wrap_bio``: it is passed here. One session per destination, the
    newest one, as Postfix's tlsmgr cache keeps.
    """

    session: ssl.SSLSession | None = None

    def wrap_bio(self, incoming, outgoing, server_side=False, server_hostname=None, session=None):
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session=session or self.session)


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """Built once per run, as an application or Postfix does (loading the CA file per connection costs)."""
    if not args.starttls:
        return None
    context = ResumingContext(ssl.PROTOCOL_TLS_CLIENT) if args.resume else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=args.cafile)
    return context


def client(args: argparse.Namespace, context: ssl.SSLContext | None = None) -> aiosmtplib.SMTP:
    return aiosmtplib.SMTP(
        hostname="127.0.0.1", port=args.port, start_tls=context is not None, tls_context=context,
        local_hostname="loadgen.bench.test", timeout=120,
    )


async def load(args: argparse.Namespace) -> dict:
    remaining = args.messages
    errors = handshakes = resumed = 0
    body = message(args.size, 0)
    context = tls_context(args)

    async def session() -> None:
        nonlocal remaining, errors, handshakes, resumed
        while remaining > 0:
            smtp = client(args, context)
            await smtp.connect()
            tls = smtp.get_transport_info("ssl_object")
            if tls is not None:
                handshakes += 1
                resumed += tls.session_reused
            if args.user:
                await smtp.login(args.user, args.password)
            for _ in range(args.per_connection):
                if remaining <= 0:
                    break
                remaining -= 1
                try:
                    await smtp.sendmail(SENDER, [RECIPIENT], body)
                except aiosmtplib.SMTPException as error:
                    errors += 1
                    remaining += 1
                    print(f"loadgen: {error}", file=sys.stderr)
                    if errors > 100:
                        raise
            if args.resume and tls is not None:  # TLS 1.3 tickets arrive after the handshake: taken now
                context.session = tls.session
            await smtp.quit()

    started = time.monotonic()
    cpu = time.process_time()
    await asyncio.gather(*(session() for _ in range(args.sessions)))
    return {
        "messages": args.messages, "seconds": time.monotonic() - started, "errors": errors,
        "cpu_seconds": time.process_time() - cpu, "tls_handshakes": handshakes, "tls_resumed": resumed,
    }


async def idle(args: argparse.Namespace) -> dict:
    sessions = []
    for start in range(0, args.idle, 100):  # in steps, so the listen backlog never overflows
        batch = [client(args) for _ in range(min(100, args.idle - start))]
        await asyncio.gather(*(smtp.connect() for smtp in batch))
        await asyncio.gather(*(smtp.ehlo() for smtp in batch))
        sessions.extend(batch)
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    latencies = []
    body = message(args.size, 1)
    for _ in range(args.probes):
        started = time.monotonic()
        smtp = client(args)
        await smtp.connect()
        await smtp.sendmail(SENDER, [RECIPIENT], body)
        latencies.append(time.monotonic() - started)
        await smtp.quit()
    still_open = sum(smtp.is_connected for smtp in sessions)
    for smtp in sessions:
        smtp.close()
    latencies.sort()
    return {
        "idle_sessions": len(sessions),
        "still_open": still_open,
        "probes": len(latencies),
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "max_ms": 1000 * latencies[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["load", "idle"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=5120)
    parser.add_argument("--per-connection", type=int, default=1)
    parser.add_argument("--starttls", action="store_true")
    parser.add_argument("--cafile")
    parser.add_argument("--resume", action="store_true", help="offer the latest TLS session on each new connection")
    parser.add_argument("--user")
    parser.add_argument("--password")
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--probes", type=int, default=200)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    result = run(load(args) if args.mode == "load" else idle(args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
