"""relay.delivery.retry: a recipient's next state after one attempt, as a table."""

from __future__ import annotations

import pytest

from relay.delivery.retry import (
    RetryPolicy,
    after_attempt,
    is_account_throttle,
    is_temporary,
    message_retry_at,
    retry_delay,
    while_unconfigured,
)
from relay.errors import SMTPReply
from relay.spool import Recipient, State

SCHEDULE = (60.0, 300.0, 900.0)
POLICY = RetryPolicy(schedule=SCHEDULE, jitter=0.1, max_lifetime=86400.0)
EXACT = RetryPolicy(schedule=SCHEDULE, jitter=0.0, max_lifetime=86400.0)
RECEIVED = 1_700_000_000.0
NOW = RECEIVED + 3600.0


def recipient(attempts: int = 0) -> Recipient:
    return Recipient("3ZK7Q9M2XD4HWT", 1, "someone@example.org", State.QUEUED, attempts, RECEIVED)


OUTCOMES = {
    "250_delivered": (SMTPReply.received(250, "#1426390015358_15_6484_8661.sc-10_10_127_51-inbound#Queued"), State.DELIVERED),
    "251_delivered": (SMTPReply.received(251, "2.1.5 forwarded"), State.DELIVERED),
    "550_failed": (SMTPReply.received(550, "5.1.1 user unknown"), State.FAILED),
    "554_failed": (SMTPReply.received(554, "5.7.1 rejected"), State.FAILED),
    "535_bad_api_key_failed": (SMTPReply.received(535, "5.7.8 authentication failed"), State.FAILED),
    "451_deferred": (SMTPReply.received(451, "4.7.1 try again later"), State.DEFERRED),
    "421_deferred": (SMTPReply.received(421, "4.4.2 closing connection"), State.DEFERRED),
    "452_deferred": (SMTPReply.received(452, "4.5.3 too many recipients"), State.DEFERRED),
    "536_frequency_limited_deferred": (SMTPReply.received(536, "Frequency limited"), State.DEFERRED),
    "5xx_request_quota_exceeded_deferred": (SMTPReply.received(550, "Request quota exceeded"), State.DEFERRED),
    "5xx_quota_text_any_case_deferred": (SMTPReply.received(554, "request QUOTA exceeded for today"), State.DEFERRED),
    "5xx_mailbox_quota_still_bounces": (SMTPReply.received(552, "5.2.2 mailbox quota exceeded"), State.FAILED),
    "connection_error_deferred": (SMTPReply.received(None, "connect to smtp.sendcloud.net[587]: Connection refused"), State.DEFERRED),
    "login_refused_without_code_deferred": (SMTPReply.received(None, "upstream refused login or greeting: 535 bad"), State.DEFERRED),
}


@pytest.mark.parametrize("reply, state", OUTCOMES.values(), ids=OUTCOMES.keys())
def test_after_attempt_state(reply, state):
    """2xx delivers, 5xx fails, 4xx and no reply defer; SendCloud's 536 and quota replies defer."""
    update = after_attempt(recipient(attempts=2), reply, RECEIVED, NOW, POLICY, 0.5)
    assert update.state is state
    assert (update.message_id, update.idx) == ("3ZK7Q9M2XD4HWT", 1)
    assert update.attempts == 3
    assert update.last_reply == str(reply)
    if state is not State.DEFERRED:
        assert update.next_attempt == NOW


def test_delivered_keeps_the_email_id():
    update = after_attempt(recipient(), SMTPReply.received(250, "#mid#Queued"), RECEIVED, NOW, POLICY, 0.5, email_id="mid0$someone@example.org")
    assert update.state is State.DELIVERED
    assert update.email_id == "mid0$someone@example.org"
    assert update.last_reply == "250 #mid#Queued"


def test_failed_and_deferred_carry_no_email_id():
    for reply in (SMTPReply.received(550, "no"), SMTPReply.received(451, "later")):
        assert after_attempt(recipient(), reply, RECEIVED, NOW, POLICY, 0.5, email_id="x").email_id is None


def test_reply_without_code_is_recorded_as_its_text():
    update = after_attempt(recipient(), SMTPReply.received(None, "connect to x[25]: timed out"), RECEIVED, NOW, POLICY, 0.5)
    assert update.last_reply == "connect to x[25]: timed out"


# -- when the next attempt happens ------------------------------------------------------------------

DEFERRALS = {
    "first_failure": (0, 60.0),
    "second_failure": (1, 300.0),
    "third_failure": (2, 900.0),
    "last_delay_repeats": (3, 900.0),
    "last_delay_repeats_forever": (20, 900.0),
}
FRACTIONS = {"low": 0.0, "middle": 0.5, "high": 0.999999}


