"""Log lines as a mail operator reads them: Postfix's maillog shape, plain text or JSON.

Every line about a message starts with its queue ID (the one the client saw in
``250 ... queued as ID``), so ``grep ID`` follows it from SMTP to SendCloud; refusals before a
message exists start with ``NOQUEUE``, as in Postfix. :func:`event` takes the facts as fields
once; the plain formatter shows them as ``key=value`` and the JSON formatter as keys of one
object per line.

Two protections run on every line, whatever logger wrote it: configured secrets (API keys,
the admin token) are replaced by ``***`` — defence in depth, since no code logs them — and,
with ``logging.mask_addresses``, local parts of mail addresses become ``j***``.

No client-supplied value can forge a line or reach the terminal raw: :func:`render` passes
every value through :func:`escape` (control characters as ``\\xNN``, a backslash doubled, so
the escape is unambiguous), and both formatters escape control characters once more, whatever
logger wrote the line.

The standard library's logging, not structlog: every library here (aiosmtpd, aiosmtplib,
asyncio, aiohttp) logs through it, so one handler with one formatter sees every line; what
structlog would add (key-value events, JSON rendering) is the few lines below.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

from relay.config import Config, Logging
from relay.config.formats import dsn_passwords

# A local part: a run of characters that may appear in one, ending at "@" before a domain.
# "=" and "$" end a run so that `sasl_username=j***@x` keeps its key and SendCloud's emailIds
# (`<messageId><n>$<address>`) keep their messageId; "\" and quotes so JSON escapes survive.
_LOCAL_PART = re.compile(r"""([^\s<>()\[\],;:"'@$=\\/])[^\s<>()\[\],;:"'@$=\\/]*@(?=[\w.-])""")
_MIN_SECRET = 4  # shorter "secrets" would blank out ordinary words


def mask_addresses(text: str) -> str:
    """``john.doe@example.com`` → ``j***@example.com``, anywhere in ``text``."""
    return _LOCAL_PART.sub(r"\1***@", text)


# Characters that could end a log line, move the cursor or recolour a terminal, or reorder what
# a viewer shows: C0 (TAB included), DEL, C1, the Unicode line and paragraph separators, the
# bidirectional controls, and lone surrogates (undecodable bytes, which stderr cannot encode).
_BEYOND_C0 = r"\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_UNSAFE = re.compile(r"[\\\x00-\x1f" + _BEYOND_C0 + "]")
_CONTROL = re.compile(r"[\x00-\x1f" + _BEYOND_C0 + "]")
_JSON_RAW = re.compile("[" + _BEYOND_C0 + "]")  # what json.dumps(ensure_ascii=False) leaves raw


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def escape(value: str) -> str:
    """``value`` safe to log: control characters as ``\\xNN``/``\\uNNNN``, ``\\`` as ``\\\\``.

    Clients choose HELO names, addresses and AUTH usernames; with a CR or LF they could write
    a forged maillog line (``... status=sent``), with ESC a terminal sequence. Doubling the
    backslash keeps a client's literal ``\\x0a`` apart from an escaped newline.
    """
    return _UNSAFE.sub(_escaped, value) if _UNSAFE.search(value) else value


def escape_controls(text: str) -> str:
    """Control characters escaped, backslashes left alone: the formatters' second pass over
    text that :func:`render` may already have escaped (its ``\\\\`` must not double again)."""
    return _CONTROL.sub(_escaped, text) if _CONTROL.search(text) else text


def render(prefix: str | None, fields: Mapping[str, Any], note: str | None = None) -> str:
    """``ID: key=value, key=value (note)``: addresses in <>, clients in [], delays to 10 ms.

    Every value and the note are escaped: they carry what clients and upstreams sent.
    """
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, float):
            value = f"{value:.2f}"
        value = escape(str(value))
        if key in ("from", "to"):
            value = f"<{value}>"
        elif key == "client":
            value = f"[{value}]"
        parts.append(f"{key}={value}")
    text = ", ".join(parts)
    if prefix:
        text = f"{prefix}: {text}"
    return f"{text} ({escape(note)})" if note else text


def event(logger: logging.Logger, prefix: str | None, fields: Mapping[str, Any], note: str | None = None,
          level: int = logging.INFO) -> None:
    """Log one transaction or delivery fact; ``prefix`` is the queue ID, ``NOQUEUE`` or None."""
    if logger.isEnabledFor(level):
        queue_id = prefix if prefix and prefix != "NOQUEUE" else None
        logger.log(level, "%s", render(prefix, fields, note),
                   extra={"queue_id": queue_id, "fields": dict(fields), "note": note})


class Formatter(logging.Formatter):
    """Plain (timestamp level logger: text) or JSON lines, scrubbed and optionally masked."""

    def __init__(self, json_lines: bool = False, mask: bool = False, secrets: Iterable[str] = ()):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.json_lines = json_lines
        self.mask = mask
        self.secrets = sorted({s for s in secrets if len(s) >= _MIN_SECRET}, key=len, reverse=True)

    def clean(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return mask_addresses(text) if self.mask else text

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The message with control characters escaped, whatever logger wrote it (a second
        defence behind :func:`render`); the record itself is left as other handlers see it."""
        clone = copy.copy(record)
        clone.message = escape_controls(record.message)
        return super().formatMessage(clone)

    def formatException(self, ei) -> str:
        """A traceback keeps its lines, but an exception message cannot start a forged one:
        each line is escaped and indented."""
        return _continuation(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _continuation(super().formatStack(stack_info))

    def format(self, record: logging.LogRecord) -> str:
        if not self.json_lines:
            return self.clean(super().format(record))
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "queue_id", None):
            entry["queue_id"] = record.queue_id
        for key, value in (getattr(record, "fields", None) or {}).items():
            if value is not None and key not in entry:
                entry[key] = value
        if getattr(record, "note", None):
            entry["detail"] = record.note
        if record.exc_info:
            entry["exception"] = logging.Formatter.formatException(self, record.exc_info)
        # json.dumps escapes C0, quotes and backslashes; DEL, C1, U+2028/2029 and lone
        # surrogates it leaves raw. They can only be inside strings, where \\uNNNN is the same.
        line = json.dumps(self._cleaned(entry), ensure_ascii=False, default=str)
        return _JSON_RAW.sub(lambda match: f"\\u{ord(match.group()):04x}", line)

    def _cleaned(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.clean(value)
        if isinstance(value, dict):
            return {key: self._cleaned(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._cleaned(item) for item in value]
        return value


def _continuation(text: str) -> str:
    """Text that follows a log line on lines of its own: escaped line by line, indented, so
    that only real log lines start at the margin (with their timestamp)."""
    return "\n".join("    " + escape_controls(line) for line in text.split("\n"))


def secrets_of(config: Config) -> list[str]:
    """Every secret the config holds: what must never appear in a log line."""
    found = [account.api_key.get_secret_value() for account in config.accounts.values() if account.api_key]
    found += [key.key.get_secret_value() for key in config.dkim.values()]
    if config.admin.token is not None:
        found.append(config.admin.token.get_secret_value())
    found += [account.app_key.get_secret_value() for account in config.accounts.values() if account.app_key]
    found += [user.events_secret.get_secret_value() for user in config.users.values() if user.events_secret]
    if config.events.app_key is not None:
        found.append(config.events.app_key.get_secret_value())
    if config.spool.dsn is not None:
        found += dsn_passwords(config.spool.dsn.get_secret_value())
    return found


_handler: logging.Handler | None = None


def configure(settings: Logging | None = None, secrets: Iterable[str] = (), verbose: bool = False) -> None:
    """Install (or, on reload, adjust) the one stderr handler all loggers write through."""
    global _handler
    settings = settings or Logging()
    root = logging.getLogger()
    if _handler is None:
        _handler = logging.StreamHandler(sys.stderr)
        root.addHandler(_handler)
    _handler.setFormatter(Formatter(settings.format == "json", settings.mask_addresses, secrets))
    root.setLevel(logging.DEBUG if verbose else getattr(logging, settings.level.upper()))
