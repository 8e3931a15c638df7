"""Between DATA and the spool: route, rewrite, sign — the one call the listener makes.

Routing and rewriting are pure and fast (they touch headers only); DKIM signing, the one
CPU-heavy step, runs in :class:`relay.rewrite.dkim.Signer`'s process pool.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Sequence
from dataclasses import dataclass

from relay.config import Config
from relay.lines import normalise_line_endings
from relay.rewrite.dkim import Signer, signing_domain
from relay.rewrite.hygiene import Arrival
from relay.rewrite.long_lines import fit_line_length, has_long_line
from relay.rewrite.message import header_reader, rewrite_message
from relay.routing import Envelope, Route, choose_route


@dataclass(frozen=True)
class Submission:
    """One DATA as the listener saw it."""

    user: str
    listener: str
    sender: str  # "" for the null sender
    recipients: Sequence[str]
    data: bytes | bytearray  # the listener's receive buffer, cleared by it once prepared
    helo: str
    client_ip: str
    esmtp: bool
    tls: tuple[str, str, int] | None
    authenticated_user: str | None


@dataclass(frozen=True)
class Prepared:
    route: Route
    body: tuple[bytes | memoryview, ...]  # new header fields, then a view of the received body: never joined
    mail_from: str  # upstream envelope sender

    def holds(self, buffer: bytes | bytearray) -> bool:
        """Whether the pieces are views of ``buffer``, which must then live until they are spooled."""
        return any(isinstance(piece, memoryview) and piece.obj is buffer for piece in self.body)


class Preparer:
    def __init__(self) -> None:
        self.signer = Signer()

    async def prepare(self, config: Config, submission: Submission, queue_id: str, now: float) -> Prepared:
        """The message as it will be spooled; raises SMTPReply when it must be refused."""
        data = normalise_line_endings(submission.data)
        route = choose_route(
            config,
            Envelope(submission.user, submission.listener, submission.sender, submission.recipients),
            header_reader(data),
        )
        arrival = Arrival(
            helo=submission.helo,
            client_ip=submission.client_ip,
            esmtp=submission.esmtp,
            tls=submission.tls,
            authenticated_user=submission.authenticated_user,
            hostname=config.server.hostname,
            queue_id=queue_id,
            recipients=tuple(submission.recipients),
            when=datetime.datetime.fromtimestamp(now).astimezone(),
        )
        rewritten = rewrite_message(
            data,
            options=route.options,
            account_domain=config.accounts[route.account].domain,
            ad_marker_text=config.ad_marker_text,
            envelope_sender=submission.sender,
            recipients=submission.recipients,
            user=submission.user,
            arrival=arrival,
        )
        body: tuple[bytes | memoryview, ...] = rewritten.pieces
        if has_line_over_limit(data, body):  # rare; re-encoding a large part takes up to ~1 s: off the loop
            body = await asyncio.to_thread(within_line_length, data, body)
        domain = signing_domain(config.dkim, rewritten.from_domain) if rewritten.from_domain else None
        if domain is not None:
            body = (await self.signer.sign(body, domain, config.dkim[domain]), *body)
        return Prepared(route, body, rewritten.mail_from)

    def close(self) -> None:
        self.signer.close()


def has_line_over_limit(data: bytes | bytearray, pieces: tuple[bytes | memoryview, ...]) -> bool:
    """Whether the rewritten message has a line over 998: in its new header, or in the body,
    which is a suffix of ``data`` (searched there, without copying the view)."""
    return has_long_line(pieces[0]) or has_long_line(data)


def within_line_length(data: bytes | bytearray, pieces: tuple[bytes | memoryview, ...]) -> tuple[bytes | memoryview, ...]:
    """The rewritten message (``pieces``: new header, a view of ``data``'s body) with no line over 998.

    Nearly every message has none: then the pieces are returned as they are, never joined or
    copied. The body is a suffix of ``data``, so a long line in it is one in ``data``, where
    :func:`has_long_line` can look without copying the view; only then is the message joined.
    """
    if not has_line_over_limit(data, pieces):
        return pieces
    joined = b"".join(pieces)
    fitted = fit_line_length(joined)
    return pieces if fitted is joined else (fitted,)
