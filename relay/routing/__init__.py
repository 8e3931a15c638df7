"""Which channel, and so which SendCloud account, carries a message (``rules``), with which
options (``options``), and the upstream TLS policy per recipient (``tls_policy``): pure
functions, tested as tables."""

from relay.routing.options import Options, resolve_options
from relay.routing.rules import (
    Envelope,
    Route,
    choose_route,
    rule_mismatch,
    trace_route,
)
from relay.routing.tls_policy import tls_policy

__all__ = ["Envelope", "Options", "Route", "choose_route", "resolve_options", "rule_mismatch", "tls_policy", "trace_route"]
