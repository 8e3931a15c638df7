"""The upstream hop: one SMTP transaction at a time on connections that are kept and reused.

A connection is bound to a :class:`Key`: the SendCloud label it logged in with (the login is
``api_user#label``, so a connection without a label cannot carry labelled mail) and the TLS
policy it was opened under. :class:`AccountPool` keeps each account's connections by key,
never more than ``upstream.connections_per_account`` open. ``send`` never raises for what
the upstream says: it returns one :class:`~relay.delivery.retry.Reply` per recipient, and
connection-level failures become replies without a code (temporary), as Postfix's
``status=deferred (connect to ...)``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

from relay.config import Account, TLSPolicy, Upstream
from relay.delivery.data import send_data
from relay.delivery.retry import Reply
from relay.delivery.sendcloud import queued_message_id
from relay.spool.sqlite import BodyGone

log = logging.getLogger("relay.delivery")

_IDLE_CHECK = 15.0  # seconds idle after which a kept connection is probed with NOOP


@dataclass(frozen=True)
class Key:
    label: int | None
    tls: TLSPolicy


@dataclass(frozen=True)
class TLSContexts:
    verify: ssl.SSLContext  # the system store or upstream.ca_file, host name checked
    encrypt: ssl.SSLContext  # encryption without authentication (Postfix's may and encrypt)


class TLSRequired(Exception):
    """The connection cannot meet the key's TLS policy, or would send credentials in plaintext."""


@dataclass(frozen=True)
class Transaction:
    queue_id: str
    sender: str
    recipients: list[str]
    size: int
    eight_bit: bool  # found when the message was spooled: BODY=8BITMIME
    text: AsyncIterator[bytes]  # the message, read from the spool piece by piece as it is sent


@dataclass(frozen=True)
class Result:
    replies: list[Reply]  # one per recipient, in order
    upstream_id: str | None  # SendCloud's messageId, when it gave one
    relay: str  # where it went, for the log line


class Connection:
    def __init__(self, upstream: Upstream, account: Account, key: Key, local_hostname: str, tls: TLSContexts):
        self._upstream = upstream
        self._account = account
        self.key = key
        self._local_hostname = local_hostname
        self._tls = tls
        self._client: aiosmtplib.SMTP | None = None
        self._last_used = 0.0
        self.relay = f"{upstream.host}[{upstream.port}]"

    async def send(self, transaction: Transaction) -> Result:
        try:
            client = await self._ready_client()
        except TLSRequired as error:
            await self.close()
            return self._all(transaction, Reply(None, str(error)))
        except aiosmtplib.SMTPResponseException as error:  # e.g. 535 for a wrong api_key
            await self.close()
            return self._all(transaction, Reply(None, f"upstream refused login or greeting: {error.code} {error.message}"))
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as error:
            await self.close()
            return self._all(transaction, Reply(None, f"connect to {self.relay}: {_describe(error)}"))
        options = []
        if transaction.eight_bit:
            if not client.supports_extension("8BITMIME"):
                return self._all(transaction, Reply(554, f"5.6.3 {self.relay} does not offer 8BITMIME for this 8-bit message"))
            options.append("BODY=8BITMIME")
        try:
            replies, data_reply = await _transact(client, transaction, options)
        except aiosmtplib.SMTPResponseException as error:  # MAIL refused
            if error.code == 421:
                await self.close()
            return self._all(transaction, Reply(error.code, error.message))
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as error:
            await self.close()
            return self._all(transaction, Reply(None, f"lost connection with {self.relay}: {_describe(error)}"))
        except BodyGone:  # `queue delete` during DATA: the connection was closed before the final dot
            await self.close()
            return self._all(transaction, Reply(None, "message deleted from the queue while it was sent; not delivered"))
        finally:
            self._last_used = time.monotonic()
        if any(reply.code == 421 for reply in replies):
            await self.close()
        upstream_id = queued_message_id(data_reply.text) if data_reply and data_reply.code == 250 else None
        return Result(replies, upstream_id, self.relay)

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
        upstream, policy = self._upstream, self.key.tls
        if policy != "may" and upstream.tls == "none":
            raise TLSRequired(f"TLS required by tls_rules ({policy}) but upstream.tls is none; waiting")
        client = aiosmtplib.SMTP(
            hostname=upstream.host,
            port=upstream.port,
            local_hostname=self._local_hostname,
            use_tls=upstream.tls == "implicit",
            # may: STARTTLS when offered; encrypt and verify: STARTTLS or nothing.
            start_tls=(None if policy == "may" else True) if upstream.tls == "starttls" else False,
            tls_context=self._tls.verify if policy == "verify" else self._tls.encrypt,
            timeout=upstream.timeout,
        )
        self._client = client
        try:
            await client.connect()
        except aiosmtplib.SMTPException as error:
            if "STARTTLS" in str(error) or "starttls" in str(error):
                raise TLSRequired(f"TLS required by tls_rules ({policy}) but {self.relay} offers no STARTTLS; waiting") from None
            raise
        if client.is_ehlo_or_helo_needed:
            await client.ehlo()
        if self._account.api_key is not None:
            encrypted = client.get_transport_info("sslcontext") is not None
            if not encrypted and not upstream.allow_plaintext_auth:
                raise TLSRequired(
                    f"{self.relay} offers no STARTTLS and credentials never cross in plaintext "
                    "(upstream.allow_plaintext_auth is off); waiting"
                )
            # SendCloud offers only AUTH LOGIN; aiosmtplib picks it from EHLO.
            await client.login(self.username, self._account.api_key.get_secret_value())
        return client

    @property
    def username(self) -> str:
        """SendCloud reads a label from the login: ``api_user#label_id``."""
        api_user = self._account.api_user
        return api_user if self.key.label is None else f"{api_user}#{self.key.label}"

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


