"""What Postfix's cleanup does to every message: trace, missing headers, headers to drop."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from email.utils import format_datetime

from relay.rewrite.fields import Field, Message, raw_field

# Postfix's message_drop_headers (bcc, content-length, resent-bcc, return-path), plus the
# headers only the relay may set: a client must not forge the IDs SendCloud's events carry.
DROPPED = ("Bcc", "Resent-Bcc", "Content-Length", "Return-Path", "SC-Custom-Relay-Id", "SC-Custom-Relay-User")


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
    text = "\r\n\t".join(lines).encode("ascii", "replace")
    return raw_field("Received", text)


def clean(message: Message, arrival: Arrival, user: str) -> None:
    """Drop what must not travel, add what is missing, stamp trace and SendCloud user headers."""
    message.remove(*DROPPED)
    if message.first("Message-ID") is None:
        stamp = arrival.when.strftime("%Y%m%d%H%M%S")
        message.fields.append(raw_field("Message-ID", f"<{stamp}.{arrival.queue_id}@{arrival.hostname}>".encode()))
    if message.first("Date") is None:
        message.fields.append(raw_field("Date", format_datetime(arrival.when).encode()))
    # SendCloud returns SC-Custom-* headers in every webhook event (userHeaders).
    message.fields.append(raw_field("SC-Custom-Relay-Id", arrival.queue_id.encode()))
    message.fields.append(raw_field("SC-Custom-Relay-User", user.encode("ascii", "replace")))
    message.fields.insert(0, received(arrival))
