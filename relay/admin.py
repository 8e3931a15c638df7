"""What operators see of the queue: the text of `queue list` and `queue show`.

Pure formatting of spool records, shared by the CLI (and later the admin HTTP endpoint),
so the two never disagree.
"""

from __future__ import annotations

import time

from relay.config import Config
from relay.spool import QueuedMessage, State


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


def list_lines(messages: list[QueuedMessage], now: float | None = None) -> list[str]:
    now = time.time() if now is None else now
    lines = [f"{'ID':<16} {'AGE':>6} {'USER':<12} {'ACCOUNT':<16} {'RCPTS':>5} STATE"]
    for message in messages:
        pending = sum(1 for r in message.recipients if not r.state.final)
        lines.append(
            f"{message.id:<16} {format_age(now - message.received_at):>6} {message.user:<12} "
            f"{message.account:<16} {pending:>2}/{len(message.recipients):<2} {message.state}"
        )
    lines.append(f"-- {len(messages)} message(s)")
    return lines


def show_lines(message: QueuedMessage, config: Config | None, now: float | None = None) -> list[str]:
    now = time.time() if now is None else now
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
    return lines