@pytest.mark.parametrize("fraction", FRACTIONS.values(), ids=FRACTIONS.keys())
@pytest.mark.parametrize("attempts_before, base", DEFERRALS.values(), ids=DEFERRALS.keys())
def test_the_message_retries_on_the_schedule_within_jitter(attempts_before, base, fraction):
    """retry at = start of the delivery + the schedule's delay for this failure, ± jitter; the last delay repeats."""
    retry_at = message_retry_at([attempts_before + 1], NOW, RECEIVED, POLICY, fraction)
    assert NOW + base * 0.9 <= retry_at <= NOW + base * 1.1


@pytest.mark.parametrize("attempts_before, base", DEFERRALS.values(), ids=DEFERRALS.keys())
def test_the_message_retries_exactly_on_the_schedule_without_jitter(attempts_before, base):
    assert message_retry_at([attempts_before + 1], NOW, RECEIVED, EXACT, 0.123) == NOW + base


MESSAGE_RETRIES = {  # (attempts of each recipient after this delivery, fraction) -> delay from the start
    "one_recipient": (([1],), 0.5, 60.0),
    "five_alike": (([1, 1, 1, 1, 1],), 0.5, 60.0),
    "the_fewest_attempts_decide": (([3, 1, 2],), 0.5, 60.0),
    "all_on_the_later_schedule": (([3, 2, 2],), 0.5, 300.0),
    "one_jitter_for_all": (([2, 2],), 0.0, 270.0),
}


@pytest.mark.parametrize("attempts, fraction, delay", MESSAGE_RETRIES.values(), ids=MESSAGE_RETRIES.keys())
def test_a_message_has_one_retry_time_for_all_its_deferred_recipients(attempts, fraction, delay):
    assert message_retry_at(*attempts, NOW, RECEIVED, POLICY, fraction) == pytest.approx(NOW + delay)


def test_every_deferred_recipient_of_a_delivery_gets_the_messages_retry_time():
    retry_at = message_retry_at([1, 3], NOW, RECEIVED, POLICY, 0.7)
    updates = [after_attempt(recipient(attempts), SMTPReply.received(451, "later"), RECEIVED, NOW + 5, POLICY, retry_at)
               for attempts in (0, 2)]
    assert [(u.state, u.attempts, u.next_attempt) for u in updates] == [
        (State.DEFERRED, 1, retry_at), (State.DEFERRED, 3, retry_at),
    ]


RETRY_DELAYS = {
    "after_1": (1, 60.0),
    "after_2": (2, 300.0),
    "after_3": (3, 900.0),
    "after_4_repeats_last": (4, 900.0),
    "after_100_repeats_last": (100, 900.0),
}


@pytest.mark.parametrize("attempts, expected", RETRY_DELAYS.values(), ids=RETRY_DELAYS.keys())
def test_retry_delay_without_jitter_is_exact(attempts, expected):
    for fraction in (0.0, 0.5, 0.99):
        assert retry_delay(attempts, EXACT, fraction) == expected


JITTERED = {"fraction_0_is_lowest": (0.0, 54.0), "fraction_half_is_base": (0.5, 60.0)}


@pytest.mark.parametrize("fraction, expected", JITTERED.values(), ids=JITTERED.keys())
def test_retry_delay_jitter_bounds(fraction, expected):
    assert retry_delay(1, POLICY, fraction) == pytest.approx(expected)


def test_retry_delay_jitter_stays_below_upper_bound():
    assert retry_delay(1, POLICY, 0.999999) < 66.0


# -- lifetime -----------------------------------------------------------------------------------

EXPIRED = {
    "exactly_at_deadline": RECEIVED + 86400.0,
    "past_deadline": RECEIVED + 10 * 86400.0,
}


@pytest.mark.parametrize("now", EXPIRED.values(), ids=EXPIRED.keys())
def test_temporary_failure_past_lifetime_fails_for_good(now):
    """Past max_lifetime a temporary failure becomes final, and says why."""
    update = after_attempt(recipient(7), SMTPReply.received(451, "4.7.1 greylisted"), RECEIVED, now, POLICY, 0.5)
    assert update.state is State.FAILED
    assert "gave up" in update.last_reply
    assert "451 4.7.1 greylisted" in update.last_reply
    assert update.attempts == 8


def test_success_past_lifetime_is_still_delivered():
    update = after_attempt(recipient(7), SMTPReply.received(250, "ok"), RECEIVED, RECEIVED + 10 * 86400, POLICY, 0.5)
    assert update.state is State.DELIVERED


CLAMPS = {
    "delay_would_pass_deadline": (RECEIVED + 86400.0 - 10.0, RECEIVED + 86400.0),
    "one_second_left": (RECEIVED + 86400.0 - 1.0, RECEIVED + 86400.0),
}


