"""Prometheus metrics (prometheus-client): what the relay counts, and the calls that count it.

The listener and the scheduler call the small functions below at the moment a fact is known;
gauges that describe state rather than events (queue depth, oldest message, open sessions)
are set by the admin endpoint just before each scrape, from the spool itself. Label values
are configured names (users, accounts, listeners, channels) and fixed reason words, never
addresses, so the number of series stays bounded.

With acceptor processes (``server.processes`` above 1) this is prometheus-client's
multiprocess mode: ``sendcloud-relay serve`` makes a private directory and names it in
``PROMETHEUS_MULTIPROC_DIR`` before this module is imported (:mod:`relay.observe.metrics_directory`); each
process keeps its values in its own memory-mapped file there, under a stable name (``main``,
``acceptor0``…) so an acceptor started again carries on its counters instead of leaving a
file per process behind; ``/metrics`` in the main process merges the files. Every gauge says
how to merge (``multiprocess_mode``): open sessions add up over the live processes, the
gauges only the main process sets (queue, upstream, reload) take its latest value.
``process_*`` and ``python_*`` describe the main process only.
"""

from __future__ import annotations

import os

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)

from relay.errors import SMTPReply
from relay.observe.metrics_directory import DIRECTORY, PROCESS_NAME

_shared = os.environ.get(DIRECTORY)
if _shared:
    _name = os.environ.get(PROCESS_NAME) or str(os.getpid())
    values.ValueClass = values.MultiProcessValue(lambda: _name)  # the library's hook for this (as with uWSGI)

disable_created_metrics()  # no *_created series: half the output, and nothing alerts on them
_P = "sendcloud_relay_"

