"""The upstream hop: one SMTP transaction at a time on a connection that is kept and reused.

Each delivery worker owns one :class:`Connection`, so ``upstream.connections_per_account``
workers are the account's pool. ``send`` never raises for what the upstream says: it returns
one :class:`~relay.delivery.retry.Reply` per recipient, and connection-level failures become
replies without a code (temporary), as Postfix's ``status=deferred (connect to ...)``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

from relay.config import Account, Upstream
from relay.delivery.retry import Reply
from relay.delivery.sendcloud import queued_message_id

log = logging.getLogger("relay.delivery")

_IDLE_CHECK = 15.0  # seconds idle after which a kept connection is probed with NOOP


@dataclass(frozen=True)
class Transaction:
    queue_id: str
    sender: str
    recipients: list[str]
    body: bytes


@dataclass(frozen=True)
class Result:
    replies: list[Reply]  # one per recipient, in order
    upstream_id: str | None  # SendCloud's messageId, when it gave one
    relay: str  # where it went, for the log line


class Connection:
    def __init__(self, upstream: Upstream, account: Account, local_hostname: str, tls: ssl.SSLContext | None):
        self._upstream = upstream
        self._account = account
        self._local_hostname = local_hostname
        self._tls = tls
        self._client: aiosmtplib.SMTP | None = None
        self._last_used = 0.0
        self.relay = f"{upstream.host}[{upstream.port}]"

    async def send(self, transaction: Transaction) -> Result:
        try:
            client = await self._ready_client()
        except aiosmtplib.SMTPResponseException as error:  # e.g. 535 for a wrong api_key
            await self.close()
            return self._all(transaction, Reply(None, f"upstream refused login or greeting: {error.code} {error.message}"))
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as error:
            await self.close()
            return self._all(transaction, Reply(None, f"connect to {self.relay}: {_describe(error)}"))
        try:
            refused, reply_text = await client.sendmail(transaction.sender, transaction.recipients, transaction.body)
        except aiosmtplib.SMTPRecipientsRefused as error:
            by_address = {refusal.recipient: Reply(refusal.code, refusal.message) for refusal in error.recipients}
            return Result([by_address[address] for address in transaction.recipients], None, self.relay)
        except aiosmtplib.SMTPResponseException as error:
            if error.code == 421:
                await self.close()
            return self._all(transaction, Reply(error.code, error.message))
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as error:
            await self.close()
            return self._all(transaction, Reply(None, f"lost connection with {self.relay}: {_describe(error)}"))
        finally:
            self._last_used = time.monotonic()
        accepted = Reply(250, reply_text)
        replies = [
            Reply(refused[address].code, refused[address].message) if address in refused else accepted
            for address in transaction.recipients
        ]
        return Result(replies, queued_message_id(reply_text), self.relay)

    async def _ready_client(self) -> aiosmtplib.SMTP:
        client = self._client
        if client is not None and client.is_connected:
            if time.monotonic() - self._last_used < _IDLE_CHECK:
                return client
            try:
                await client.noop()
                return client
            except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
                await self.close()
        upstream = self._upstream
        client = aiosmtplib.SMTP(
            hostname=upstream.host,
            port=upstream.port,
            local_hostname=self._local_hostname,
            use_tls=upstream.tls == "implicit",
            start_tls=upstream.tls == "starttls",
            tls_context=self._tls if upstream.tls != "none" else None,
            timeout=upstream.timeout,
        )
        await client.connect()
        self._client = client
        if self._account.api_key is not None:
            # SendCloud offers only AUTH LOGIN; aiosmtplib picks it from EHLO.
            await client.login(self._account.api_user, self._account.api_key.get_secret_value())
        return client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            if client.is_connected:
                await asyncio.wait_for(client.quit(), timeout=5)
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
            client.close()

    def _all(self, transaction: Transaction, reply: Reply) -> Result:
        return Result([reply] * len(transaction.recipients), None, self.relay)


class CaptureConnection:
    """``upstream.kind: capture``: writes ``<id>.eml`` and ``<id>.json`` (the envelope) to a folder.

    The demo's upstream, and a way to see exactly what would have gone to SendCloud.
    """

    def __init__(self, upstream: Upstream, account: Account):
        self._folder = upstream.path
        self._account = account
        self.relay = f"capture[{upstream.path}]"

    async def send(self, transaction: Transaction) -> Result:
        try:
            name = await asyncio.to_thread(self._write, transaction)
        except OSError as error:
            return Result([Reply(None, f"capture to {self._folder}: {error.strerror}")] * len(transaction.recipients), None, self.relay)
        return Result([Reply(250, f"2.0.0 Ok: captured as {name}")] * len(transaction.recipients), None, self.relay)

    def _write(self, transaction: Transaction) -> str:
        self._folder.mkdir(parents=True, exist_ok=True)
        name = f"{transaction.queue_id}-{time.time_ns()}"
        envelope = {
            "queue_id": transaction.queue_id,
            "api_user": self._account.api_user,
            "mail_from": transaction.sender,
            "rcpt_to": transaction.recipients,
        }
        _write_durably(self._folder / f"{name}.eml", transaction.body)
        _write_durably(self._folder / f"{name}.json", json.dumps(envelope, indent=2).encode())
        return f"{name}.eml"

    async def close(self) -> None:
        return None


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def _describe(error: BaseException) -> str:
    if isinstance(error, asyncio.TimeoutError):
        return "timed out"
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def open_connection(upstream: Upstream, account: Account, local_hostname: str, tls: ssl.SSLContext | None):
    """A connection of the configured kind for one delivery worker."""
    if upstream.kind == "capture":
        return CaptureConnection(upstream, account)
    return Connection(upstream, account, local_hostname, tls)
