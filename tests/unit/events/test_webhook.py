"""relay.events.webhook: SendCloud-shaped requests in, one event and its checks out."""

from __future__ import annotations

import hashlib
import hmac
import json
from urllib.parse import urlencode

import pytest

from relay.events.webhook import (
    dedupe_keys,
    event_time,
    is_probe,
    is_stale,
    parse_webhook,
    relay_ids,
    signature_ok,
    split_list,
    to_event,
)

FORM = "application/x-www-form-urlencoded"
APP_KEY = "sc_app_key_5f2b1e"
TOKEN = "q3mL7vT2yXbN0cF8gH1jK4pR6sW9uZ2aC5eD7fG0hJ3kM6nP8r"  # 50 characters, as SendCloud's
TS_MS = "1426390020183"
# Computed outside Python: printf '%s' "$TS$TOKEN" | openssl dgst -sha256 -hmac "$APP_KEY"
SIG_MS = "7eea012ac0f911f4990eec00927e19414f25a18d9904df7d8aa66cd33975a2e1"
SIG_S = "34f6c4d90e2e367fe1d0eae801b08678b456ea2b38872463c0b284667a0813ce"  # timestamp 1426390020
MESSAGE_ID = "1426390015358_15_6484_8661.sc-10_10_127_51-inbound"
EMAIL_ID = f"{MESSAGE_ID}0$Someone@Example.org"
USER_HEADERS = json.dumps({"SC-Custom-Relay-Id": "3ZK7Q9M2XD4HWT", "SC-Custom-Relay-User": "billing"})


def sign(timestamp: str, token: str, key: str = APP_KEY) -> str:
    return hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()


def deliver_fields(**overrides) -> dict[str, str]:
    fields = {
        "event": "deliver",
        "message": "deliver",
        "apiUser": "acme_trigger",
        "category": "acme_trigger",
        "labelId": "12345",
        "emailId": EMAIL_ID,
        "recipient": "Someone@Example.org",
        "timestamp": TS_MS,
        "token": TOKEN,
        "signature": SIG_MS,
        "userHeaders": USER_HEADERS,
        "outIp": "183.61.1.2",
    }
    fields.update(overrides)
    return fields


def test_the_test_vector_is_the_documented_algorithm():
    """Guards the hard-coded vector itself: hex(HMAC-SHA256(app_key, timestamp + token))."""
    assert sign(TS_MS, TOKEN) == SIG_MS
    assert sign("1426390020", TOKEN) == SIG_S


# --- parsing ----------------------------------------------------------------------------

def test_form_encoded_deliver_parses_to_its_fields():
    body = urlencode(deliver_fields()).encode()
    assert parse_webhook(body, FORM) == deliver_fields()


def test_json_deliver_parses_to_the_same_fields_with_numbers_as_text():
    data = {**deliver_fields(), "timestamp": int(TS_MS), "labelId": 12345}
    fields = parse_webhook(json.dumps(data).encode(), "application/json; charset=utf-8")
    assert fields == deliver_fields()


def test_json_number_text_is_kept_exactly_for_the_signature():
    body = b'{"event":"open","timestamp":1426390020183.0,"token":"t","signature":"s"}'
    assert parse_webhook(body, "application/json")["timestamp"] == "1426390020183.0"


def test_json_nested_values_become_compact_json_and_userheaders_object_is_accepted():
    body = json.dumps({"event": "open", "userHeaders": {"SC-Custom-Relay-Id": "Q1"}, "n": None, "b": True}).encode()
    fields = parse_webhook(body, "application/json")
    assert fields["userHeaders"] == '{"SC-Custom-Relay-Id":"Q1"}'
    assert (fields["n"], fields["b"]) == ("", "true")
    assert relay_ids(to_event(fields)) == ("Q1", None)


REQUEST_LISTS = {
    "repeated_keys": [("emailIds", "m0$a@x.org"), ("emailIds", "m1$b@x.org")],
    "php_brackets": [("emailIds[]", "m0$a@x.org"), ("emailIds[]", "m1$b@x.org")],
    "json_array_string": [("emailIds", '["m0$a@x.org", "m1$b@x.org"]')],
    "java_tostring": [("emailIds", "[m0$a@x.org, m1$b@x.org]")],
    "comma_separated": [("emailIds", "m0$a@x.org,m1$b@x.org")],
    "semicolon_separated": [("emailIds", "m0$a@x.org; m1$b@x.org;")],
}


