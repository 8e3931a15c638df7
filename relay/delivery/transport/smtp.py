"""The SMTP upstream: kept aiosmtplib connections, one transaction at a time, every reply per recipient."""

from __future__ import annotations

import asyncio
import logging
import time

import aiosmtplib

from relay.config import Account, Upstream
from relay.delivery.sendcloud import queued_message_id
from relay.delivery.transport.base import (
    Key,
    Result,
    TLSContexts,
    TLSRequired,
    Transaction,
)
from relay.delivery.transport.data import send_data, send_pipelined
from relay.errors import SMTPReply
from relay.spool import BodyGone

log = logging.getLogger("relay.delivery")

_IDLE_CHECK = 15.0  # seconds idle after which a kept connection is probed with NOOP


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
            return self._all(transaction, SMTPReply(None, None, str(error)))
        except aiosmtplib.SMTPResponseException as error:  # e.g. 535 for a wrong api_key
            await self.close()
            return self._all(transaction, SMTPReply(None, None, f"upstream refused login or greeting: {error.code} {error.message}"))
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as error:
            await self.close()
            reply = SMTPReply(None, None, f"connect to {self.relay}: {_describe(error)}")
            return Result([reply] * len(transaction.recipients), None, self.relay, unreachable=True)
        options = []
        if transaction.eight_bit:
            if not client.supports_extension("8BITMIME"):
                return self._all(transaction, SMTPReply(554, "5.6.3", f"{self.relay} does not offer 8BITMIME for this 8-bit message"))
            options.append("BODY=8BITMIME")
        try:
            replies, data_reply = await _transact(client, transaction, options, self._upstream.data_timeout)
        except aiosmtplib.SMTPResponseException as error:  # MAIL refused
            if error.code == 421:
                await self.close()
            return self._all(transaction, SMTPReply.received(error.code, error.message))
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as error:
            await self.close()
            return self._all(transaction, SMTPReply(None, None, f"lost connection with {self.relay}: {_describe(error)}"))
        except BodyGone:  # `queue delete` during DATA: the connection was closed before the final dot
            await self.close()
            return self._all(transaction, SMTPReply(None, None, "message deleted from the queue while it was sent; not delivered"))
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
            except (TimeoutError, aiosmtplib.SMTPException, OSError):
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
        except (TimeoutError, aiosmtplib.SMTPException, OSError):
            client.close()

    def _all(self, transaction: Transaction, reply: SMTPReply) -> Result:
        return Result([reply] * len(transaction.recipients), None, self.relay)


async def _transact(client: aiosmtplib.SMTP, transaction: Transaction, options: list[str],
                    data_timeout: float) -> tuple[list[SMTPReply], SMTPReply | None]:
    """MAIL, each RCPT, DATA: every recipient ends with the reply that decided its fate.

    Not aiosmtplib's ``sendmail()``: when DATA fails after some RCPTs were refused, it raises
    the DATA reply alone, and a recipient refused at RCPT for now (451) would be bounced with
    the others' 550, or one refused for good (550) deferred with their 451. Returns the
    per-recipient replies and the DATA reply (None when DATA was not reached). After a 421
    the server is gone: the recipients not yet answered get that 421.
    """
    if client.supports_extension("size"):
        options = [f"SIZE={transaction.size}", *options]
    if client.supports_extension("pipelining"):
        return await _pipelined(client, transaction, options, data_timeout)
    await client.mail(transaction.sender, options=options)
    refused: dict[str, SMTPReply] = {}
    for address in transaction.recipients:
        try:
            await client.rcpt(address)
        except aiosmtplib.SMTPRecipientRefused as error:
            refused[address] = SMTPReply.received(error.code, error.message)
            if error.code == 421:  # the server closed: the others were not tried
                closing = refused[address]
                return [refused.get(other, closing) for other in transaction.recipients], None
    if len(refused) == len(transaction.recipients):
        await _reset(client)
        return [refused[address] for address in transaction.recipients], None
    try:
        response = await send_data(client, transaction.text, client.timeout, data_timeout)
        data_reply = SMTPReply.received(response.code, response.message)
    except aiosmtplib.SMTPResponseException as error:
        data_reply = SMTPReply.received(error.code, error.message)
        if error.code != 421:
            await _reset(client)
    return [refused.get(address, data_reply) for address in transaction.recipients], data_reply


async def _pipelined(client: aiosmtplib.SMTP, transaction: Transaction, options: list[str],
                     data_timeout: float) -> tuple[list[SMTPReply], SMTPReply | None]:
    """As :func:`_transact`, with MAIL, the RCPTs and DATA in one write (the upstream offers
    PIPELINING): one round trip instead of two plus one per recipient."""
    sent = await send_pipelined(client, transaction.sender, options, transaction.recipients, transaction.text,
                                client.timeout, data_timeout)
    if sent.mail.code != 250:
        raise aiosmtplib.SMTPSenderRefused(sent.mail.code, sent.mail.message, transaction.sender)
    refused = {
        address: SMTPReply.received(reply.code, reply.message)
        for address, reply in zip(transaction.recipients, sent.rcpts, strict=True)
        if not 200 <= reply.code < 300
    }
    if sent.data is None:  # every recipient refused (or the session closed before DATA)
        if all(reply.code != 421 for reply in refused.values()):
            await _reset(client)
        return [refused[address] for address in transaction.recipients], None
    data_reply = SMTPReply.received(sent.data.code, sent.data.message)
    if data_reply.code not in (250, 421):
        await _reset(client)
    return [refused.get(address, data_reply) for address in transaction.recipients], data_reply


async def _reset(client: aiosmtplib.SMTP) -> None:
    """RSET after a failed transaction, so the kept connection is clean for the next one.

    If that fails the connection is dropped (the next send reconnects); the replies already
    given stand either way.
    """
    try:
        await client.rset()
    except (TimeoutError, aiosmtplib.SMTPException, OSError):
        client.close()


def _describe(error: BaseException) -> str:
    if isinstance(error, asyncio.TimeoutError):
        return "timed out"
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


