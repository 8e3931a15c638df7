"""Property tests of the pure code that reads untrusted input: line endings and headers of
client messages, envelope addresses, rates, the AUTH guard, and the config loader."""

from __future__ import annotations

import re

import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from relay.config import Config, ConfigError, parse_config
from relay.config.units import Rate, parse_rate
from relay.errors import SMTPReply
from relay.lines import header_block, normalise_line_endings
from relay.policy.auth import AuthGuard, GuardSettings
from relay.policy.checks import check_recipient, check_sender
from relay.policy.rates import RateCounter, would_exceed
from relay.rewrite.message import header_reader
from tests.unit.helpers import BASE, config_from

BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
# Message-like bytes: plenty of CR, LF, dots and colons, where the bugs live.
message_bytes = st.lists(
    st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"..", b":", b" ", b"\t", b"Subject", b"From", b"X-A", b"a", b"\xff", b"\x00"]),
    max_size=60,
).map(b"".join) | st.binary(max_size=300)


def line_breaks(data: bytes) -> int:
    return len(re.findall(rb"\r\n|\r|\n", data))


@given(message_bytes)
@example(b"first\n.\nMAIL FROM:<evil@example.org>\n")
@example(b"a\r\r\n.\r\n")
def test_normalised_bodies_have_only_crlf_and_the_same_lines(data):
    normalised = normalise_line_endings(data)
    assert not BARE.search(normalised)
    assert line_breaks(normalised) == line_breaks(data)
    assert normalise_line_endings(normalised) == normalised


