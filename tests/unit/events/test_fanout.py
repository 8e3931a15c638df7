"""relay.events.fanout: the teams' payload, its signature, and the outbox's retry schedule."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from relay.events.fanout import KEEP_FOR, MAX_RETRY, gives_up, next_retry, payload, signature_header, verify

SECRET = b"billing-events-secret"
NOW = 1_800_000_000


def sample(**overrides) -> bytes:
    args = dict(
        id="ev_01J9Z8", event="deliver", queue_id="3ZK7Q9M2XD4HWT", recipient="someone@example.org", user="billing",
        account="acme_trigger", channel="trigger", label=None, timestamp="1426390020183",
        email_id="1426390015358_15_6484_8661.sc-10_10_127_51-inbound0$someone@example.org", details={"outIp": "183.61.1.2"},
    )
    args.update(overrides)
    return payload(**args)


def test_payload_is_compact_json_with_the_spec_keys_in_order():
    body = sample()
    assert body == (
        b'{"id":"ev_01J9Z8","event":"deliver","queue_id":"3ZK7Q9M2XD4HWT","recipient":"someone@example.org",'
        b'"user":"billing","account":"acme_trigger","channel":"trigger","label":null,"timestamp":1426390020183,'
        b'"email_id":"1426390015358_15_6484_8661.sc-10_10_127_51-inbound0$someone@example.org",'
        b'"details":{"outIp":"183.61.1.2"}}'
    )


TIMESTAMPS = {
    "digits_string_becomes_number": ("1426390020183", 1426390020183),
    "int_stays": (1426390020183, 1426390020183),
    "fraction_string_kept_as_sent": ("1426390020.5", "1426390020.5"),
    "none": (None, None),
}


@pytest.mark.parametrize("given, sent", TIMESTAMPS.values(), ids=TIMESTAMPS.keys())
def test_payload_timestamp(given, sent):
    assert json.loads(sample(timestamp=given))["timestamp"] == sent


def test_payload_is_utf8_and_relay_failures_fit_the_same_shape():
    body = sample(event="failed", email_id=None, label=12345, details={"reason": "suppressed (unsubscribe 2026-11-30)", "主题": "账单"})
    data = json.loads(body.decode("utf-8"))
    assert "主题".encode() in body  # not \u-escaped
    assert (data["event"], data["email_id"], data["label"]) == ("failed", None, 12345)
    assert data["details"] == {"reason": "suppressed (unsubscribe 2026-11-30)", "主题": "账单"}
    assert json.loads(sample(details=None))["details"] == {}


def test_signature_header_is_the_documented_hmac():
    body = sample()
    expected = hmac.new(SECRET, f"{NOW}.".encode() + body, hashlib.sha256).hexdigest()
    assert signature_header(SECRET, body, NOW) == f"t={NOW},v1={expected}"


def test_signature_header_known_vector():
    # printf '%s' '1800000000.{"id":"x"}' | openssl dgst -sha256 -hmac billing-events-secret
    assert signature_header(SECRET, b'{"id":"x"}', NOW) == (
        "t=1800000000,v1=68b97a4f8ec2e384aba83332e2c2d2464a76d0940d59144f60235fa5c50a04a5"
    )


VERIFY = {
    "fresh": (lambda h, b: (h, SECRET, b, NOW), True),
    "within_tolerance_later": (lambda h, b: (h, SECRET, b, NOW + 300), True),
    "too_old": (lambda h, b: (h, SECRET, b, NOW + 301), False),
    "from_the_future": (lambda h, b: (h, SECRET, b, NOW - 301), False),
    "other_secret": (lambda h, b: (h, b"other", b, NOW), False),
    "body_changed": (lambda h, b: (h, SECRET, b + b" ", NOW), False),
    "timestamp_changed": (lambda h, b: (h.replace(f"t={NOW}", f"t={NOW + 1}"), SECRET, b, NOW), False),
    "rotation_second_v1_matches": (lambda h, b: (h.replace("v1=", "v1=00,v1="), SECRET, b, NOW), True),
    "spaces_after_commas": (lambda h, b: (h.replace(",", ", "), SECRET, b, NOW), True),
    "no_t": (lambda h, b: (h.split(",")[1], SECRET, b, NOW), False),
    "no_v1": (lambda h, b: (h.split(",")[0], SECRET, b, NOW), False),
    "t_not_a_number": (lambda h, b: (h.replace(f"t={NOW}", "t=soon"), SECRET, b, NOW), False),
    "empty": (lambda h, b: ("", SECRET, b, NOW), False),
    "non_ascii_v1": (lambda h, b: (f"t={NOW},v1=é", SECRET, b, NOW), False),
}


@pytest.mark.parametrize("make, ok", VERIFY.values(), ids=VERIFY.keys())
def test_verify(make, ok):
    body = sample()
    header = signature_header(SECRET, body, NOW)
    assert verify(*make(header, body), tolerance=300) is ok


RETRIES = {  # attempt, random fraction, delay
    "first_without_jitter": (1, 0.5, 5.0),
    "second": (2, 0.5, 10.0),
    "third": (3, 0.5, 20.0),
    "seventh": (7, 0.5, 320.0),
    "eighth_capped": (8, 0.5, 600.0),
    "far_later_still_capped": (10_000, 0.5, 600.0),
    "first_low_jitter": (1, 0.0, 4.0),
    "first_high_jitter": (1, 0.999999, 5.999994),
    "seventh_high_jitter": (7, 0.99, 320 * 1.196),
    "cap_holds_after_jitter": (8, 0.999, 600.0),
    "cap_low_jitter_below_cap": (8, 0.0, 512.0),
    "attempt_zero_as_first": (0, 0.5, 5.0),
}


@pytest.mark.parametrize("attempt, fraction, delay", RETRIES.values(), ids=RETRIES.keys())
def test_next_retry(attempt, fraction, delay):
    assert next_retry(attempt, fraction) == pytest.approx(delay)


def test_retries_start_at_seconds_grow_and_never_exceed_ten_minutes():
    for fraction in (0.0, 0.3, 0.999):
        delays = [next_retry(attempt, fraction) for attempt in range(1, 40)]
        assert delays[0] < 10
        assert all(later >= earlier for earlier, later in zip(delays, delays[1:]))
        assert max(delays) <= MAX_RETRY


def test_the_schedule_keeps_trying_for_the_whole_keep_period():
    """Following the schedule, tries continue until KEEP_FOR and stop then (≥ 24 h, as the spec asks)."""
    first = 0.0
    t, attempt, tries = first, 0, 0
    while not gives_up(first, t):
        tries += 1
        attempt += 1
        t += next_retry(attempt, 0.5)
    assert KEEP_FOR >= 24 * 3600
    assert KEEP_FOR <= t < KEEP_FOR + MAX_RETRY
    assert tries > 250  # 10-minute tries over two days, after the first few quick ones


GIVES_UP = {
    "just_started": (0.0, 60.0, KEEP_FOR, False),
    "one_day": (0.0, 86400.0, KEEP_FOR, False),
    "just_before": (0.0, KEEP_FOR - 1, KEEP_FOR, False),
    "at_keep_for": (0.0, KEEP_FOR, KEEP_FOR, True),
    "custom_keep": (100.0, 100.0 + 3600, 3600.0, True),
}


@pytest.mark.parametrize("first, now, keep, expected", GIVES_UP.values(), ids=GIVES_UP.keys())
def test_gives_up(first, now, keep, expected):
    assert gives_up(first, now, keep) is expected


def test_default_keep_is_48_hours():
    assert KEEP_FOR == 48 * 3600
    assert not gives_up(0.0, 47 * 3600) and gives_up(0.0, 48 * 3600)