@pytest.mark.parametrize("now, expected", CLAMPS.values(), ids=CLAMPS.keys())
def test_the_retry_time_is_clamped_to_the_deadline(now, expected):
    """The last try happens at the deadline, not one full delay after it."""
    assert message_retry_at([1], now, RECEIVED, POLICY, 0.999) == expected
    update = after_attempt(recipient(), SMTPReply.received(451, "later"), RECEIVED, now, POLICY, now + 60)
    assert (update.state, update.next_attempt) == (State.DEFERRED, expected)


def test_a_retry_well_before_the_deadline_is_not_clamped():
    assert message_retry_at([1], NOW, RECEIVED, EXACT, 0.5) == NOW + 60.0 < RECEIVED + 86400.0


TEMPORARY = {
    "none": (SMTPReply.received(None, "x"), True),
    "4xx": (SMTPReply.received(450, "mailbox busy"), True),
    "536": (SMTPReply.received(536, "Frequency limited"), True),
    "frequency_text_other_code": (SMTPReply.received(550, "frequency limited"), True),
    "5xx": (SMTPReply.received(550, "5.1.1 user unknown"), False),
    "2xx": (SMTPReply.received(250, "ok"), False),
}


@pytest.mark.parametrize("reply, temporary", TEMPORARY.values(), ids=TEMPORARY.keys())
def test_is_temporary(reply, temporary):
    assert is_temporary(reply) is temporary


THROTTLES = {
    "536_frequency_limited": (SMTPReply.received(536, "Frequency limited"), True),
    "request_quota_exceeded": (SMTPReply.received(550, "Request quota exceeded"), True),
    "4xx_rate_limit": (SMTPReply.received(451, "4.7.1 rate limit exceeded for this account"), True),
    "421_too_many_connections": (SMTPReply.received(421, "4.7.0 Too many connections"), True),
    "4xx_other": (SMTPReply.received(451, "4.3.0 try again later"), False),
    "mailbox_quota_is_the_recipients": (SMTPReply.received(452, "4.2.2 mailbox quota exceeded"), False),
    "5xx_rate_words_are_permanent": (SMTPReply.received(550, "5.7.1 you are on a rate limit blocklist"), False),
    "connection_error": (SMTPReply.received(None, "connect to smtp.sendcloud.net[587]: Connection refused"), False),
    "delivered": (SMTPReply.received(250, "#mid#Queued"), False),
}


@pytest.mark.parametrize("reply, throttle", THROTTLES.values(), ids=THROTTLES.keys())
def test_account_throttle_replies(reply, throttle):
    """Replies about the account's rate or quota, not the recipient, pause the account."""
    assert is_account_throttle(reply) is throttle


def test_held_recipient_waits_for_the_pause_without_spending_an_attempt():
    update = after_attempt(recipient(attempts=2), SMTPReply.received(536, "Frequency limited"), RECEIVED, NOW, POLICY, 0.5, held_until=NOW + 30)
    assert update.state is State.DEFERRED
    assert update.attempts == 2
    assert update.next_attempt == NOW + 30
    assert "account paused" in update.last_reply


def test_held_recipient_still_expires_at_the_end_of_its_lifetime():
    short = RetryPolicy(schedule=SCHEDULE, jitter=0.0, max_lifetime=3600.0)
    expired = after_attempt(recipient(), SMTPReply.received(536, "Frequency limited"), RECEIVED, NOW, short, 0.5, held_until=NOW + 30)
    assert expired.state is State.FAILED
    near = after_attempt(recipient(), SMTPReply.received(536, "Frequency limited"), RECEIVED, NOW - 10, short, 0.5, held_until=NOW + 30)
    assert near.next_attempt == RECEIVED + 3600.0  # never past the deadline


WAITING = "account gone is not configured"


@pytest.mark.parametrize(
    "attempts, now, expected",
    [
        (0, NOW, (State.DEFERRED, 0, NOW + 60.0, WAITING, None)),
        (2, NOW, (State.DEFERRED, 2, NOW + 60.0, WAITING, None)),  # not an attempt: the count stays
        (0, RECEIVED + 86400.0 - 10, (State.DEFERRED, 0, RECEIVED + 86400.0, WAITING, None)),  # not past the deadline
        (1, RECEIVED + 86400.0, (State.FAILED, 1, RECEIVED + 86400.0,
                                 WAITING + " (gave up: message older than the spool's max_lifetime)", "4.4.7")),
    ],
    ids=["waits_first_delay", "keeps_attempts", "capped_at_deadline", "expires_with_4.4.7"],
)
def test_a_recipient_of_an_unconfigured_account_waits_then_expires(attempts, now, expected):
    update = while_unconfigured(recipient(attempts), "gone", RECEIVED, now, EXACT)
    assert (update.state, update.attempts, update.next_attempt, update.last_reply, update.dsn_status) == expected
