"""One error type that carries its SMTP reply, decided where the failure is understood.

Policy, spool and routing raise :class:`SMTPReply`; the listener only turns it into the line
the client sees, so the reply code is never guessed at the edge.
"""

from __future__ import annotations


class SMTPReply(Exception):
    def __init__(self, code: int, enhanced: str, text: str):
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    def __reduce__(self):  # pickled between processes (relay.workers): rebuilt from its parts
        return type(self), (self.code, self.enhanced, self.text)


def spool_unavailable() -> SMTPReply:
    """The only answer when a message could not be made durable: never a 250."""
    return SMTPReply(451, "4.3.0", "Requested action aborted: spool unavailable, try again later")