@given(message_bytes)
@example(b"x\r.\rMAIL FROM:<e@x>\r")
def test_a_normalised_body_sent_with_dot_stuffing_ends_exactly_once(data):
    """What a strict or a lenient upstream sees: one end-of-data, at the very end."""
    normalised = normalise_line_endings(data)
    if normalised and not normalised.endswith(b"\r\n"):
        normalised += b"\r\n"
    stuffed = re.sub(rb"(?m)^\.", b"..", normalised) + b".\r\n"
    wire = b"\r\n" + stuffed  # the DATA command's own CRLF comes before the content
    for terminator in (b"\r\n.\r\n", b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r.\n", b"\n.\r"):
        first = wire.find(terminator)  # where a parser accepting this terminator would stop
        assert first == -1 or first >= len(wire) - len(b"\r\n.\r\n"), terminator  # only within the real end


@given(message_bytes, st.sampled_from(["Subject", "From", "X-Mail-Type", "Received", "x-a"]))
@example(b"Subject: =?utf-8?q?\xff?=\r\n\r\n", "Subject")
@example(b"\x00: a\r\n", "X-A")
def test_header_lookup_never_raises(data, name):
    body = normalise_line_endings(data)
    assert header_block(body) == body[: len(header_block(body))]
    value = header_reader(body)(name)
    assert value is None or isinstance(value, str)


addresses = st.text(max_size=80) | st.from_regex(r"[a-z.+-]{0,10}@[a-z0-9.-]{0,20}", fullmatch=True)


@given(addresses, st.integers(0, 200), st.integers(1, 100))
def test_recipient_check_answers_none_or_a_proper_reply(address, accepted, limit):
    reply = check_recipient(address, accepted, limit)
    assert reply is None or (isinstance(reply, SMTPReply) and reply.code in (452, 501))
    if reply is None:
        assert "@" in address and accepted < limit


@given(addresses, st.lists(st.text(max_size=20), max_size=4))
def test_sender_check_answers_none_or_553(sender, patterns):
    user = config_from(BASE).users["billing"].model_copy(update={"allowed_senders": patterns})
    reply = check_sender("billing", user, sender)
    assert reply is None or reply.code == 553


# -- rates and the AUTH guard ------------------------------------------------------------------


@given(st.text(max_size=30) | st.integers() | st.none())
@example("600/hour")
@example("1/0s")
@example("5/-1m")
def test_parse_rate_returns_a_rate_or_a_value_error(value):
    try:
        rate = parse_rate(value)
    except ValueError:
        return
    assert rate.count >= 1 and rate.period > 0
    assert parse_rate(str(rate)) == rate


class Clock:
    def __init__(self):
        self.now = 1_700_000_000.0

    def __call__(self):
        return self.now


@given(
    st.integers(1, 50),
    st.sampled_from([1.0, 60.0, 3600.0]),
    st.lists(st.tuples(st.floats(0, 2), st.integers(1, 5)), max_size=150),
)
def test_a_rate_is_never_exceeded_within_a_window(limit, period, steps):
    """Checked before each charge, as the listener does: no window ever holds more than the limit."""
    clock = Clock()
    counter = RateCounter(clock=clock)
    rate = Rate(limit, period)
    per_window: dict[int, int] = {}
    for advance, amount in steps:
        clock.now += advance * period
        if not would_exceed(counter.used("user:x", period), amount, rate):
            counter.add("user:x", period, amount)
            window = int(clock.now // period)
            per_window[window] = per_window.get(window, 0) + amount
    assert all(count <= limit for count in per_window.values())


@given(st.lists(st.tuples(st.sampled_from(["a1", "a2", "a3"]), st.sampled_from(["u1", "u2"]), st.floats(0, 100)), max_size=60))
def test_auth_guard_delays_are_bounded_and_lockouts_follow_the_threshold(attempts):
    clock = Clock()
    settings = GuardSettings(base_delay=1.0, window=300.0, lockout_failures=5, lockout_duration=600.0, max_delay=30.0)
    guard = AuthGuard(lambda: settings, clock=clock)
    times: dict[str, list[float]] = {}
    for address, user, advance in attempts:
        clock.now += advance
        if guard.locked_for(address, user) is not None:
            continue
        assert 0 < guard.failed(address, user) <= 30.0
        for key in (address, user):
            times.setdefault(key, []).append(clock.now)
            recent = [t for t in times[key] if clock.now - t < 300.0]
            if len(recent) >= 5:
                assert guard.locked_for(address if key == address else "fresh", user if key == user else "fresh") is not None


# -- the config loader ---------------------------------------------------------------------------

_BASE_DATA = yaml.safe_load(BASE)
scalars = st.none() | st.booleans() | st.integers(-5, 10**6) | st.text(max_size=12) | st.sampled_from(
    ["5m", "-1s", "600/hour", "0/hour", "25MiB", "${NOPE}", "::", "10.0.0.0/8", "starttls", "required"]
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
config_keys = st.sampled_from(
    ["server", "spool", "upstream", "accounts", "users", "rules", "listeners", "port", "tls", "rate_limit",
     "max_connections", "data_timeout", "auth_lockout_failures", "client_rate_limit", "throttle_pause", "billing",
     "channels", "trigger", "api_key_file", "match", "retry", "hostname"]
)


def mutate(data, path, value):
    """``data`` with ``value`` put at the end of ``path`` (creating mappings as needed)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    node = dict(data) if isinstance(data, dict) else {}
    node[head] = mutate(node.get(head), rest, value)
    return node


@given(st.lists(st.tuples(st.lists(config_keys, min_size=1, max_size=4), values), max_size=4))
def test_config_loader_gives_a_config_or_a_config_error(mutations):
    data = _BASE_DATA
    for path, value in mutations:
        data = mutate(data, path, value)
    try:
        text = yaml.safe_dump(data)
    except yaml.YAMLError:
        return
    try:
        assert isinstance(parse_config(text, source="fuzz.yaml"), Config)
    except ConfigError as error:
        assert str(error).startswith("fuzz.yaml")


@given(st.text(max_size=200))
@example("server: [")
@example("- a\n- b")
@example("server: {listeners: [{name: a, port: 1}]}\nusers: {x: {channels: {}}}\naccounts: {}")
def test_config_loader_survives_any_text(text):
    try:
        parse_config(text, source="fuzz.yaml")
    except ConfigError as error:
        assert str(error).startswith("fuzz.yaml")
