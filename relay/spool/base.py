"""The Spool protocol: everything the rest of the relay may ask of a spool, whatever its backend.

The SMTP side stores, delivery claims due work, reads bodies in chunks and records outcomes,
the admin endpoint and the CLI list, show, retry, delete and flush; rate budgets are kept
beside the queue. :class:`relay.spool.sqlite.SqliteSpool` is the embedded backend and
:class:`relay.spool.memory.MemorySpool` the one unit tests use; nothing outside
``relay.spool`` names either, their files, threads or exceptions (:class:`BodyGone` is the
one exception a caller handles, and it lives here).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from relay.spool.events_base import EventStore
from relay.spool.events_model import NO_ROWS, OutcomeRows
from relay.spool.model import NewMessage, QueuedMessage, RecipientUpdate, State

WindowKey = tuple[str, float, int]  # a rate window: (counter key, period in seconds, window number)
Cursor = tuple[float, str]  # where a walk of due mail resumes: (next_attempt, message ID)


def due_key(message: QueuedMessage, after: Cursor | None = None) -> Cursor:
    """Where ``message`` sorts in :meth:`Spool.due` (called with ``after``): its first due
    recipient after the cursor. The key of a page's last message is the next page's ``after``."""
    return min((r.next_attempt, message.id) for r in message.recipients if after is None or (r.next_attempt, message.id) > after)


class SpoolMissing(Exception):
    """There is no spool where the settings say (opened with ``create=False``: the operator's commands)."""


class SchemaMismatch(Exception):
    """A shared spool's schema is not the one this relay was written for (the message says what to do)."""


class BodyGone(Exception):
    """The message was deleted (``queue delete``) while its body was being read."""


@dataclass(frozen=True)
class ListQuery:
    """What `queue list` and ``/api/queue`` ask for: filters, then a page in queue-ID (arrival) order.

    Without ``include_final`` only messages with a recipient still waiting are listed; a
    ``state`` that is final (delivered, failed) looks at every message, as ``--all`` does.
    """

    include_final: bool = False
    user: str | None = None
    to: str | None = None  # a recipient's address, compared without regard to case
    state: State | None = None  # a message with at least one recipient in this state
    since: float | None = None  # received at or after
    before: float | None = None  # received before
    sender: str | None = None  # the envelope sender, compared without regard to case
    status: str | None = None  # a recipient with this SendCloud status (requested, delivered, soft_bounce, invalid)
    email_id: str | None = None  # the message with a recipient of this SendCloud emailId
    after: str | None = None  # the cursor: queue IDs after this one
    limit: int | None = None

    @property
    def pending_only(self) -> bool:
        return not self.include_final and (self.state is None or not self.state.final)

    def matches(self, message: QueuedMessage, statuses: Collection[str] = ()) -> bool:
        """Whether ``message`` (with all its recipients, whose SendCloud ``statuses`` the events
        store knows) passes the filters; the reference for every backend."""
        states = {recipient.state for recipient in message.recipients}
        return (
            (not self.pending_only or any(not state.final for state in states))
            and (self.user is None or message.user == self.user)
            and (self.to is None or any(r.address.lower() == self.to.lower() for r in message.recipients))
            and (self.state is None or self.state in states)
            and (self.since is None or message.received_at >= self.since)
            and (self.before is None or message.received_at < self.before)
            and (self.sender is None or message.sender.lower() == self.sender.lower())
            and (self.after is None or message.id > self.after)
            and (self.status is None or self.status in statuses)
            and (self.email_id is None or any(r.email_id == self.email_id for r in message.recipients))
        )


PENDING_MESSAGES = ListQuery()  # `queue list` without options


class Spool(EventStore, Protocol):
    """A durable queue: a write returns only once it is committed (fsynced)."""

    commits: int  # durable commits so far (each an fsync for SQLite): what bench/ divides by messages
    operations: int  # writes those commits carried

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    # -- intake ----------------------------------------------------------------------------------

    async def store(self, message: NewMessage) -> None:
        """The message and its recipients, durably; raises when it is not on disk."""

    @property
    def spill_directory(self) -> Path:
        """Where a body too large to hold in memory may wait in a temporary file before ``store``."""

    # -- delivery ---------------------------------------------------------------------------------

    async def due(self, now: float, limit: int, accounts: Collection[str], after: Cursor | None = None) -> list[QueuedMessage]:
        """Up to ``limit`` *messages* of ``accounts`` with a recipient due by ``now``, earliest due
        first, each carrying *all* its recipients due by ``now`` (the limit never cuts a message
        apart, so its deferred recipients go upstream together).

        Messages sort by :func:`due_key`: (next_attempt, queue ID) of their first due recipient;
        with ``after``, only recipients whose key sorts after it choose and order the messages
        (the next page; a message chosen carries its other due recipients all the same). Mail of
        an account no longer configured never stands in front of the rest. The work is the page,
        not the queue (a million pending recipients must not slow it down).
        """

    async def stranded(self, now: float, limit: int, accounts: Collection[str], after: Cursor | None = None) -> list[QueuedMessage]:
        """As :meth:`due`, for the accounts *not* in ``accounts`` (removed or renamed ones)."""

    async def start(self, message_id: str) -> tuple[bytes, int] | None:
        """A body's first bytes, through the end of its header section, and its size; None if gone or final."""

    def chunks(self, message_id: str, offset: int, size: int) -> AsyncIterator[bytes]:
        """The body from ``offset`` on, a chunk at a time; :class:`BodyGone` if it is deleted meanwhile
        (a backend may read one chunk ahead, so the chunk after the delete may still come)."""

    async def record(self, updates: list[RecipientUpdate], new_messages: Iterable[NewMessage] = (),
                     rows: OutcomeRows = NO_ROWS) -> set[str]:
        """Delivery outcomes and the DSNs they caused, in one durable write, with the events
        stage's ``rows`` for them. The rows go in a savepoint of their own: if they fail, the
        error is logged and the outcome recorded without them (a lost count must never fail a
        known outcome, which would send the message again).

        Returns the messages whose outcomes were refused because this node no longer holds
        their lease (another node took them over: theirs is the outcome that counts); with
        such a message in ``updates`` the DSNs are not stored either. One node: always empty.
        """

    # -- leases: which node delivers a message, when several share the spool ------------------------

    async def renew(self, message_ids: Collection[str]) -> set[str]:
        """Extend this node's leases on these messages; the ones it no longer holds."""

    async def release(self, message_ids: Collection[str]) -> None:
        """Give these leases back (at stop), so another node may take the messages at once."""

    async def wait_for_work(self, timeout: float) -> bool:
        """Sleep up to ``timeout``; earlier when another process says there is work (a flush, a
        release): then True, and the caller looks behind its walk of due mail too."""

    async def purge_final(self, older_than: float) -> int:
        """Forget messages whose recipients are all final and that arrived before ``older_than``."""

    # -- operators ---------------------------------------------------------------------------------

    async def list(self, query: ListQuery = PENDING_MESSAGES) -> list[QueuedMessage]:
        """The messages ``query`` selects, each with all its recipients, in queue-ID order."""

    async def get(self, message_id: str) -> QueuedMessage | None: ...

    async def counts(self) -> dict[str, int]:
        """Recipients by state."""

    async def pending_summary(self) -> tuple[int, dict[str, int], float | None]:
        """Messages not final, recipients waiting by state, arrival of the oldest waiting message."""

    async def retry(self, message_id: str | None = None) -> int:
        """Make pending recipients due now (one message, or every deferred one: ``flush``); how many."""

    async def delete(self, message_id: str) -> bool: ...

    async def probe(self, now: float) -> None:
        """A real durable write, for /readyz."""

    def unavailable(self) -> str | None:
        """Why the spool cannot take writes now, known without trying one (None: no known reason)."""


class RateStore(Protocol):
    """Rate-limit windows kept beside the queue, shared by every process (and node) on one spool."""

    async def save(self, increments: Mapping[WindowKey, int] | Counter[WindowKey], now: float) -> dict[WindowKey, int]:
        """Add ``increments`` to the stored counts, forget windows no rate can still see, return them all."""

    async def close(self) -> None: ...
