"""relay.observe.health and relay.config.diff: what /readyz and a reload decide, as tables."""

from __future__ import annotations

import pytest

from relay.config.diff import restart_needed
from relay.errors import SMTPReply
from relay.observe.health import UpstreamHealth, attempt_failed, readiness_problems
from tests.unit.helpers import BASE, config_from

ATTEMPTS = {
    "delivered": ([SMTPReply.received(250, "ok")], False),
    "recipient_refused_upstream_answered": ([SMTPReply.received(550, "5.1.1 unknown")], False),
    "one_of_two_delivered": ([SMTPReply.received(451, "later"), SMTPReply.received(250, "ok")], False),
    "no_connection": ([SMTPReply.received(None, "connect to smtp: refused")], True),
    "login_refused": ([SMTPReply.received(None, "upstream refused login or greeting: 535 bad")], True),
    "all_temporary": ([SMTPReply.received(421, "busy"), SMTPReply.received(451, "later")], True),
    "nothing_tried": ([], False),
}


@pytest.mark.parametrize("replies, failed", ATTEMPTS.values(), ids=ATTEMPTS.keys())
def test_attempt_failed(replies, failed):
    assert attempt_failed(replies) is failed


def test_upstream_health_remembers_the_start_of_a_run_of_failures():
    health = UpstreamHealth()
    assert health.record("a", True, 100.0) == 100.0
    assert health.record("a", True, 160.0) == 100.0
    assert health.record("b", False, 170.0) is None
    assert health.failing_since == {"a": 100.0}
    assert health.record("a", False, 200.0) is None
    assert health.failing_since == {}


READINESS = {
    "ready": (None, [], {}, 900.0, []),
    "spool": ("write failed: disk full", [], {}, 900.0, ["spool: write failed: disk full"]),
    "workers": (None, ["acme_trigger", "acme_trigger"], {}, 900.0, ["delivery workers stopped: acme_trigger"]),
    "upstream_failing_long": (None, [], {"acme": 0.0}, 900.0, ["upstream for account acme failing for 1000s"]),
    "upstream_failing_short": (None, [], {"acme": 500.0}, 900.0, []),
    "upstream_check_off": (None, [], {"acme": 0.0}, None, []),
}


@pytest.mark.parametrize("spool, dead, failing, after, problems", READINESS.values(), ids=READINESS.keys())
def test_readiness_problems(spool, dead, failing, after, problems):
    assert readiness_problems(spool, dead, failing, after, 1000.0) == problems


RELOADS = {
    "users_rules_limits_apply": ("max_recipients: 100", "max_recipients: 7", []),
    "listener_port": ("port: 2525", "port: 2526", ["server.listeners"]),
    "processes": ("max_recipients: 100", "max_recipients: 100\n  processes: 1", ["server.processes"]),
    "spool_path": ("upstream: {kind: capture}", "spool: {path: other.db}\nupstream: {kind: capture}", ["spool.path"]),
    "admin_listen": ("upstream: {kind: capture}", "admin: {listen: '127.0.0.1:9025'}\nupstream: {kind: capture}",
                     ["admin.listen"]),
    "admin_token_applies": ("upstream: {kind: capture}", "admin: {token: abcdef}\nupstream: {kind: capture}", []),
    "events_listen": ("upstream: {kind: capture}", "events: {listen: '127.0.0.1:8026', app_key: k}\nupstream: {kind: capture}",
                      ["events.listen"]),
    "events_suppress_applies": ("upstream: {kind: capture}", "events: {suppress: {unsubscribe: all}}\nupstream: {kind: capture}",
                                []),
}


@pytest.mark.parametrize("old, new, waiting", RELOADS.values(), ids=RELOADS.keys())
def test_restart_needed(old, new, waiting):
    base = BASE.replace("  listeners:", "  max_recipients: 100\n  listeners:")
    assert restart_needed(config_from(base), config_from(base.replace(old, new))) == waiting
