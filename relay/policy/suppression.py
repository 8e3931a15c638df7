"""Suppression enforcement: when an entry applies, what RCPT hears, what a routed recipient gets.

The SMTP front end refuses at RCPT and delivery fails a routed recipient; both sit below the
events stage that maintains the list (``relay.events.suppression``), so the decisions they
share live here, with :class:`SuppressionCache`, the snapshot of the list they read: a
blocking spool read per RCPT would stall the event loop, and the list changes rarely.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo

from relay.errors import SMTPReply

log = logging.getLogger("relay.suppression")

CHANNELS = frozenset({"trigger", "batch"})

REASONS = ("invalid", "report_spam", "unsubscribe", "manual")


@dataclass(frozen=True)
class Entry:
    address: str  # normalised (see normalise_address)
    reason: str  # one of REASONS
    channels: frozenset[str]
    account: str | None  # None: relay-wide (every account of those channels)
    added_at: float
    expires_at: float | None = None
    source: str | None = None  # the account whose event added it (informative; not the scope)


def normalise_address(addr: str) -> str:
    """The form addresses are stored and looked up in: trimmed, without ``<>``, lowercased.

    The local part is lowercased too, though RFC 5321 lets it be case-sensitive: SendCloud
    treats addresses case-insensitively, so its events may name ``Foo@x`` for mail sent to
    ``foo@x``, and no real mailbox distinguishes the two. Erring this way can only withhold
    mail from someone who asked not to get it. A trailing dot of the domain is dropped.
    """
    addr = addr.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1].strip()
    local, at, domain = addr.rpartition("@")
    if not at:
        return addr.lower()
    return f"{local.lower()}@{domain.lower().rstrip('.')}"


def applies(entry: Entry, channel: str, account: str | None, now: float) -> bool:
    """Whether ``entry`` stops mail on ``channel`` through ``account`` at ``now``.

    An entry expires at ``expires_at`` (from then on it no longer applies).
    """
    if entry.expires_at is not None and now >= entry.expires_at:
        return False
    if channel not in entry.channels:
        return False
    return entry.account is None or entry.account == account


def _named(entries: Iterable[Entry]) -> Entry | None:
    """The entry a refusal names: the most recently added; ties by reason, then account.

    The most recent reason is the one the sender can act on ("unsubscribed last week" rather
    than "bounced two years ago"), and the tie-break makes the reply independent of the
    order the store returns entries in.
    """
    return max(entries, key=lambda e: (e.added_at, e.reason, e.account or ""), default=None)


def _reply(entry: Entry, address: str | None, tz: tzinfo) -> SMTPReply:
    day = datetime.fromtimestamp(entry.added_at, tz).strftime("%Y-%m-%d")
    return SMTPReply(550, "5.1.1", f"<{address or entry.address}>: suppressed ({entry.reason} {day})")


def rcpt_refusal(
    entries: Iterable[Entry],
    user_channels: Mapping[str, str],
    now: float,
    address: str | None = None,
    tz: tzinfo = timezone.utc,
) -> SMTPReply | None:
    """The RCPT reply when the address is suppressed for every channel the user has, else None.

    ``entries`` are the address's entries, ``user_channels`` maps channel → account. The
    channel a message takes is only known after DATA, so RCPT refuses only when no channel
    could carry it. The reply names one of the entries that apply (see ``_named``); ``address``
    is the address as the client wrote it (else the entry's), the date is ``tz``'s (UTC).
    """
    entries = list(entries)
    if not user_channels:
        return None
    applying: list[Entry] = []
    for channel, account in user_channels.items():
        found = [entry for entry in entries if applies(entry, channel, account, now)]
        if not found:
            return None
        applying.extend(found)
    return _reply(_named(applying), address, tz)


def routed_refusal(
    entries: Iterable[Entry],
    channel: str,
    account: str,
    now: float,
    address: str | None = None,
    tz: tzinfo = timezone.utc,
) -> SMTPReply | None:
    """The failure for a recipient suppressed for the channel and account the message was
    routed to (after DATA: the recipient is failed at once and a DSN tells the sender)."""
    named = _named(entry for entry in entries if applies(entry, channel, account, now))
    return _reply(named, address, tz) if named is not None else None


# A stored entry as the spool keeps it: Entry's fields in order (the spool sits below policy).
EntryRow = tuple[str, str, frozenset[str], str | None, float, float | None, str | None]


class SuppressionCache:
    """The suppression list in memory, refreshed from the spool in the background.

    ``version`` is a cheap read (a counter the spool bumps on every change) and ``entries``
    the whole list, read only when the version moved: a running relay sees a change within
    ``interval`` seconds, and an idle list costs one tiny query per interval. Until the first
    read the cache is empty, so mail is never refused on a list it could not read.
    """

    def __init__(
        self,
        version: Callable[[], Awaitable[int]],
        entries: Callable[[], Awaitable[list[EntryRow]]],
        interval: float = 1.0,
    ):
        self._version = version
        self._entries = entries
        self.interval = interval
        self._by_address: dict[str, list[Entry]] = {}
        self._seen: int | None = None
        self._task: asyncio.Task | None = None

    async def refresh(self) -> None:
        version = await self._version()
        if version == self._seen:
            return
        by_address: dict[str, list[Entry]] = {}
        for row in await self._entries():
            entry = Entry(*row)
            by_address.setdefault(entry.address, []).append(entry)
        self._by_address, self._seen = by_address, version

    def start(self) -> None:
        self._task = asyncio.create_task(self._refresh_forever(), name="suppression-cache")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep the last snapshot; the next try may work
                log.exception("could not read the suppression list; keeping the last one read")
            await asyncio.sleep(self.interval)

    def entries_for(self, address: str) -> list[Entry]:
        return self._by_address.get(normalise_address(address), [])

    def rcpt_refusal(
        self, address: str, user_channels: Mapping[str, str], now: float | None = None
    ) -> SMTPReply | None:
        return rcpt_refusal(self.entries_for(address), user_channels, time.time() if now is None else now, address)

    def routed_refusal(self, address: str, channel: str, account: str, now: float | None = None) -> SMTPReply | None:
        return routed_refusal(self.entries_for(address), channel, account, time.time() if now is None else now, address)
