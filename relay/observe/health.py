"""What /readyz judges: pure decisions about the upstream's health and the relay's readiness.

Readiness means "mail sent here now will be kept and will move": the spool takes writes, the
delivery workers run, and the upstream has not been failing for longer than
``admin.upstream_unready_after``. The probes themselves (a real spool write, the workers'
tasks) live in the admin endpoint; the rules live here so they are tested as tables.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from relay.errors import SMTPReply


def attempt_failed(replies: Iterable[SMTPReply]) -> bool:
    """Did the upstream fail this attempt, as opposed to judging its recipients?

    A recipient refused with 5xx means SendCloud is up and answering; no connection, a
    refused login or a temporary reply for every recipient means the hop itself is failing.
    """
    replies = list(replies)
    if any(reply.code is not None and (200 <= reply.code < 300 or reply.code >= 500) for reply in replies):
        return False
    return bool(replies)


class UpstreamHealth:
    """Per account: since when its attempts have been failing without a success in between."""

    def __init__(self) -> None:
        self.failing_since: dict[str, float] = {}

    def record(self, account: str, failed: bool, now: float) -> float | None:
        """Note one attempt; returns the start of the current run of failures, if any."""
        if not failed:
            self.failing_since.pop(account, None)
            return None
        return self.failing_since.setdefault(account, now)


def readiness_problems(
    spool_error: str | None,
    dead_workers: Iterable[str],
    failing_since: Mapping[str, float],
    unready_after: float | None,
    now: float,
) -> list[str]:
    """Reasons not to send traffic here; empty means ready."""
    problems = []
    if spool_error:
        problems.append(f"spool: {spool_error}")
    dead = sorted(set(dead_workers))
    if dead:
        problems.append(f"delivery workers stopped: {', '.join(dead)}")
    if unready_after is not None:
        for account, since in sorted(failing_since.items()):
            if now - since >= unready_after:
                problems.append(f"upstream for account {account} failing for {now - since:.0f}s")
    return problems
