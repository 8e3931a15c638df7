"""Delivery status notifications (RFC 3464) for recipients that failed for good.

The DSN is an ordinary spooled message from the null sender, so it survives restarts and is
retried like any other; a failed DSN is never answered with another one (its sender is null).
"""

from __future__ import annotations

import email.utils
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class FailedRecipient:
    address: str
    reply: str  # the last reply, as recorded in the spool
    status: str  # its RFC 3463 status (relay.delivery.retry.after_attempt decided it)


def build_dsn(
    *,
    queue_id: str,
    original_sender: str,
    recipients: Sequence[FailedRecipient],
    original_headers: bytes,
    reporting_mta: str,
    from_domain: str,
    arrival: float,
    now: float,
) -> bytes:
    """A multipart/report DSN as CRLF bytes, ready to spool.

    Every value written into it is made one line first (:func:`_one_line`): addresses and
    replies come from clients and upstreams, and a CR, LF or NUL in one must never start a
    header line of its own, even if the check at MAIL/RCPT time was missed.
    """
    queue_id, original_sender, reporting_mta, from_domain = map(
        _one_line, (queue_id, original_sender, reporting_mta, from_domain)
    )
    recipients = [FailedRecipient(_one_line(r.address), r.reply, r.status) for r in recipients]
    boundary = f"{queue_id}.{secrets.token_hex(8)}/{reporting_mta}"
    listing = "\r\n".join(f"<{r.address}>: {_one_line(r.reply)}" for r in recipients)
    per_recipient = "\r\n\r\n".join(
        f"Final-Recipient: rfc822; {r.address}\r\n"
        f"Original-Recipient: rfc822; {r.address}\r\n"
        f"Action: failed\r\n"
        f"Status: {r.status}\r\n"
        f"Diagnostic-Code: smtp; {_one_line(r.reply)}"
        for r in recipients
    )
    text = (
        f"This is the mail system at host {reporting_mta}.\r\n\r\n"
        "I'm sorry to have to inform you that your message could not\r\n"
        "be delivered to one or more recipients. It's attached below.\r\n\r\n"
        f"{listing}\r\n"
    )
    return (
        f"From: Mail Delivery System <MAILER-DAEMON@{from_domain}>\r\n"
        f"To: <{original_sender}>\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {email.utils.formatdate(now)}\r\n"
        f"Message-ID: <{queue_id}.dsn.{secrets.token_hex(6)}@{reporting_mta}>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"\r\n'
        "\r\n"
        "This is a MIME-encapsulated message.\r\n\r\n"
        f"--{boundary}\r\n"
        "Content-Description: Notification\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        f"{text}\r\n"
        f"--{boundary}\r\n"
        "Content-Description: Delivery report\r\n"
        "Content-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; {reporting_mta}\r\n"
        f"X-Relay-Queue-ID: {queue_id}\r\n"
        f"Arrival-Date: {email.utils.formatdate(arrival)}\r\n\r\n"
        f"{per_recipient}\r\n\r\n"
        f"--{boundary}\r\n"
        "Content-Description: Undelivered Message Headers\r\n"
        "Content-Type: text/rfc822-headers\r\n\r\n"
    ).encode() + original_headers.rstrip(b"\r\n") + f"\r\n\r\n--{boundary}--\r\n".encode()


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _one_line(text: str) -> str:
    """Whitespace runs (line breaks included) as one space, any other control character as ``?``."""
    return _CONTROL.sub("?", " ".join(text.split()))
