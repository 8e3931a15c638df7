"""``upstream.kind: capture``: the demo's upstream, messages written as files instead of sent."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from relay.config import Account, Upstream
from relay.delivery.transport.base import Key, Result, Transaction
from relay.errors import SMTPReply
from relay.spool import BodyGone


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
            return Result([SMTPReply(None, None, f"capture to {self._folder}: {error.strerror}")] * len(transaction.recipients), None, self.relay)
        except BodyGone:
            return Result([SMTPReply(None, None, "message deleted from the queue while it was captured")] * len(transaction.recipients), None, self.relay)
        return Result([SMTPReply(250, "2.0.0", f"Ok: captured as {name}.eml")] * len(transaction.recipients), None, self.relay)

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