@pytest.mark.parametrize("pairs", REQUEST_LISTS.values(), ids=REQUEST_LISTS.keys())
def test_request_email_ids_in_every_form_encoding(pairs):
    body = urlencode([("event", "request"), ("messageId", "m"), *pairs]).encode()
    event = to_event(parse_webhook(body, FORM))
    assert event.email_ids == ("m0$a@x.org", "m1$b@x.org")
    assert event.all_email_ids == ("m0$a@x.org", "m1$b@x.org")
    assert event.email_id is None


def test_json_request_with_a_real_array():
    body = json.dumps({"event": "request", "messageId": "m", "emailIds": ["m0$a@x.org", "m1$b@x.org"]}).encode()
    assert to_event(parse_webhook(body, "application/json")).email_ids == ("m0$a@x.org", "m1$b@x.org")


UNREADABLE = {
    "scalar_field_twice": (b"event=deliver&timestamp=1&timestamp=2", FORM),
    "json_array_body": (b'[{"event": "deliver"}]', "application/json"),
    "json_broken": (b'{"event": ', "application/json"),
    "bad_utf8_in_form": (b"event=deliver&recipient=%ff%fe", FORM),
    "bad_utf8_raw_json": (b'{"event": "\xff"}', "application/json"),
    "multipart_not_supported": (b"--x\r\n", "multipart/form-data; boundary=x"),
    "unknown_charset": (b"event=deliver", FORM + "; charset=no-such-charset"),
    "text_plain": (b"event=deliver", "text/plain"),
}


@pytest.mark.parametrize("body, content_type", UNREADABLE.values(), ids=UNREADABLE.keys())
def test_unreadable_bodies_are_none(body, content_type):
    assert parse_webhook(body, content_type) is None


SNIFFED = {
    "json_without_content_type": (b' {"event": "open"}', {"event": "open"}),
    "form_without_content_type": (b"event=open", {"event": "open"}),
    "empty_form_is_a_probe": (b"", {}),
    "vendor_json_suffix": (b'{"event": "open"}', {"event": "open"}),
}


@pytest.mark.parametrize("body, fields", SNIFFED.values(), ids=SNIFFED.keys())
def test_content_type_missing_or_suffixed(body, fields):
    content_type = "application/vnd.sc+json" if body.startswith(b"{") else ""
    assert parse_webhook(body, content_type) == fields


# --- the event --------------------------------------------------------------------------

ALIASES = {
    "deliver": ("deliver", True),
    "delivered": ("deliver", True),
    "Delivered": ("deliver", True),
    "spam-report": ("report_spam", True),
    "report_spam": ("report_spam", True),
    "invalid_email": ("invalid", True),
    "soft_bounce": ("soft_bounce", True),
    "route": ("route", True),
    "bounce_v2": ("bounce_v2", False),
    "": ("", False),
}


@pytest.mark.parametrize("raw, expected", ALIASES.items(), ids=[name or "empty" for name in ALIASES])
def test_event_names_are_canonical_and_unknown_ones_flagged(raw, expected):
    event = to_event(deliver_fields(event=raw))
    assert (event.event, event.known) == expected
    assert event.event_raw == raw


def test_deliver_event_fields():
    event = to_event(deliver_fields())
    assert event.email_id == EMAIL_ID
    assert event.all_email_ids == (EMAIL_ID,)
    assert event.recipient == "Someone@Example.org"
    assert event.recipient_key == "someone@example.org"
    assert (event.api_user, event.label_id) == ("acme_trigger", "12345")
    assert event.timestamp_raw == TS_MS
    assert event.time == pytest.approx(1426390020.183)
    assert (event.token, event.signature) == (TOKEN, SIG_MS)
    assert event.details == {"message": "deliver", "category": "acme_trigger", "outIp": "183.61.1.2"}
    assert relay_ids(event) == ("3ZK7Q9M2XD4HWT", "billing")


def test_invalid_event_keeps_substat_in_details():
    fields = deliver_fields(event="invalid", subStat="406", subStatDesc="address does not exist")
    details = to_event(fields).details
    assert (details["subStat"], details["subStatDesc"]) == ("406", "address does not exist")
    assert "token" not in details and "signature" not in details