ACCEPTED = Counter(_P + "messages_accepted", "Messages accepted (on disk, 250 sent)", ["user", "account", "channel"])
REJECTED = Counter(
    _P + "rejected",
    "Commands refused at MAIL, RCPT or DATA (one per refused recipient at RCPT), by reason",
    ["listener", "user", "reason"],
)
DELIVERY = Counter(
    _P + "recipients",
    "Delivery attempt outcomes per recipient: delivered, deferred (will retry) or failed (bounced)",
    ["user", "account", "channel", "result"],
)
ACCEPTANCE_SECONDS = Histogram(
    _P + "acceptance_seconds",
    "End of DATA to the reply: routing and the spool's fsync",
    ["listener"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
DELIVERY_DELAY_SECONDS = Histogram(
    _P + "delivery_delay_seconds",
    "Arrival to delivery upstream, per delivered recipient (Postfix's delay=)",
    ["account"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400),
)
UPSTREAM_SECONDS = Histogram(
    _P + "upstream_transaction_seconds",
    "One SMTP transaction upstream (connect and login included when needed)",
    ["account"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
UPSTREAM_IN_USE = Gauge(
    _P + "upstream_connections_in_use", "Delivery workers in an upstream transaction now", ["account"],
    multiprocess_mode="livesum",
)
UPSTREAM_FAILING_SINCE = Gauge(
    _P + "upstream_failing_since_seconds",
    "Unix time of the first failed upstream attempt in an unbroken run of failures; 0 when the last attempt worked",
    ["account"],
    multiprocess_mode="mostrecent",
)
UPSTREAM_UNREACHABLE = Gauge(
    _P + "upstream_unreachable",
    "1 while connecting to this upstream (host:port (tls)) fails: the workers of every account sending there wait "
    "and one probe retries with backoff",
    ["upstream"],
    multiprocess_mode="mostrecent",
)
ACTIVE_MESSAGES = Gauge(
    _P + "delivery_active_messages",
    "Messages held in delivery's memory (queued for a worker or in one), at most spool.active_limit",
    multiprocess_mode="mostrecent",
)
AUTH = Counter(_P + "auth_attempts", "SMTP AUTH attempts by result", ["listener", "result"])
SPOOL_FENCED = Counter(_P + "spool_fenced_outcomes",
                       "Delivery outcomes the shared spool refused: another node had taken the message over")
TLS_SESSIONS = Counter(_P + "tls_sessions", "TLS handshakes completed (STARTTLS or implicit)", ["listener", "version"])
SESSIONS = Gauge(_P + "smtp_sessions", "Open SMTP connections", ["listener"], multiprocess_mode="livesum")
QUEUE_MESSAGES = Gauge(
    _P + "queue_messages", "Messages with at least one recipient not yet final", multiprocess_mode="mostrecent"
)
QUEUE_RECIPIENTS = Gauge(_P + "queue_recipients", "Recipients waiting, by state", ["state"], multiprocess_mode="mostrecent")
QUEUE_OLDEST_SECONDS = Gauge(
    _P + "queue_oldest_message_age_seconds", "Age of the oldest message still waiting (0: queue empty)",
    multiprocess_mode="mostrecent",
)
RELOADS = Counter(_P + "config_reloads", "Config reloads by result", ["result"])
LAST_RELOAD_OK = Gauge(
    _P + "config_last_reload_successful", "1 if the last reload succeeded (or none was tried)", multiprocess_mode="mostrecent"
)


# Reason words for refusals, by reply code and enhanced status code (RFC 3463).
_REASONS = {
    (554, "5.7.1"): "relay_denied",
    (553, "5.7.1"): "sender_not_allowed",
    (501, "5.1.3"): "bad_recipient_syntax",
    (452, "4.5.3"): "too_many_recipients",
    (451, "4.3.0"): "spool_unavailable",
    (552, "5.3.4"): "message_too_big",
    (500, "5.5.2"): "line_too_long",
    (530, "5.7.0"): "auth_required",
    (451, "4.7.1"): "rate_limited",
    (550, "5.1.1"): "suppressed",
}


def reason_for(reply: SMTPReply) -> str:
    """A fixed word for a refusal; unknown ones by their codes (``smtp_550_5.7.0``)."""
    if reply.code is None:
        return "other"
    return _REASONS.get((reply.code, reply.enhanced)) or f"smtp_{reply.code}_{reply.enhanced or 'x'}"


def accepted(user: str, account: str, channel: str, listener: str, seconds: float) -> None:
    ACCEPTED.labels(user, account, channel).inc()
    ACCEPTANCE_SECONDS.labels(listener).observe(seconds)


def rejected(listener: str, user: str | None, reason: str) -> None:
    REJECTED.labels(listener, user or "", reason).inc()


def delivery_result(user: str, account: str, channel: str, result: str, delay: float | None = None) -> None:
    DELIVERY.labels(user, account, channel, result).inc()
    if delay is not None:
        DELIVERY_DELAY_SECONDS.labels(account).observe(delay)


def auth(listener: str, success: bool) -> None:
    AUTH.labels(listener, "success" if success else "failure").inc()


def tls_session(listener: str, version: str | None) -> None:
    TLS_SESSIONS.labels(listener, version or "unknown").inc()


def reload(success: bool) -> None:
    RELOADS.labels("success" if success else "failure").inc()
    LAST_RELOAD_OK.set(1 if success else 0)


def _scraped() -> CollectorRegistry:
    if not _shared:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, _shared)
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


_SCRAPED = _scraped()


def exposition() -> bytes:
    """The text format Prometheus scrapes (process_* and python_* collectors included).

    With acceptor processes it reads their files: call it off the event loop.
    """
    return generate_latest(_SCRAPED)


def child_environment(name: str) -> dict[str, str]:
    """The environment for a child process whose metrics go to the shared directory as ``name``."""
    return {**os.environ, PROCESS_NAME: name}


def process_gone(name: str) -> None:
    """A child process exited: its open sessions no longer count (its counters still do)."""
    if _shared:
        multiprocess.mark_process_dead(name, _shared)


# -- SendCloud's webhook events (relay/events) -----------------------------------------------

EVENTS = Counter(
    _P + "events", "SendCloud webhook events applied, by canonical event name and account", ["event", "account"]
)
EVENTS_UNMATCHED = Counter(
    _P + "events_unmatched", "Signed events for a message or recipient the relay does not know", ["event"]
)
EVENTS_REFUSED = Counter(
    _P + "events_refused", "Webhook requests answered 400 or 403 (unreadable, bad signature, stale)", ["reason"]
)
EVENTS_DUPLICATE = Counter(_P + "events_duplicate", "Webhook events received again (SendCloud's retries), not applied")
FANOUT = Counter(_P + "fanout", "POSTs to the teams' events_url, by user and result", ["user", "result"])


def event_applied(event: str, account: str | None, matched: bool) -> None:
    EVENTS.labels(event, account or "").inc()
    if not matched:
        EVENTS_UNMATCHED.labels(event).inc()
