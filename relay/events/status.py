"""SendCloud's status per recipient, from events that may arrive in any order.

SendCloud retries webhooks for minutes, so a ``deliver`` can arrive after the ``soft_bounce``
that preceded it. The status is therefore the one of the *latest* status-changing event by
the event's own time, never the last one received: a max over (time, rank), which gives the
same answer whatever the arrival order.
"""

from __future__ import annotations

EVENT_NAMES = ("request", "deliver", "open", "click", "unsubscribe", "report_spam", "invalid", "soft_bounce", "route")

# Spellings of a newer SendCloud summary table (and their hyphen/underscore variants).
ALIASES = {"delivered": "deliver", "spam_report": "report_spam", "invalid_email": "invalid"}

STATUSES = ("requested", "delivered", "soft_bounce", "invalid")

# Only these events change the status; opens, clicks, unsubscribes, spam reports and route
# (inbound replies) say something about the recipient, not about the delivery.
STATUS_OF = {"request": "requested", "deliver": "delivered", "soft_bounce": "soft_bounce", "invalid": "invalid"}

# Ties (two events in the same millisecond) go to the later stage of a delivery's life, so
# the answer does not depend on which one arrived first: a soft bounce can be followed by a
# delivery or by a final failure, never the other way round. ``invalid`` outranks
# ``delivered`` because a final failure is what suppression and the sender must hear about.
_RANK = {"requested": 0, "soft_bounce": 1, "delivered": 2, "invalid": 3}


def canonical(name: str) -> str:
    """The canonical event name: lowercase, ``-`` as ``_``, aliases resolved.

    Unknown names come back normalised the same way (not refused): the receiver keeps them
    and flags them, since SendCloud adds event types now and then.
    """
    normalised = name.strip().lower().replace("-", "_")
    return ALIASES.get(normalised, normalised)


def is_known(name: str) -> bool:
    return canonical(name) in EVENT_NAMES


def status_after(
    current: str | None, current_time: float | None, event: str, event_time: float
) -> tuple[str | None, float | None]:
    """The status and its time once ``event`` (any spelling) at ``event_time`` is known.

    Events that do not change the status leave ``(current, current_time)`` as they are.
    """
    new = STATUS_OF.get(canonical(event))
    if new is None:
        return current, current_time
    if current is None or current_time is None:
        return new, event_time
    if (event_time, _RANK[new]) > (current_time, _RANK.get(current, -1)):
        return new, event_time
    return current, current_time