def test_route_event_keeps_its_fields_and_finds_the_recipient_in_the_email_id():
    fields = {
        "event": "route", "from": "someone@example.org", "fromname": "Some One", "to": "reply@info.acme.com",
        "subject": "Re: your invoice", "text": "thanks", "reference": "<20261201.Q@relay.acme.internal>",
        "emailId": EMAIL_ID, "timestamp": TS_MS, "token": TOKEN, "signature": SIG_MS, "userHeaders": USER_HEADERS,
    }
    event = to_event(fields)
    assert event.recipient == "Someone@Example.org"
    assert event.details == {key: fields[key] for key in ("from", "fromname", "to", "subject", "text", "reference")}


def test_api_user_falls_back_to_category():
    fields = deliver_fields()
    del fields["apiUser"]
    assert to_event(fields).api_user == "acme_trigger"


TIMES = {
    "milliseconds": ("1426390020183", 1426390020.183),
    "seconds": ("1426390020", 1426390020.0),
    "seconds_with_fraction": ("1426390020.5", 1426390020.5),
    "just_below_1e11_is_seconds": ("99999999999", 99999999999.0),
    "1e11_is_milliseconds": ("100000000000", 100000000.0),
    "not_a_number": ("yesterday", None),
    "empty": ("", None),
    "nan": ("nan", None),
    "infinite": ("inf", None),
    "negative": ("-5", None),
}


@pytest.mark.parametrize("raw, seconds", TIMES.values(), ids=TIMES.keys())
def test_event_time_ms_or_s(raw, seconds):
    assert event_time(raw) == (pytest.approx(seconds) if seconds is not None else None)


USER_HEADER_VALUES = {
    "bad_json": ("{not json", {}),
    "json_list": ('["a"]', {}),
    "empty": ("", {}),
    "keys_kept_as_sent": ('{"sc-custom-relay-id": "Q2", "SC-Custom-N": 3}', {"sc-custom-relay-id": "Q2", "SC-Custom-N": "3"}),
}


@pytest.mark.parametrize("raw, headers", USER_HEADER_VALUES.values(), ids=USER_HEADER_VALUES.keys())
def test_user_headers(raw, headers):
    assert to_event(deliver_fields(userHeaders=raw)).user_headers == headers


RELAY_IDS = {
    "exact_case": ('{"SC-Custom-Relay-Id": "Q1", "SC-Custom-Relay-User": "billing"}', ("Q1", "billing")),
    "lower_case": ('{"sc-custom-relay-id": "Q1", "sc-custom-relay-user": "billing"}', ("Q1", "billing")),
    "upper_case": ('{"SC-CUSTOM-RELAY-ID": " Q1 "}', ("Q1", None)),
    "empty_values": ('{"SC-Custom-Relay-Id": "", "SC-Custom-Relay-User": " "}', (None, None)),
    "other_headers_only": ('{"SC-Custom-Campaign": "x"}', (None, None)),
    "bad_json": ("{", (None, None)),
}


@pytest.mark.parametrize("raw, ids", RELAY_IDS.values(), ids=RELAY_IDS.keys())
def test_relay_ids(raw, ids):
    assert relay_ids(to_event(deliver_fields(userHeaders=raw))) == ids


def test_split_list_keeps_one_value():
    assert split_list("m0$a@x.org") == ("m0$a@x.org",)
    assert split_list("  ") == ()


# --- signature, age, duplicates, probe ---------------------------------------------------

SIGNATURES = {
    "ms_timestamp": (APP_KEY, TS_MS, TOKEN, SIG_MS, True),
    "s_timestamp": (APP_KEY, "1426390020", TOKEN, SIG_S, True),
    "uppercase_hex": (APP_KEY, TS_MS, TOKEN, SIG_MS.upper(), True),
    "wrong_key": ("another_key", TS_MS, TOKEN, SIG_MS, False),
    "timestamp_reformatted": (APP_KEY, "1426390020183.0", TOKEN, SIG_MS, False),
    "timestamp_in_seconds_but_signed_in_ms": (APP_KEY, "1426390020", TOKEN, SIG_MS, False),
    "other_token": (APP_KEY, TS_MS, TOKEN[:-1] + "x", SIG_MS, False),
    "truncated_signature": (APP_KEY, TS_MS, TOKEN, SIG_MS[:-2], False),
    "non_ascii_signature": (APP_KEY, TS_MS, TOKEN, "é" * 64, False),
    "missing_signature": (APP_KEY, TS_MS, TOKEN, "", False),
    "missing_token": (APP_KEY, TS_MS, "", sign(TS_MS, ""), False),
    "missing_timestamp": (APP_KEY, "", TOKEN, sign("", TOKEN), False),
    "missing_app_key": ("", TS_MS, TOKEN, sign(TS_MS, TOKEN, ""), False),
}


