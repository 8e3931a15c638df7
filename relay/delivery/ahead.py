"""What the poller takes ahead of its walk of due mail: pure decisions, tested as tables.

The poller walks due mail with a cursor (:func:`relay.spool.due_key`), so during a drain it reads
each message once instead of at every poll. Mail made due behind that cursor would wait for the
walk to wrap: an operator's `queue retry` / `queue flush` (``Spool.retry`` sets next_attempt 0,
which sorts before every real time) and, on PostgreSQL, messages another node gave back (its
NOTIFY wakes the poller). Postfix's ``postqueue -i`` / ``-f`` moves such mail to the incoming
queue at once; here a second, short walk from the earliest reads it at the next poll and hands
it to the workers with new mail.
"""

from __future__ import annotations

from bisect import bisect_right

from relay.spool import Cursor

RETRIED: Cursor = (0.0, "\U0010ffff")  # every key (0, queue ID) sorts at or before it: mail made due now by Spool.retry
PEEK = 16  # messages in the first page of a walk ahead: at most every poll, so it must cost next to nothing


def ahead_until(walk: Cursor | None, woken: bool) -> Cursor:
    """How far a walk ahead reads: the operator's retries always; after another process announced
    work (a node released its messages), also everything the walk has passed. With the walk at
    its start (``walk`` None) it will meet that mail itself."""
    if woken and walk is not None and walk > RETRIED:
        return walk
    return RETRIED


def taken_ahead(keys: list[Cursor], until: Cursor, asked: int) -> tuple[int, bool]:
    """Of a page of ``asked`` messages (their due keys, in order), how many lie ahead (at or before
    ``until``), and whether the walk ahead is done: it met a message past ``until``, or the page
    was short (nothing more is due)."""
    ahead = bisect_right(keys, until)
    return ahead, ahead < len(keys) or len(keys) < asked


def walk_again(held: int, page: int, now: float, again_at: float) -> bool:
    """Whether a walk that reached its end starts again from the earliest at this poll. Starting
    again passes every message of it still held in memory (read again, skipped), so: at once when
    they fit in a ``page``, else once ``again_at`` has come (a drain holding thousands)."""
    return held < page or now >= again_at
