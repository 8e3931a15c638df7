"""SendCloud's reply conventions (see docs/sendcloud.md): pure parsing, no I/O."""

from __future__ import annotations

import re
from collections.abc import Sequence

_QUEUED = re.compile(r"#([^#\s]+)#Queued")


def queued_message_id(reply_text: str) -> str | None:
    """The messageId in SendCloud's DATA reply ``250 #<messageId>#Queued``."""
    match = _QUEUED.search(reply_text)
    return match.group(1) if match else None


def email_ids(message_id: str, recipients: Sequence[str]) -> list[str]:
    """Per-recipient emailIds: messageId + zero-based RCPT index + ``$`` + address.

    The index counts every RCPT of the upstream transaction in order, which is how SendCloud
    numbers them; these are the IDs its webhook events name.
    """
    return [f"{message_id}{index}${address}" for index, address in enumerate(recipients)]