@pytest.mark.parametrize("key, timestamp, token, signature, ok", SIGNATURES.values(), ids=SIGNATURES.keys())
def test_signature_ok(key, timestamp, token, signature, ok):
    assert signature_ok(key, timestamp, token, signature) is ok


@pytest.mark.parametrize("content_type", [FORM, "application/json"])
def test_signed_sample_events_verify_end_to_end(content_type):
    """A body as SendCloud sends it, parsed and checked with the fields as received."""
    fields = deliver_fields(timestamp="1426390020", signature=SIG_S)
    if content_type == FORM:
        body = urlencode(fields).encode()
    else:
        body = json.dumps({**fields, "timestamp": 1426390020}).encode()
    event = to_event(parse_webhook(body, content_type))
    assert signature_ok(APP_KEY, event.timestamp_raw, event.token, event.signature)
    assert not signature_ok("wrong", event.timestamp_raw, event.token, event.signature)


NOW = 1_800_000_000.0
HOUR = 3600.0
AGES = {
    "now": (NOW, False),
    "a_minute_old": (NOW - 60, False),
    "exactly_max_age_old": (NOW - HOUR, False),
    "just_older_than_max_age": (NOW - HOUR - 0.001, True),
    "a_day_old": (NOW - 86400, True),
    "clock_skew_ahead": (NOW + 30, False),
    "exactly_max_age_ahead": (NOW + HOUR, False),
    "far_in_the_future": (NOW + HOUR + 1, True),
    "no_time": (None, True),
}


@pytest.mark.parametrize("t, stale", AGES.values(), ids=AGES.keys())
def test_is_stale(t, stale):
    assert is_stale(t, NOW, HOUR) is stale


def test_stale_from_a_millisecond_timestamp():
    event = to_event(deliver_fields(timestamp=str(int((NOW - 2 * HOUR) * 1000))))
    assert is_stale(event.time, NOW, HOUR)
    assert not is_stale(event.time, NOW - HOUR, HOUR)


def test_redelivery_with_same_token_shares_a_key():
    first = to_event(deliver_fields())
    again = to_event(deliver_fields(timestamp="1426390099999", signature="x"))  # new timestamp, same token
    assert set(dedupe_keys(first)) & set(dedupe_keys(again))


def test_redelivery_with_new_token_shares_the_event_key():
    first = to_event(deliver_fields())
    again = to_event(deliver_fields(token="another-token", event="delivered"))  # alias spelling, same event
    assert set(dedupe_keys(first)) & set(dedupe_keys(again))


DISTINCT = {
    "other_event": {"event": "open", "token": "t2"},
    "other_email_id": {"emailId": f"{MESSAGE_ID}1$other@example.org", "token": "t2"},
    "other_timestamp": {"timestamp": "1426390020184", "token": "t2"},
}


@pytest.mark.parametrize("changes", DISTINCT.values(), ids=DISTINCT.keys())
def test_different_events_share_no_key(changes):
    assert not set(dedupe_keys(to_event(deliver_fields()))) & set(dedupe_keys(to_event(deliver_fields(**changes))))


def test_events_without_email_id_of_two_recipients_in_one_millisecond_share_no_key():
    def mapped_by_headers(recipient: str):
        headers = '{"SC-Custom-Relay-Id": "3ZK7Q9M2XD4HWT"}'
        return to_event({"event": "open", "recipient": recipient, "userHeaders": headers, "timestamp": "1", "token": ""})

    assert dedupe_keys(mapped_by_headers("a@x.org")) == ("event:open:3ZK7Q9M2XD4HWT:a@x.org:1",)
    assert not set(dedupe_keys(mapped_by_headers("a@x.org"))) & set(dedupe_keys(mapped_by_headers("b@x.org")))


def test_dedupe_keys_of_a_request_use_its_message_id_and_skip_an_empty_token():
    fields = {"event": "request", "messageId": "m", "emailIds": "m0$a@x.org", "timestamp": "1"}
    assert dedupe_keys(to_event(fields)) == ("event:request:m:1",)


PROBES = {
    "empty": ({}, True),
    "no_event_but_other_fields": ({"timestamp": TS_MS}, True),
    "empty_event_is_not_a_probe": ({"event": ""}, False),
    "an_event": ({"event": "deliver"}, False),
}


@pytest.mark.parametrize("fields, probe", PROBES.values(), ids=PROBES.keys())
def test_is_probe(fields, probe):
    assert is_probe(fields) is probe
