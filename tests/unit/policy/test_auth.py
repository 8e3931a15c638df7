"""relay.policy.auth: password hashes, the Authenticator and its cache, the failure delay."""

from __future__ import annotations

import asyncio
import base64
import hashlib

import pytest

import relay.policy.auth
from relay.config.formats import is_supported_hash
from relay.policy.auth import (
    Authenticator,
    AuthGuard,
    GuardSettings,
    hash_password,
    mark_slot,
    marks,
    recent_failures,
    should_lock,
    verify_password,
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def scrypt_hash(password: str, salt: bytes = b"0123456789abcdef", ln: int = 4, r: int = 8, p: int = 1) -> str:
    """A PHC-style scrypt hash built independently of relay.policy.auth (unpadded base64)."""
    derived = hashlib.scrypt(password.encode(), salt=salt, n=1 << ln, r=r, p=p, dklen=32)
    return f"$scrypt$ln={ln},r={r},p={p}${b64(salt)}${b64(derived)}"


# -- hashes --------------------------------------------------------------------------------------


def test_hash_password_round_trip():
    """What `hash-password` prints verifies the same password and no other."""
    stored = hash_password("correct horse")
    assert stored.startswith("$argon2id$")
    assert verify_password(stored, "correct horse")
    assert not verify_password(stored, "correct horse ")
    assert not verify_password(stored, "")


def test_hash_password_is_salted():
    assert hash_password("same") != hash_password("same")


SCRYPT_CASES = {
    "right_password": ("s3cret", True),
    "wrong_password": ("s3cres", False),
    "empty_password": ("", False),
    "non_ascii_password": ("pässwörd", False),
}


@pytest.mark.parametrize("attempt, ok", SCRYPT_CASES.values(), ids=SCRYPT_CASES.keys())
def test_scrypt_hash_from_elsewhere_verifies(attempt, ok):
    """Operators' existing scrypt hashes in PHC form verify with the standard library."""
    assert verify_password(scrypt_hash("s3cret"), attempt) is ok


def test_scrypt_hash_with_non_ascii_password_verifies():
    assert verify_password(scrypt_hash("pässwörd"), "pässwörd")


def test_scrypt_hash_with_padded_base64_also_verifies():
    padded = scrypt_hash("s3cret").split("$")
    padded[3] += "=" * (-len(padded[3]) % 4)
    padded[4] += "=" * (-len(padded[4]) % 4)
    assert verify_password("$".join(padded), "s3cret")


GARBAGE = {
    "empty": "",
    "plaintext": "s3cret",
    "argon2_truncated": "$argon2id$v=19$m=65536,t=3,p=4$abc",
    "argon2_not_base64": "$argon2id$v=19$m=65536,t=3,p=4$!!!!$!!!!",
    "scrypt_no_fields": "$scrypt$",
    "scrypt_missing_param": "$scrypt$ln=4,r=8$c2FsdA$aGFzaA",
    "scrypt_param_not_number": "$scrypt$ln=x,r=8,p=1$c2FsdA$aGFzaA",
    "scrypt_too_many_fields": "$scrypt$ln=4,r=8,p=1$c2FsdA$aGFzaA$extra",
    "scrypt_huge_cost": "$scrypt$ln=40,r=8,p=1$c2FsdA$aGFzaA",
    "scrypt_ln_zero": "$scrypt$ln=0,r=8,p=1$c2FsdA$aGFzaA",
    "scrypt_empty_hash": "$scrypt$ln=4,r=8,p=1$c2FsdA$",
    "unknown_scheme": "$6$saltsalt$abcdefghijkl",
}


@pytest.mark.parametrize("stored", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_hash_never_verifies(stored):
    """A malformed stored hash is a failed login (False), never an exception or a success."""
    assert verify_password(stored, "s3cret") is False


SUPPORTED = {
    "argon2id": (hash_password("x"), True),
    "scrypt": (scrypt_hash("x"), True),
    "plaintext": ("hunter2", False),
    "argon2i_is_not_argon2id": ("$argon2i$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA", False),
    "scrypt_missing_param": ("$scrypt$ln=4,r=8$c2FsdA$aGFzaA", False),
    "scrypt_wrong_field_count": ("$scrypt$ln=4,r=8,p=1$c2FsdA", False),
    "sha512_crypt": ("$6$saltsalt$abcdefghijkl", False),
    "scrypt_empty_hash": ("$scrypt$ln=4,r=8,p=1$c2FsdA$", False),
}


@pytest.mark.parametrize("stored, supported", SUPPORTED.values(), ids=SUPPORTED.keys())
def test_is_supported_hash(stored, supported):
    """Config accepts only hashes the relay can verify."""
    assert is_supported_hash(stored) is supported


# -- Authenticator ---------------------------------------------------------------------------------


@pytest.fixture
def verify_calls(monkeypatch):
    """Counts calls to relay.policy.auth.verify_password (still doing the real check)."""
    calls = []
    real = relay.policy.auth.verify_password

    def counting(password_hash, password):
        calls.append((password_hash, password))
        return real(password_hash, password)

    monkeypatch.setattr(relay.policy.auth, "verify_password", counting)
    return calls


@pytest.fixture
def hashes():
    return {"billing": scrypt_hash("billing-secret"), "mailhub": None}


CHECKS = {
    "right_password": ("billing", "billing-secret", True),
    "wrong_password": ("billing", "billing-secreT", False),
    "empty_password": ("billing", "", False),
    "unknown_user": ("nobody", "billing-secret", False),
    "user_without_password": ("mailhub", "anything", False),
    "username_case_matters": ("Billing", "billing-secret", False),
}


@pytest.mark.parametrize("username, password, ok", CHECKS.values(), ids=CHECKS.keys())
async def test_authenticator_check(hashes, username, password, ok):
    assert await Authenticator(lambda: hashes).check(username, password) is ok


async def test_unknown_user_still_pays_for_a_verification(hashes, verify_calls):
    """An unknown user costs a hash check too, so guessers cannot tell users apart by timing."""
    assert not await Authenticator(lambda: hashes).check("nobody", "x")
    assert len(verify_calls) == 1


async def test_good_credentials_are_cached(hashes, verify_calls):
    """A smarthost reconnecting with the same credentials does not pay for the hash again."""
    auth = Authenticator(lambda: hashes)
    assert await auth.check("billing", "billing-secret")
    assert await auth.check("billing", "billing-secret")
    assert len(verify_calls) == 1


async def test_simultaneous_logins_share_one_verification(hashes, verify_calls):
    """A smarthost opening 20 connections at once after a restart pays for one hash, not 20."""
    auth = Authenticator(lambda: hashes)
    results = await asyncio.gather(*(auth.check("billing", "billing-secret") for _ in range(20)))
    wrong = await asyncio.gather(*(auth.check("billing", "wrong") for _ in range(3)))
    assert results == [True] * 20 and wrong == [False] * 3
    assert len(verify_calls) == 2


async def test_cache_does_not_serve_a_different_password(hashes, verify_calls):
    auth = Authenticator(lambda: hashes)
    assert await auth.check("billing", "billing-secret")
    assert not await auth.check("billing", "billing-secret2")
    assert len(verify_calls) == 2


async def test_failures_are_not_cached(hashes, verify_calls):
    auth = Authenticator(lambda: hashes)
    assert not await auth.check("billing", "wrong")
    assert not await auth.check("billing", "wrong")
    assert len(verify_calls) == 2


async def test_changed_hash_invalidates_the_cache(hashes):
    """A reload that changes a user's password stops the old one at once."""
    auth = Authenticator(lambda: hashes)
    assert await auth.check("billing", "billing-secret")
    hashes["billing"] = scrypt_hash("new-secret")
    assert not await auth.check("billing", "billing-secret")
    assert await auth.check("billing", "new-secret")


async def test_removed_user_is_refused_despite_the_cache(hashes):
    auth = Authenticator(lambda: hashes)
    assert await auth.check("billing", "billing-secret")
    del hashes["billing"]
    assert not await auth.check("billing", "billing-secret")


async def test_expired_cache_entry_verifies_again(hashes, verify_calls):
    auth = Authenticator(lambda: hashes, cache_ttl=0)
    assert await auth.check("billing", "billing-secret")
    assert await auth.check("billing", "billing-secret")
    assert len(verify_calls) == 2


# -- AuthGuard: delay, then lockout, per address and per username --------------------------------


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def guard(base=1.0, cap=30.0, window=600.0, lockout_failures=1000, lockout_duration=900.0) -> tuple[AuthGuard, Clock]:
    clock = Clock()
    settings = GuardSettings(base, window, lockout_failures, lockout_duration, cap)
    return AuthGuard(lambda: settings, clock=clock), clock


DELAYS = {
    "base_1_cap_30": (1.0, 30.0, [1, 2, 4, 8, 16, 30, 30, 30]),
    "base_half_cap_3": (0.5, 3.0, [0.5, 1, 2, 3, 3]),
    "cap_below_base": (2.0, 1.0, [1, 1]),
}


@pytest.mark.parametrize("base, cap, expected", DELAYS.values(), ids=DELAYS.keys())
def test_failure_delay_doubles_up_to_the_cap(base, cap, expected):
    """Each recent failure doubles the delay before the 535; it never exceeds max_delay."""
    auth, _ = guard(base, cap)
    assert [auth.failed("192.0.2.7", "billing") for _ in expected] == expected


def test_failure_delay_counts_per_address_and_per_username():
    auth, _ = guard()
    for _ in range(4):
        auth.failed("192.0.2.7", "billing")
    assert auth.failed("192.0.2.8", "crm") == 1.0  # a fresh address and a fresh user
    assert auth.failed("192.0.2.9", "billing") == 16.0  # a fresh address guessing billing
    assert auth.failed("192.0.2.7", "other") == 16.0  # the guessing address trying another user


def test_failures_outside_the_window_are_forgotten():
    """A person who mistyped yesterday starts again at the base delay."""
    auth, clock = guard(window=600.0)
    for _ in range(3):
        auth.failed("192.0.2.7", "billing")
    clock.now += 601
    assert auth.failed("192.0.2.7", "billing") == 1.0


LOCKOUTS = {
    # name: (failures as (address, user), then the attempt asked about, expect locked?)
    "below_threshold": ([("a1", "billing")] * 2, ("a1", "billing"), False),
    "address_reaches_threshold": ([("a1", f"user{n}") for n in range(3)], ("a1", "anyone"), True),
    "username_reaches_threshold": ([(f"a{n}", "billing") for n in range(3)], ("a9", "billing"), True),
    "other_user_from_other_address_unaffected": ([("a1", "billing")] * 3, ("a2", "crm"), False),
}


@pytest.mark.parametrize("failures, attempt, locked", LOCKOUTS.values(), ids=LOCKOUTS.keys())
def test_lockout_past_the_threshold(failures, attempt, locked):
    auth, _ = guard(lockout_failures=3)
    for address, username in failures:
        auth.failed(address, username)
    assert (auth.locked_for(*attempt) is not None) is locked


def test_lockout_lasts_its_duration_then_lifts():
    auth, clock = guard(lockout_failures=3, lockout_duration=900.0, window=60.0)
    for _ in range(3):
        auth.failed("192.0.2.7", "billing")
    assert auth.locked_for("192.0.2.7", "billing") == pytest.approx(900.0)
    clock.now += 899
    assert auth.locked_for("192.0.2.7", "billing") == pytest.approx(1.0)
    clock.now += 2
    assert auth.locked_for("192.0.2.7", "billing") is None


def test_an_address_that_logged_in_recently_is_not_locked_out_by_strangers_guessing_its_user():
    auth, _ = guard(lockout_failures=3)
    auth.succeeded("10.0.0.5", "mailhub")  # the team's smarthost
    for n in range(5):
        auth.failed(f"203.0.113.{n}", "mailhub")  # a botnet guessing
    assert auth.locked_for("203.0.113.99", "mailhub") is not None
    assert auth.locked_for("10.0.0.5", "mailhub") is None
    for _ in range(3):  # but the smarthost's own address still locks if it keeps failing
        auth.failed("10.0.0.5", "mailhub")
    assert auth.locked_for("10.0.0.5", "mailhub") is not None


KEYS = {"billing": (scrypt_hash("key-one"), scrypt_hash("key-two")), "nokeys": ()}
KEY_CHECKS = {
    "first_key": ("billing", "key-one", True),
    "second_key": ("billing", "key-two", True),
    "no_such_key": ("billing", "key-three", False),
    "user_without_keys": ("nokeys", "key-one", False),
}


@pytest.mark.parametrize("username, key, ok", KEY_CHECKS.values(), ids=KEY_CHECKS.keys())
async def test_any_of_a_users_api_keys_matches(username, key, ok):
    assert await Authenticator(lambda: KEYS).check(username, key) is ok


async def test_a_user_without_keys_still_pays_for_a_verification(verify_calls):
    assert not await Authenticator(lambda: KEYS).check("nokeys", "x")
    assert len(verify_calls) == 1


# -- AuthGuard across nodes: the pure parts (the nodes themselves: tests/unit/spool/test_postgres_nodes.py)

MARK_SLOTS = {
    "to_the_second": ("auth-lock:user:billing", 1000.2, 1.0, ("auth-lock:user:billing", 1.0, 1001)),
    "exact_second": ("auth-lock:user:billing", 1000.0, 1.0, ("auth-lock:user:billing", 1.0, 1000)),
    "to_the_minute": ("auth-good:10.0.0.5 mailhub", 1000.0, 60.0, ("auth-good:10.0.0.5 mailhub", 60.0, 17)),
}


@pytest.mark.parametrize("key, until, grain, slot", MARK_SLOTS.values(), ids=MARK_SLOTS.keys())
def test_a_mark_ends_at_its_window_rounded_up(key, until, grain, slot):
    assert mark_slot(key, until, grain) == slot
    assert marks([(slot, 1)], key[: key.index(":") + 1])[key[key.index(":") + 1 :]] >= until


def test_marks_keep_the_latest_end_per_key_and_ignore_other_keys_and_given_back_counts():
    slots = [
        (("auth-lock:user:a", 1.0, 1000), 1),
        (("auth-lock:user:a", 1.0, 1200), 2),  # two nodes locked it
        (("auth-lock:user:b", 1.0, 1500), 0),
        (("auth-fail:user:a", 600.0, 1), 9),
    ]
    assert marks(slots, "auth-lock:") == {"user:a": 1200.0}


RECENT = {
    "alone": (3, 3.0, 3),
    "others_saw_more": (1, 4.0, 4),
    "estimate_rounds_up": (1, 2.2, 3),
    "float_noise_is_not_a_failure": (2, 2.0000000001, 2),
    "estimate_below_the_exact_count": (5, 3.5, 5),
}


@pytest.mark.parametrize("here, shared, expected", RECENT.values(), ids=RECENT.keys())
def test_recent_failures_take_whichever_count_says_more(here, shared, expected):
    assert recent_failures(here, shared) == expected


SHOULD_LOCK = {
    # (shared failures, locked until, expected), threshold 5, window 600, now 10_000
    "below_threshold": (4, None, False),
    "at_threshold": (5, None, True),
    "locked_already": (7, 10_500.0, False),
    "lock_lifted_within_the_window": (7, 9_900.0, False),
    "lock_lifted_before_the_window": (7, 9_300.0, True),
}


@pytest.mark.parametrize("failures, locked_until, expected", SHOULD_LOCK.values(), ids=SHOULD_LOCK.keys())
def test_when_the_shared_count_alone_locks(failures, locked_until, expected):
    settings = GuardSettings(1.0, 600.0, 5, 900.0)
    assert should_lock(failures, locked_until, 10_000.0, settings) is expected