async def _transact(client: aiosmtplib.SMTP, transaction: Transaction, options: list[str]) -> tuple[list[Reply], Reply | None]:
    """MAIL, each RCPT, DATA: every recipient ends with the reply that decided its fate.

    Not aiosmtplib's ``sendmail()``: when DATA fails after some RCPTs were refused, it raises
    the DATA reply alone, and a recipient refused at RCPT for now (451) would be bounced with
    the others' 550, or one refused for good (550) deferred with their 451. Returns the
    per-recipient replies and the DATA reply (None when DATA was not reached). After a 421
    the server is gone: the recipients not yet answered get that 421.
    """
    if client.supports_extension("size"):
        options = [f"SIZE={transaction.size}", *options]
    await client.mail(transaction.sender, options=options)
    refused: dict[str, Reply] = {}
    for address in transaction.recipients:
        try:
            await client.rcpt(address)
        except aiosmtplib.SMTPRecipientRefused as error:
            refused[address] = Reply(error.code, error.message)
            if error.code == 421:  # the server closed: the others were not tried
                closing = refused[address]
                return [refused.get(other, closing) for other in transaction.recipients], None
    if len(refused) == len(transaction.recipients):
        await _reset(client)
        return [refused[address] for address in transaction.recipients], None
    try:
        response = await send_data(client, transaction.text, client.timeout)
        data_reply = Reply(response.code, response.message)
    except aiosmtplib.SMTPResponseException as error:
        data_reply = Reply(error.code, error.message)
        if error.code != 421:
            await _reset(client)
    return [refused.get(address, data_reply) for address in transaction.recipients], data_reply


async def _reset(client: aiosmtplib.SMTP) -> None:
    """RSET after a failed transaction, so the kept connection is clean for the next one.

    If that fails the connection is dropped (the next send reconnects); the replies already
    given stand either way.
    """
    try:
        await client.rset()
    except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
        client.close()


class CaptureConnection:
    """``upstream.kind: capture``: writes ``<id>.eml`` and ``<id>.json`` (the envelope) to a folder.

    The demo's upstream, and a way to see exactly what would have gone to SendCloud.
    """

    def __init__(self, upstream: Upstream, account: Account, key: Key):
        self._folder = upstream.path
        self._account = account
        self.key = key
        self.relay = f"capture[{upstream.path}]"

    async def send(self, transaction: Transaction) -> Result:
        name = f"{transaction.queue_id}-{time.time_ns()}"
        envelope = {
            "queue_id": transaction.queue_id,
            "api_user": self._account.api_user,
            "label": self.key.label,
            "mail_from": transaction.sender,
            "rcpt_to": transaction.recipients,
        }
        try:
            await asyncio.to_thread(self._folder.mkdir, parents=True, exist_ok=True)
            await _write_durably(self._folder / f"{name}.eml", transaction.text)
            await _write_durably(self._folder / f"{name}.json", _once(json.dumps(envelope, indent=2).encode()))
        except OSError as error:
            return Result([Reply(None, f"capture to {self._folder}: {error.strerror}")] * len(transaction.recipients), None, self.relay)
        except BodyGone:
            return Result([Reply(None, "message deleted from the queue while it was captured")] * len(transaction.recipients), None, self.relay)
        return Result([Reply(250, f"2.0.0 Ok: captured as {name}.eml")] * len(transaction.recipients), None, self.relay)

    async def close(self) -> None:
        return None


async def _write_durably(path: Path, pieces: AsyncIterator[bytes]) -> None:
    """Write the pieces to a temporary file in a thread each, fsync it, then move it in place."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    out = await asyncio.to_thread(open, tmp, "wb")
    try:
        try:
            async for piece in pieces:
                await asyncio.to_thread(out.write, piece)
            await asyncio.to_thread(_sync, out)
        finally:
            await asyncio.to_thread(out.close)
    except BaseException:
        await asyncio.to_thread(tmp.unlink, missing_ok=True)
        raise
    await asyncio.to_thread(os.replace, tmp, path)


def _sync(out) -> None:
    out.flush()
    os.fsync(out.fileno())


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _describe(error: BaseException) -> str:
    if isinstance(error, asyncio.TimeoutError):
        return "timed out"
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def open_connection(upstream: Upstream, account: Account, key: Key, local_hostname: str, tls: TLSContexts | None):
    """A connection of the configured kind for one key of an account's pool."""
    if upstream.kind == "capture":
        return CaptureConnection(upstream, account, key)
    assert tls is not None, "network upstreams need TLS contexts"
    return Connection(upstream, account, key, local_hostname, tls)


class AccountPool:
    """One account's kept connections by key, at most ``size`` open.

    Each of the account's ``size`` workers holds at most one connection at a time, so only
    idle ones need limiting: when a key needs a new connection and the account is at its
    limit, the longest idle connection of another key is closed first.
    """

    def __init__(self, size: int, factory: Callable[[Key], Connection | CaptureConnection]):
        self._size = size
        self._factory = factory
        self._idle: list = []  # oldest first
        self._busy = 0

    async def acquire(self, key: Key):
        self._busy += 1
        for connection in reversed(self._idle):
            if connection.key == key:
                self._idle.remove(connection)
                return connection
        if self._idle and self._busy + len(self._idle) > self._size:
            await self._idle.pop(0).close()
        return self._factory(key)

    def release(self, connection) -> None:
        self._busy -= 1
        self._idle.append(connection)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.close()
