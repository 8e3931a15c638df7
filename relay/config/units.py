"""How operators write amounts: durations (``5m``), sizes (``25MiB``), rates (``600/hour``), ``HOST:PORT``.

A leaf: the schema, the policy stage and the CLI all read these, and it imports no stage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, ByteSize

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(value: Any) -> float:
    """``"5m"`` → 300.0 seconds; plain numbers are seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration such as 30s, 5m, 4h or 5d")
    if isinstance(value, (int, float)):
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a duration: use e.g. 30s, 5m, 4h or 5d")
    number, unit = match.groups()
    return float(number) * _DURATION_UNITS[unit]


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_positive)]
# ByteSize reads "25MiB", "16MB", "16000000"; stored as a plain int of bytes.
Size = Annotated[ByteSize, AfterValidator(lambda v: int(_positive(v)))]


_PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\S.*?)\s*$")


@dataclass(frozen=True)
class Rate:
    """At most ``count`` in any ``period`` seconds."""

    count: int
    period: float

    def __str__(self) -> str:
        for name, seconds in reversed(_PERIODS.items()):
            if self.period == seconds:
                return f"{self.count}/{name}"
        for suffix, seconds in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
            if self.period % seconds == 0:
                return f"{self.count}/{self.period / seconds:g}{suffix}"
        return f"{self.count}/{self.period:g}s"


def parse_rate(value: object) -> Rate:
    """``"600/hour"``, ``"20/minute"``, ``"1000/day"``, or a duration: ``"50/10m"``."""
    match = _RATE.match(value) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"{value!r} is not a rate: use e.g. 600/hour, 20/minute or 50/10m")
    count, unit = int(match.group(1)), match.group(2).lower()
    period = _PERIODS.get(unit) or _PERIODS.get(unit.removesuffix("s"))
    if period is None:
        try:
            period = parse_duration(unit if unit[0].isdigit() else f"1{unit}")
        except ValueError:
            raise ValueError(f"{value!r}: the period must be second, minute, hour, day or a duration like 10m") from None
    if count < 1 or period <= 0:
        raise ValueError(f"{value!r}: the count and the period must be greater than zero")
    return Rate(count, period)



def _rate(value: Any) -> Any:
    return value if isinstance(value, Rate) else parse_rate(value)


# "600/hour", "20/minute", "50/10m": recipients accepted per period.
RateLimit = Annotated[Rate, BeforeValidator(_rate)]


def _host_port(value: str) -> str:
    host, port = split_host_port(value)
    if not host or not 1 <= port <= 65535:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8025 or [::1]:8025")
    return value


def split_host_port(value: str) -> tuple[str, int]:
    """``127.0.0.1:8025`` / ``[::1]:8025`` → (host, port); port 0 when it does not parse."""
    host, _, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host, int(port) if port.isdigit() else 0



HostPort = Annotated[str, AfterValidator(_host_port)]
