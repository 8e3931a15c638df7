"""Changes made to a message's bytes before it is spooled (Postfix's ``cleanup``).

:func:`rewrite_message` runs the stages in order: hygiene (:mod:`.hygiene`), the sender mode
(:mod:`.sender`), the subject marker (:mod:`.marker`) and X-SMTPAPI (:mod:`relay.rewrite.xsmtpapi`),
all editing raw header fields (:mod:`.fields`).
"""

from __future__ import annotations

import email.policy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.parser import BytesHeaderParser

from relay.errors import SMTPReply
from relay.lines import header_block
from relay.rewrite import xsmtpapi
from relay.rewrite.fields import Message, mailbox_addresses, raw_field
from relay.rewrite.hygiene import Arrival, clean
from relay.rewrite.marker import add_marker
from relay.rewrite.sender import apply_sender_mode
from relay.routing import Options


def header_reader(data: bytes) -> Callable[[str], str | None]:
    """A ``header(name)`` lookup that parses the header block only if something asks."""
    parsed = None

    def header(name: str) -> str | None:
        nonlocal parsed
        if parsed is None:
            parsed = BytesHeaderParser(policy=email.policy.default).parsebytes(header_block(data))
        value = parsed.get(name)
        return None if value is None else str(value)

    return header


@dataclass(frozen=True)
class Rewritten:
    pieces: tuple[bytes, memoryview]  # the new header section, then a view of the body as received
    mail_from: str  # the upstream envelope sender the sender mode chose
    from_domain: str | None  # the header From's domain after rewriting: the DKIM signing domain


def rewrite_message(
    data: bytes,
    *,
    options: Options,
    account_domain: str,
    ad_marker_text: str,
    envelope_sender: str,
    recipients: Sequence[str],
    user: str,
    arrival: Arrival,
) -> Rewritten:
    """Everything done to a message between DATA and the spool, on its bytes; SMTPReply to refuse it.

    Only the fields that must change are rebuilt: the body and every other header pass byte
    for byte. X-SMTPAPI is written last, as SendCloud requires.
    """
    message = Message(data)
    froms = message.all("From")
    if len(froms) > 1:
        raise SMTPReply(554, "5.6.0", f"Message has {len(froms)} From headers; RFC 5322 allows exactly one")
    if not froms and envelope_sender:  # as Postfix's cleanup: the envelope sender fills a missing From
        message.fields.append(raw_field("From", envelope_sender.encode("ascii")))
    clean(message, arrival, user)
    mail_from = apply_sender_mode(message, options.sender_mode, options.from_local, account_domain, envelope_sender)
    if options.ad_marker:
        add_marker(message, options.ad_marker, ad_marker_text)
    xsmtpapi.apply(message, options.tracking, recipients)
    from_field = message.first("From")
    addresses = mailbox_addresses(from_field) if from_field is not None else ()
    from_domain = addresses[0].domain if len(addresses) == 1 and addresses[0].domain else None
    return Rewritten(message.pieces(), mail_from, from_domain)
