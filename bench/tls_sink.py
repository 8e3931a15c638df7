"""An upstream sink for the submission scenario: aiosmtpd with STARTTLS and AUTH required.

    python bench/tls_sink.py --port P --counter FILE [--cert C --key K --user U --password W]

smtp-sink speaks no TLS, so the relay's upstream side of the STARTTLS+AUTH scenario lands
here. Without --cert it is the same program in plaintext, so the plain and TLS runs of that
scenario pay the same sink cost and differ only by TLS and AUTH. It counts accepted messages
into FILE (rewritten at most every 20 ms) and discards them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl
from pathlib import Path

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from relay.process.loop import run_event_loop as run  # uvloop when installed: less CPU taken from the relay


class CountingHandler:
    def __init__(self, counter: Path):
        self.count = 0
        self.counter = counter

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        return "250 2.0.0 Ok: queued"

    async def write_counter(self) -> None:
        written = -1
        while True:
            if self.count != written:
                written = self.count
                self.counter.write_text(str(written))
            await asyncio.sleep(0.02)


# aiosmtpd's own use of its deprecated Session.login_data logs a warning on every AUTH.
logging.getLogger("mail.log").addFilter(lambda record: "Session.login_data is deprecated" not in record.getMessage())


def authenticator(user: str, password: str):
    def check(server, session, envelope, mechanism, auth_data):
        ok = isinstance(auth_data, LoginPassword) and auth_data.login.decode() == user and auth_data.password.decode() == password
        return AuthResult(success=ok)

    return check


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--counter", type=Path, required=True)
    parser.add_argument("--cert", type=Path)
    parser.add_argument("--key", type=Path)
    parser.add_argument("--user", default="bench")
    parser.add_argument("--password", default="bench")
    args = parser.parse_args()
    handler = CountingHandler(args.counter)
    context = None
    if args.cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)

    def factory() -> SMTP:
        return SMTP(
            handler, hostname="sink.bench.test", data_size_limit=64 * 2**20, tls_context=context,
            require_starttls=context is not None, auth_required=context is not None,
            authenticator=authenticator(args.user, args.password) if context else None,
        )

    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, "127.0.0.1", args.port, backlog=1024)
    counter = asyncio.create_task(handler.write_counter())
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    counter.cancel()
    server.close()
    handler.counter.write_text(str(handler.count))


if __name__ == "__main__":
    run(main())
