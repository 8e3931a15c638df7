"""What operators see of the queue: `queue list` and `queue show`, as text and as JSON.

Pure formatting of spool records, shared by the CLI and the admin HTTP endpoint
(``/api/queue``), so the two never disagree: :func:`list_record` is one line of `queue list`
as data, and :func:`list_lines` prints those records.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime

from relay.config import Config, parse_duration
from relay.events.status import STATUSES
from relay.spool import ListQuery, QueuedMessage, State
from relay.spool.events_model import Fate, RecipientEvent


def format_age(seconds: float) -> str:
    """``3d4h``, ``2h5m``, ``4m10s``, ``12s``: the two largest units, as operators read them."""
    seconds = max(0, int(seconds))
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    for index, (name, size) in enumerate(units[:-1]):
        if seconds >= size:
            small_name, small_size = units[index + 1]
            rest = (seconds % size) // small_size
            return f"{seconds // size}{name}" + (f"{rest}{small_name}" if rest else "")
    return f"{seconds}s"


def list_query(
    *,
    include_final: bool = False,
    user: str | None = None,
    to: str | None = None,
    state: str | None = None,
    since: str | None = None,
    before: str | None = None,
    sender: str | None = None,
    status: str | None = None,
    email_id: str | None = None,
    after: str | None = None,
    limit: str | int | None = None,
    now: float,
) -> ListQuery:
    """`queue list`'s options (or ``/api/queue``'s parameters) as a spool query; ValueError says which is wrong.

    ``since`` and ``before`` are ages (``1d``, ``90m``) or ISO dates or times (``2026-12-01``,
    local time unless it says otherwise). The page asked of the spool is one longer than ``limit``, so
    :func:`page` can tell whether there is more.
    """
    try:
        chosen_state = State(state) if state is not None else None
    except ValueError:
        raise ValueError(f"state {state!r}: one of {', '.join(s.value for s in State)}") from None
    if status is not None and status not in STATUSES:
        raise ValueError(f"status {status!r}: one of SendCloud's {', '.join(STATUSES)}")
    if limit is not None:
        try:
            limit = int(limit)
        except ValueError:
            raise ValueError(f"limit {limit!r} is not a number") from None
        if limit < 1:
            raise ValueError("limit must be at least 1")
    return ListQuery(
        include_final=include_final, user=user, to=to, state=chosen_state,
        since=_since(since, now, "since") if since is not None else None,
        before=_since(before, now, "before") if before is not None else None,
        sender=sender, status=status, email_id=email_id,
        after=after, limit=limit + 1 if limit is not None else None,
    )


def _since(text: str, now: float, name: str = "since") -> float:
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(f"{name} {text!r}: an age such as 1d or 90m, or a date such as 2026-12-01") from None


def page(messages: list[QueuedMessage], query: ListQuery) -> tuple[list[QueuedMessage], str | None]:
    """The messages to show for a :func:`list_query` query, and the cursor for the next page (None: no more)."""
    if query.limit is None or len(messages) < query.limit:
        return messages, None
    shown = messages[: query.limit - 1]
    return shown, shown[-1].id


def list_record(message: QueuedMessage, now: float) -> dict:
    """One line of `queue list` as data (``/api/queue``)."""
    return {
        "id": message.id,
        "received_at": message.received_at,
        "age": format_age(now - message.received_at),
        "user": message.user,
        "account": message.account,
        "channel": message.channel,
        "recipients_pending": sum(1 for r in message.recipients if not r.state.final),
        "recipients_total": len(message.recipients),
        "state": message.state,
    }


def list_lines(messages: list[QueuedMessage], now: float | None = None, more_after: str | None = None) -> list[str]:
    now = time.time() if now is None else now
    lines = [f"{'ID':<16} {'AGE':>6} {'USER':<12} {'ACCOUNT':<16} {'RCPTS':>5} STATE"]
    for record in (list_record(message, now) for message in messages):
        lines.append(
            f"{record['id']:<16} {record['age']:>6} {record['user']:<12} {record['account']:<16} "
            f"{record['recipients_pending']:>2}/{record['recipients_total']:<2} {record['state']}"
        )
    lines.append(f"-- {len(messages)} message(s)" + (f"; more with --after {more_after}" if more_after else ""))
    return lines


def event_record(event: RecipientEvent) -> dict:
    """One event of a recipient's history, with SendCloud's field names; absent fields left out."""
    record = {"event": event.event, "time": event.time}
    fields = (("ip", event.ip), ("url", event.url), ("subStat", event.sub_stat), ("subStatDesc", event.sub_stat_desc))
    for key, value in fields:
        if value is not None:
            record[key] = value
    return record


def show_record(message: QueuedMessage, now: float, fates: Mapping[int, Fate] | None = None) -> dict:
    """`queue show --json` (``/api/queue/ID``): the message, every recipient's state and, from
    ``fates``, SendCloud's status (None until an event says) and every event."""
    fates = fates or {}
    record = list_record(message, now) | {
        "listener": message.listener,
        "client": message.client,
        "sender": message.sender,
        "size": message.size,
    }
    record["recipients"] = [
        {
            "address": r.address,
            "state": r.state.value,
            "attempts": r.attempts,
            "next_attempt": r.next_attempt if not r.state.final else None,
            "last_reply": r.last_reply,
            "email_id": r.email_id,
            "status": fates[r.idx].status if r.idx in fates else None,
            "events": [event_record(e) for e in fates[r.idx].events] if r.idx in fates else [],
        }
        for r in message.recipients
    ]
    return record


def show_lines(
    message: QueuedMessage, config: Config | None, now: float | None = None, fates: Mapping[int, Fate] | None = None
) -> list[str]:
    now = time.time() if now is None else now
    fates = fates or {}
    account = config.accounts.get(message.account) if config else None
    api_user = f" (api_user {account.api_user})" if account else ""
    lines = [
        f"id:        {message.id}",
        f"received:  {time.strftime('%Y-%m-%d %H:%M:%S %z', time.localtime(message.received_at))} ({format_age(now - message.received_at)} ago)",
        f"user:      {message.user} via listener {message.listener} from [{message.client}]",
        f"route:     channel {message.channel} -> account {message.account}{api_user}"
        + (f", label {message.label}" if message.label is not None else ""),
        f"sender:    <{message.sender}>"
        + (f" (upstream MAIL FROM <{message.mail_from}>, sender mode)" if message.mail_from is not None else ""),
        f"size:      {message.size} bytes",
        "recipients:",
    ]
    for r in message.recipients:
        lines.append(f"  <{r.address}>  {r.state.value}, {r.attempts} attempt(s)")
        if r.state in (State.QUEUED, State.DEFERRED):
            wait = r.next_attempt - now
            when = "now" if wait <= 0 else f"in {format_age(wait)}"
            reason = f"waits: {r.last_reply}" if r.last_reply else "waits: not tried yet"
            lines.append(f"      {reason}; next attempt {when}")
        elif r.last_reply:
            lines.append(f"      last reply: {r.last_reply}")
        if r.email_id:
            lines.append(f"      SendCloud emailId: {r.email_id}")
        fate = fates.get(r.idx)
        if fate is not None:
            lines.append(f"      SendCloud status: {fate.status or '-'}")
            for e in fate.events:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.time))
                shown = event_record(e).items()
                extra = ", ".join(f"{key} {value}" for key, value in shown if key not in ("event", "time"))
                lines.append(f"        {when} {e.event}" + (f" ({extra})" if extra else ""))
    return lines
