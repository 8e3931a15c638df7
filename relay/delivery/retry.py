"""What happens to a recipient after an attempt: pure decisions, tested as tables."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from relay.errors import SMTPReply
from relay.spool import Recipient, RecipientUpdate, State


@dataclass(frozen=True)
class RetryPolicy:
    schedule: tuple[float, ...]  # delay after the 1st, 2nd, ... failure; the last one repeats
    jitter: float  # ± fraction applied to each delay, so deferred mail does not return in herds
    max_lifetime: float  # seconds from arrival after which a temporary failure becomes final


# SendCloud answers 536 "Frequency limited" past 20,000 calls a minute, and daily quota
# exhaustion with "Request quota exceeded" under an undocumented code: both pass with time.
# (A recipient's "mailbox quota exceeded" does not match: that one bounces.)
_TEMPORARY_DESPITE_5XX = re.compile(r"frequency limited|request quota exceeded", re.IGNORECASE)


def is_temporary(reply: SMTPReply) -> bool:
    if reply.temporary:
        return True
    return reply.code == 536 or bool(_TEMPORARY_DESPITE_5XX.search(reply.text))


# Replies about the account's sending rate or quota rather than the recipient: waiting helps
# every message of the account alike, so the scheduler pauses the account instead of spending
# each message's retries. (A recipient's "mailbox quota exceeded" is not one of them.)
_ACCOUNT_THROTTLE = re.compile(
    r"frequency limited|request quota exceeded|rate limit|too many (?:messages|requests|connections)", re.IGNORECASE
)


def is_account_throttle(reply: SMTPReply) -> bool:
    return (
        reply.code is not None
        and is_temporary(reply)
        and (reply.code == 536 or bool(_ACCOUNT_THROTTLE.search(reply.text)))
    )


def retry_delay(attempts: int, policy: RetryPolicy, random_fraction: float) -> float:
    """Delay before the next try after ``attempts`` failures; ``random_fraction`` in [0, 1)."""
    base = policy.schedule[min(attempts, len(policy.schedule)) - 1]
    return base * (1 + policy.jitter * (2 * random_fraction - 1))


def message_retry_at(attempts: Iterable[int], started: float, received_at: float, policy: RetryPolicy,
                     random_fraction: float) -> float:
    """When a message's recipients deferred in one delivery are tried again: all at the same
    time, with one jitter for the message (as Postfix's deferred queue), so they go back
    upstream together. ``attempts``: each recipient's count including this delivery; the
    fewest decides, so no recipient waits longer than its own schedule. The last try happens
    at the deadline rather than one full delay after it."""
    return min(started + retry_delay(min(attempts), policy, random_fraction), received_at + policy.max_lifetime)


def after_attempt(
    recipient: Recipient,
    reply: SMTPReply,
    received_at: float,
    now: float,
    policy: RetryPolicy,
    retry_at: float,
    email_id: str | None = None,
    held_until: float | None = None,
) -> RecipientUpdate:
    """The recipient's next state given the reply of one attempt; deferred, it is tried again
    at ``retry_at`` (:func:`message_retry_at`, the same for the whole message).

    ``held_until``: the account is paused until then (SendCloud asked it to slow down); a
    temporary failure waits for the pause to end and does not count as one of the message's
    attempts, since nothing was wrong with the message.
    """
    attempts = recipient.attempts + 1
    text = str(reply)
    if reply.code is not None and 200 <= reply.code < 300:
        return RecipientUpdate(recipient.message_id, recipient.idx, State.DELIVERED, attempts, now, text, email_id)
    if not is_temporary(reply):
        return RecipientUpdate(recipient.message_id, recipient.idx, State.FAILED, attempts, now, text,
                               dsn_status=reply.enhanced or "5.0.0")
    deadline = received_at + policy.max_lifetime
    if now >= deadline:
        expired = f"{text} (gave up: message older than the spool's max_lifetime)"
        # 4.4.7: delivery time expired, unless the last reply said more precisely why
        return RecipientUpdate(recipient.message_id, recipient.idx, State.FAILED, attempts, now, expired,
                               dsn_status=reply.enhanced or "4.4.7")
    if held_until is not None:
        held = f"{text} (account paused; not counted as an attempt)"
        return RecipientUpdate(recipient.message_id, recipient.idx, State.DEFERRED, recipient.attempts, min(held_until, deadline), held)
    return RecipientUpdate(recipient.message_id, recipient.idx, State.DEFERRED, attempts, min(retry_at, deadline), text)


def while_unconfigured(recipient: Recipient, account: str, received_at: float, now: float,
                       policy: RetryPolicy) -> RecipientUpdate:
    """A recipient whose account is no longer configured: it waits (deferred, as Postfix defers
    mail for a transport it cannot use) without spending an attempt, looked at again after the
    schedule's first delay, and fails at ``max_lifetime`` (4.4.7) so the sender gets a DSN."""
    reason = f"account {account} is not configured"
    deadline = received_at + policy.max_lifetime
    if now >= deadline:
        return RecipientUpdate(recipient.message_id, recipient.idx, State.FAILED, recipient.attempts, now,
                               f"{reason} (gave up: message older than the spool's max_lifetime)", dsn_status="4.4.7")
    return RecipientUpdate(recipient.message_id, recipient.idx, State.DEFERRED, recipient.attempts,
                           min(now + policy.schedule[0], deadline), reason)
