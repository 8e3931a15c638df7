"""The upstream hop: one SMTP transaction at a time on connections that are kept and reused.

A connection is bound to a :class:`Key`: the SendCloud label it logged in with (the login is
``api_user#label``, so a connection without a label cannot carry labelled mail) and the TLS
policy it was opened under. :class:`AccountPool` keeps each account's connections by key,
never more than ``upstream.connections_per_account`` open. ``send`` never raises for what
the upstream says: it returns one :class:`~relay.errors.SMTPReply` per recipient, and
connection-level failures become replies without a code (temporary), as Postfix's
``status=deferred (connect to ...)``.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass

from relay.config import TLSPolicy
from relay.errors import SMTPReply


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
    replies: list[SMTPReply]  # one per recipient, in order
    upstream_id: str | None  # SendCloud's messageId, when it gave one
    relay: str  # where it went, for the log line
    unreachable: bool = False  # no connection could be made (refused, timed out, TLS handshake, DNS): nothing was sent
