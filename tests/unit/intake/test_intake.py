"""The one intake: what SMTP DATA and HTTP submission both get (prepare, budgets, store, refusals)."""

from __future__ import annotations

import asyncio

import pytest

from relay.errors import SMTPReply
from relay.intake import Intake, Refused
from relay.policy.rates import PersistentRates
from relay.rewrite.pipeline import Preparer, Submission
from tests.unit.helpers import BASE, config_from

CONFIG = config_from(BASE + "    rate_limit: 3/hour\n")
MESSAGE = b"From: a@acme.com\r\nTo: b@example.com\r\nSubject: hi\r\n\r\nbody\r\n"


class NoStore:
    """A RateStore that keeps nothing (the counter itself is what the intake reads)."""

    async def save(self, unsaved, now):
        return {}

    async def close(self):
        pass


def submission(recipients=("b@example.com",), data=MESSAGE) -> Submission:
    return Submission(user="billing", listener="http_api", sender="a@acme.com", recipients=list(recipients),
                      data=bytearray(data), helo="", client_ip="127.0.0.1", esmtp=True, tls=None,
                      authenticated_user="billing")


@pytest.fixture
def preparer():
    made = Preparer()
    yield made
    made.close()


def intake(preparer, store) -> Intake:
    return Intake(lambda: CONFIG, preparer, PersistentRates(NoStore()), store)


def test_a_stored_message_is_routed_rewritten_and_charged(preparer):
    stored = []

    async def store(message):
        stored.append(message)

    taking = intake(preparer, store)
    message = asyncio.run(taking.accept(submission(("b@example.com", "c@example.com")), 0.0, label=7))
    assert stored == [message]
    assert (message.account, message.channel, message.listener, message.label) == ("acme_trigger", "trigger", "http_api", 7)
    body = b"".join(bytes(piece) for piece in message.body)
    assert body.startswith(b"Received: ") and body.endswith(b"\r\n\r\nbody\r\n")
    assert taking.over_rate([("user billing", "user:billing", CONFIG.users["billing"].rate_limit)], 2) is not None
    assert taking.over_rate([("user billing", "user:billing", CONFIG.users["billing"].rate_limit)], 1) is None


def test_a_store_that_fails_gives_the_budget_back_and_refuses_with_451(preparer):
    async def store(message):
        raise OSError("disk full")

    taking = intake(preparer, store)
    with pytest.raises(Refused) as refused:
        asyncio.run(taking.accept(submission(("b@example.com", "c@example.com", "d@example.com")), 0.0))
    assert (refused.value.reply.code, refused.value.reply.enhanced) == (451, "4.3.0")
    assert refused.value.fields["nrcpt"] == 3
    assert taking.rates.counter.used("user:billing", 3600.0) == 0


def test_over_the_budget_nothing_is_stored(preparer):
    stored = []

    async def store(message):
        stored.append(message)

    taking = intake(preparer, store)
    with pytest.raises(Refused) as refused:
        asyncio.run(taking.accept(submission([f"r{n}@example.com" for n in range(4)]), 0.0))
    assert refused.value.reply.enhanced == "4.7.1" and stored == []


@pytest.mark.parametrize(("user", "address", "so_far", "code"), [
    ("billing", "b@example.com", 0, None),
    (None, "b@example.com", 0, 554),        # nobody owns the message
    ("billing", "b@example.com", 1000, 452),  # server.max_recipients
    ("billing", "b@example.com", 3, 451),   # the user's 3/hour
])
def test_each_recipient_is_judged_as_smtp_judges_rcpt(preparer, user, address, so_far, code):
    refusal: SMTPReply | None = intake(preparer, None).recipient_refusal(CONFIG, user, "127.0.0.1", address, so_far)
    assert (refusal.code if refusal else None) == code
