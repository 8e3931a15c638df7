"""Deliveries to hold back: pause them, then let one probe through before the others follow.

Two gates: SendCloud telling an *account* to slow down (``536 Frequency limited``, a quota
reply) closes that account's gate; an unreachable *destination* (connect refused, timed out, TLS
handshake or DNS failed: Postfix's dead destination) closes the gate of that host, port and TLS
mode, which every account sending there shares. Every worker behind a closed gate waits out
the pause instead of each trying its messages and spending their retries (or a connect timeout
each). The pause doubles while the failures go on (up to a cap); when it ends, one worker
probes alone, and the others follow only once the probe got through.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from relay.config import Upstream

log = logging.getLogger("relay.delivery")


def pause_length(consecutive: int, base: float, cap: float) -> float:
    """How long to pause after the ``consecutive``-th throttling reply in a row (1-based)."""
    return min(base * 2 ** (consecutive - 1), cap)


def destination(upstream: Upstream) -> str:
    """What reachability is a property of: where connections go and how (accounts share it)."""
    if upstream.kind == "capture":
        return f"capture:{upstream.path}"
    return f"{upstream.host}:{upstream.port} ({upstream.tls})"


class GateClosed(Exception):
    """The relay is stopping: a worker waiting at the gate gives up; its message stays in the spool."""


class Gate:
    def __init__(self, subject: str, pauses: Callable[[], tuple[float, float]], clock: Callable[[], float] = time.monotonic,
                 reason: str = "asked to slow down", probe_first: bool = False):
        self.subject = subject  # what is held back, for the logs: "account acme_trigger", "upstream host:25 (starttls)"
        self._pauses = pauses  # (base, cap) from the live config
        self._clock = clock
        self._reason = reason  # for the log line when the gate closes
        self._unproven = probe_first  # nothing known yet: the first transaction goes alone, as a probe
        self.paused_until = 0.0
        self.consecutive = 0  # throttling replies in a row; 0 = running normally
        self.pauses = 0  # how many times the gate closed (for logs and tests)
        self._probing = False
        self._closed = False
        self._changed = asyncio.Event()

    def remaining(self) -> float:
        return max(0.0, self.paused_until - self._clock())

    def close(self) -> None:
        """Stopping: every worker waiting here (for a pause of minutes, or a probe's connect) gives up."""
        self._closed = True
        self._changed.set()

    async def paused_out(self) -> None:
        """Wait until no pause is left (a probe may still be under way); :class:`GateClosed` once closed."""
        while (wait := self.remaining()) > 0:
            if self._closed:
                raise GateClosed(self.subject)
            await self._wait(wait)
        if self._closed:
            raise GateClosed(self.subject)

    async def acquire(self) -> bool:
        """Wait until this worker may send; True when it is the probe after a pause.
        :class:`GateClosed` once :meth:`close` was called."""
        while True:
            if self._closed:
                raise GateClosed(self.subject)
            wait = self.remaining()
            if wait > 0:
                await self._wait(wait)
            elif (self.consecutive or self._unproven) and self._probing:
                await self._wait(None)
            else:
                self._probing = self.consecutive > 0 or self._unproven
                return self._probing

    def release(self, probe: bool, throttled: bool) -> None:
        """Report how the transaction went; a throttling reply (a failed connect) starts or extends the pause."""
        if probe:
            self._probing = False
        if throttled:
            if self.remaining() == 0:  # replies to transactions sent before the pause don't count twice
                self.consecutive += 1
                self.pauses += 1
                pause = pause_length(self.consecutive, *self._pauses())
                self.paused_until = self._clock() + pause
                log.warning("%s %s: pausing deliveries for %.1fs", self.subject, self._reason, pause)
        else:
            if probe:
                self._unproven = False
            if self.consecutive:
                log.info("%s: accepted again, resuming deliveries", self.subject)
                self.consecutive = 0
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait(self, timeout: float | None) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass
