"""One reply type for both SMTP sides, decided where the failure is understood (maddy's model).

Policy, rewriting and the spool raise or return :class:`SMTPReply` with its code, enhanced
status code (RFC 3463) and text; the SMTP front end only writes it to the client. The upstream
hop gives back the same type for what SendCloud said (:meth:`SMTPReply.received`: the
enhanced code split off where the reply arrives) or for what went wrong on the way (no code:
no SMTP reply came). Retry decisions, DSNs and metrics read its fields; nothing parses a
reply's text back.
"""

from __future__ import annotations

import re

_ENHANCED = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?:\s+|$)")


class SMTPReply(Exception):
    """A reply: ``code`` None when none came (a connection failure), ``enhanced`` None when it had none."""

    def __init__(self, code: int | None, enhanced: str | None, text: str):
        super().__init__(code, enhanced, text)
        self.code = code
        self.enhanced = enhanced
        self.text = text

    @classmethod
    def received(cls, code: int | None, message: str) -> SMTPReply:
        """A reply as a server sent it (``250``, ``"2.0.0 Ok"``): its enhanced code, if it starts with one, split off."""
        match = _ENHANCED.match(message) if code is not None else None
        if match is None:
            return cls(code, None, message)
        return cls(code, match.group(1), message[match.end():])

    @property
    def temporary(self) -> bool:
        """No reply at all, or a 4xx: trying again later may work (SendCloud's exceptions: delivery.retry)."""
        return self.code is None or 400 <= self.code < 500

    def __str__(self) -> str:
        return " ".join(str(part) for part in (self.code, self.enhanced, self.text) if part not in (None, ""))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SMTPReply):
            return NotImplemented
        return (self.code, self.enhanced, self.text) == (other.code, other.enhanced, other.text)

    def __hash__(self) -> int:
        return hash((self.code, self.enhanced, self.text))

    def __repr__(self) -> str:
        return f"SMTPReply({self.code!r}, {self.enhanced!r}, {self.text!r})"

    def __reduce__(self):  # pickled between processes (relay.process.ipc): rebuilt from its parts
        return type(self), (self.code, self.enhanced, self.text)


def spool_unavailable() -> SMTPReply:
    """The only answer when a message could not be made durable: never a 250."""
    return SMTPReply(451, "4.3.0", "Requested action aborted: spool unavailable, try again later")
