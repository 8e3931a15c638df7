"""What Postfix's cleanup does to every message: trace, missing headers, headers to drop."""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from email.utils import format_datetime

from relay.rewrite.fields import Field, Message, raw_field

# Postfix's message_drop_headers (bcc, content-length, resent-bcc, return-path), plus the
# headers only the relay may set: a client must not forge the IDs SendCloud's events carry.
DROPPED = ("Bcc", "Resent-Bcc", "Content-Length", "Return-Path", "SC-Custom-Relay-Id", "SC-Custom-Relay-User")


# What may not appear inside a header line: CR, LF, NUL, the other C0 controls and DEL.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# In a field's raw bytes: a fold (CRLF before whitespace) is kept; any other CR or LF, or a NUL,
# would let a receiver (or the upstream dot-stuffer, for a bare CR) see a line of its own.
_LINE_BREAK_OR_NUL = re.compile(rb"\r\n(?=[ \t])|[\r\n\x00]")


def one_line(text: str) -> str:
    """``text`` safe inside a header line: every control character becomes ``?``.

    The listener refuses such HELO names, addresses and AUTH identities; this is the second
    defence, so that a check forgotten upstream can never write a header line of a client's
    choosing (``EHLO x\\rX-SMTPAPI: ...``).
    """
    return _CONTROL.sub("?", text)


def single_field(field: Field) -> Field:
    """``field`` with any CR, LF or NUL outside its folds and its final CRLF made ``?``."""
    value = field.raw.removesuffix(b"\r\n")
    if b"\r" not in value and b"\n" not in value and b"\x00" not in value:
        return field
    return Field(_LINE_BREAK_OR_NUL.sub(lambda match: match.group() if len(match.group()) > 1 else b"?", value) + b"\r\n")


@dataclass(frozen=True)
class Arrival:
    """How the message reached us: what the Received header records."""

    helo: str
    client_ip: str
    esmtp: bool
    tls: tuple[str, str, int] | None  # protocol version, cipher name, secret bits
    authenticated_user: str | None
    hostname: str
    queue_id: str
    recipients: tuple[str, ...]
    when: datetime.datetime


def received(arrival: Arrival) -> Field:
    """A Received header in Postfix's layout, with RFC 3848 protocol names (ESMTPSA, ...).

    No reverse DNS lookup is made (it would cost a query per message): the client shows as
    ``unknown [IP]``, as Postfix writes a client without a verified name.
    """
    lines = [f"from {arrival.helo or 'unknown'} (unknown [{arrival.client_ip}])"]
    if arrival.tls:
        version, cipher, bits = arrival.tls
        lines.append(f"(using {version} with cipher {cipher} ({bits}/{bits} bits))")
    if arrival.authenticated_user:
        lines.append(f"(Authenticated sender: {arrival.authenticated_user})")
    protocol = ("ESMTP" if arrival.esmtp else "SMTP") + ("S" if arrival.tls else "") + ("A" if arrival.authenticated_user else "")
    lines.append(f"by {arrival.hostname} (sendcloud-relay) with {protocol} id {arrival.queue_id}")
    stamp = format_datetime(arrival.when)
    lines.append(f"for <{arrival.recipients[0]}>; {stamp}" if len(arrival.recipients) == 1 else stamp)
    # Received may carry 8-bit bytes only with SMTPUTF8; a non-ASCII HELO is made safe here.
    # HELO, AUTH user and recipient come from the client: the only line breaks are the folds.
    text = "\r\n\t".join(one_line(line) for line in lines).encode("ascii", "replace")
    return raw_field("Received", text)


def clean(message: Message, arrival: Arrival, user: str) -> None:
    """Drop what must not travel, add what is missing, stamp trace and SendCloud user headers.

    Every field is made a single header field (:func:`single_field`): a From written from the
    envelope sender must not carry a second field in a quoted local part's CR.
    """
    message.fields = [single_field(field) for field in message.fields]
    message.remove(*DROPPED)
    if message.first("Message-ID") is None:
        stamp = arrival.when.strftime("%Y%m%d%H%M%S")
        message.fields.append(raw_field("Message-ID", f"<{stamp}.{arrival.queue_id}@{arrival.hostname}>".encode()))
    if message.first("Date") is None:
        message.fields.append(raw_field("Date", format_datetime(arrival.when).encode()))
    # SendCloud returns SC-Custom-* headers in every webhook event (userHeaders).
    message.fields.append(raw_field("SC-Custom-Relay-Id", arrival.queue_id.encode()))
    message.fields.append(raw_field("SC-Custom-Relay-User", one_line(user).encode("ascii", "replace")))
    message.fields.insert(0, received(arrival))
