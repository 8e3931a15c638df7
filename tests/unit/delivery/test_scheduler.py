"""relay.delivery.scheduler: what is tried when, in which transactions, and what is recorded.

A real Scheduler over a MemorySpool, with a fake upstream in place of open_connection: it
reads each transaction's text as a connection would and answers from a script. Waits are
for a condition (bounded), never a fixed sleep longer than a few poll intervals.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from relay.delivery import scheduler as scheduler_module
from relay.delivery.scheduler import Scheduler
from relay.delivery.sendcloud import queued_message_id
from relay.delivery.transport import Key, Result, Transaction
from relay.errors import SMTPReply
from relay.spool import ListQuery, NewMessage, OutcomeRows, State, new_queue_id
from relay.spool.memory import MemorySpool
from tests.unit.helpers import BASE, config_from

POLL = 0.01
RETRY = 0.1  # the whole retry schedule: one short delay, no jitter

# BASE's capture upstream needs no TLS contexts (upstream_tls gives None); the fake replaces
# the capture connections, so nothing touches the network or the disk.
CONFIG = BASE.replace(
    "upstream: {kind: capture}",
    "upstream: {kind: capture, max_recipients_per_transaction: 2, throttle_pause: 0.1, throttle_max_pause: 0.1}",
) + f"spool: {{poll_interval: {POLL}, retry: [{RETRY}], retry_jitter: 0}}\n"

TWO_ACCOUNTS = CONFIG.replace(
    "  acme_trigger: {api_user: acme_trigger, type: trigger, domain: acme.com}",
    "  acme_trigger: {api_user: acme_trigger, type: trigger, domain: acme.com}\n"
    "  acme_batch: {api_user: acme_batch, type: batch, domain: acme.com}",
).replace("channels: {trigger: acme_trigger}", "channels: {trigger: acme_trigger, batch: acme_batch}")


QUEUED = SMTPReply.received(250, "2.0.0 #MSG1#Queued")  # SendCloud's DATA reply: messageId MSG1


@dataclass
class Sent:
    api_user: str
    key: Key
    transaction: Transaction
    text: bytes
    at: float


@dataclass
class FakeUpstream:
    """The ``connect`` callable: makes fake connections and keeps what they were sent."""

    answer: Callable[[Sent], list[SMTPReply]] = lambda sent: [QUEUED] * len(sent.transaction.recipients)
    hold: asyncio.Event | None = None  # while set to an unset event, every send waits for it
    sent: list[Sent] = field(default_factory=list)
    opened: list[FakeConnection] = field(default_factory=list)
    sending: dict[str, int] = field(default_factory=dict)  # queue ID -> sends under way
    most_at_once: int = 0  # of one message
    down: bool = False  # while true, every send fails to connect (refused) and sends nothing
    connects_failed: int = 0

    def __call__(self, upstream, account, key, local_hostname, tls) -> FakeConnection:
        connection = FakeConnection(self, account.api_user, key)
        self.opened.append(connection)
        return connection


class FakeConnection:
    def __init__(self, upstream: FakeUpstream, api_user: str, key: Key):
        self.upstream, self.api_user, self.key = upstream, api_user, key
        self.closed = False

    async def send(self, transaction: Transaction) -> Result:
        upstream, queue_id = self.upstream, transaction.queue_id
        if upstream.down:
            upstream.connects_failed += 1
            refused = SMTPReply(None, None, "connect to fake[upstream]: Connection refused")
            return Result([refused] * len(transaction.recipients), None, "fake[upstream]", unreachable=True)
        upstream.sending[queue_id] = upstream.sending.get(queue_id, 0) + 1
        upstream.most_at_once = max(upstream.most_at_once, upstream.sending[queue_id])
        try:
            text = b"".join([chunk async for chunk in transaction.text])
            sent = Sent(self.api_user, self.key, transaction, text, time.time())
            upstream.sent.append(sent)
            if upstream.hold is not None:
                await upstream.hold.wait()
            replies = upstream.answer(sent)
        finally:
            upstream.sending[queue_id] -= 1
        ids = [queued_message_id(reply.text) for reply in replies if reply.code == 250]
        return Result(replies, ids[0] if ids else None, "fake[upstream]")

    async def close(self) -> None:
        self.closed = True


class Harness:
    def __init__(self, text: str, upstream: FakeUpstream, outcome_rows=None):
        self.config = config_from(text)
        self.spool = MemorySpool()
        self.upstream = upstream
        self.scheduler = Scheduler(lambda: self.config, self.spool, connect=upstream, outcome_rows=outcome_rows)

    def reconfigure(self, text: str) -> None:
        self.config = config_from(text)
        self.scheduler.reconfigure(None)

    async def intake(self, message: NewMessage) -> None:
        """As the process wiring does: durable first, then handed to delivery."""
        await self.spool.store(message)
        self.scheduler.submit(message)

    async def states(self, message_id: str) -> list[State]:
        return [recipient.state for recipient in (await self.spool.get(message_id)).recipients]


@pytest.fixture
async def start():
    harnesses: list[Harness] = []

    async def start(text: str = CONFIG, upstream: FakeUpstream | None = None, outcome_rows=None) -> Harness:
        harness = Harness(text, upstream or FakeUpstream(), outcome_rows)
        await harness.scheduler.start()
        harnesses.append(harness)
        return harness

    yield start
    for harness in harnesses:
        if harness.upstream.hold is not None:
            harness.upstream.hold.set()
        await harness.scheduler.stop(1.0)


async def until(condition: Callable[[], object], timeout: float = 3.0) -> None:
    """Wait for ``condition`` (sync or async) to hold; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.005)


def new_message(recipients=("a@example.org", "b@example.org"), sender: str = "billing@acme.com",
                account: str = "acme_trigger", body: bytes | None = None) -> NewMessage:
    message_id = new_queue_id()
    body = body if body is not None else f"From: {sender}\r\nSubject: {message_id}\r\n\r\nhello\r\n".encode()
    channel = "batch" if account == "acme_batch" else "trigger"
    return NewMessage(message_id, time.time(), "billing", "smtp", "10.20.0.5", account, channel,
                      sender, list(recipients), body)


def final(harness: Harness, message_id: str):
    async def check() -> bool:
        return all(state.final for state in await harness.states(message_id))
    return check


def by_address(replies: dict[str, SMTPReply], default: SMTPReply = QUEUED):
    return lambda sent: [replies.get(address, default) for address in sent.transaction.recipients]


# -- delivered, deferred, failed -----------------------------------------------------------------------


async def test_a_submitted_message_is_delivered_and_recorded_with_sendclouds_email_ids(start):
    harness = await start(upstream=FakeUpstream(answer=by_address({}, SMTPReply.received(250, "2.0.0 #5ZK1#Queued"))))
    message = new_message()
    await harness.intake(message)
    await until(final(harness, message.id))
    (sent,) = harness.upstream.sent
    assert (sent.api_user, sent.key) == ("acme_trigger", Key(None, "verify"))
    assert (sent.transaction.sender, sent.transaction.recipients) == ("billing@acme.com", ["a@example.org", "b@example.org"])
    recipients = (await harness.spool.get(message.id)).recipients
    assert [(r.state, r.attempts, r.email_id) for r in recipients] == [
        (State.DELIVERED, 1, "5ZK10$a@example.org"),
        (State.DELIVERED, 1, "5ZK11$b@example.org"),
    ]
    assert await harness.spool.list() == []  # final: the body is gone, `queue list` is empty


async def test_a_451_defers_on_the_retry_schedule_and_the_poller_tries_again_when_due(start):
    answers = iter([[SMTPReply.received(451, "4.3.0 try later")], [SMTPReply.received(250, "2.0.0 #M2#Queued")]])
    harness = await start(upstream=FakeUpstream(answer=lambda sent: next(answers)))
    message = new_message(recipients=("a@example.org",))
    before = time.time()
    await harness.intake(message)
    await until(lambda: harness.upstream.sent)
    await until(lambda: _first_state_is(harness, message.id, State.DEFERRED))
    (recipient,) = (await harness.spool.get(message.id)).recipients
    assert (recipient.attempts, recipient.last_reply) == (1, "451 4.3.0 try later")
    assert before + RETRY <= recipient.next_attempt <= time.time() + RETRY

    await until(final(harness, message.id))  # only the poller can bring it back: it was submitted once
    _, second = harness.upstream.sent
    assert second.at >= recipient.next_attempt
    (recipient,) = (await harness.spool.get(message.id)).recipients
    assert (recipient.state, recipient.attempts, recipient.email_id) == (State.DELIVERED, 2, "M20$a@example.org")


async def _first_state_is(harness: Harness, message_id: str, state: State) -> bool:
    return (await harness.states(message_id))[0] is state


async def test_a_550_fails_the_recipient_and_a_dsn_is_stored_and_delivered_to_the_sender(start):
    slow_poller = CONFIG.replace(f"poll_interval: {POLL}", "poll_interval: 60")  # only submit() can bring the DSN
    harness = await start(slow_poller, FakeUpstream(answer=by_address({"bad@example.org": SMTPReply.received(550, "5.1.1 no such user")})))
    message = new_message(recipients=("good@example.org", "bad@example.org"))
    await harness.intake(message)
    await until(final(harness, message.id))
    assert await harness.states(message.id) == [State.DELIVERED, State.FAILED]
    (dsn,) = [m for m in await harness.spool.list(ListQuery(include_final=True)) if m.id != message.id]
    assert (dsn.sender, dsn.listener, dsn.account, [r.address for r in dsn.recipients]) == (
        "", "bounce", "acme_trigger", ["billing@acme.com"],
    )
    await until(final(harness, dsn.id))  # submitted right away, not left for the poller to find
    bounce = harness.upstream.sent[-1]
    assert (bounce.transaction.queue_id, bounce.transaction.sender, bounce.transaction.recipients) == (
        dsn.id, "", ["billing@acme.com"],
    )
    assert b"bad@example.org" in bounce.text and b"5.1.1 no such user" in bounce.text
    assert b"good@example.org" not in bounce.text


async def test_a_failure_of_a_message_from_the_null_sender_makes_no_dsn(start):
    harness = await start(upstream=FakeUpstream(answer=by_address({}, SMTPReply.received(550, "5.1.1 no such user"))))
    message = new_message(recipients=("bad@example.org",), sender="")
    await harness.intake(message)
    await until(final(harness, message.id))
    await asyncio.sleep(5 * POLL)
    assert [m.id for m in await harness.spool.list(ListQuery(include_final=True))] == [message.id]
    assert len(harness.upstream.sent) == 1


# -- transactions ---------------------------------------------------------------------------------------


async def test_recipients_under_different_tls_policies_go_in_separate_transactions(start):
    text = CONFIG + "tls_rules:\n  - {domains: [secure.example], rule: verify}\n  - {rule: may}\n"
    harness = await start(text)
    message = new_message(recipients=("a@plain.example", "b@secure.example", "c@plain.example"))
    await harness.intake(message)
    await until(final(harness, message.id))
    assert [(s.key, s.transaction.recipients) for s in harness.upstream.sent] == [
        (Key(None, "may"), ["a@plain.example", "c@plain.example"]),
        (Key(None, "verify"), ["b@secure.example"]),
    ]
    assert sorted(connection.key.tls for connection in harness.upstream.opened) == ["may", "verify"]
    # SendCloud numbers recipients within each transaction.
    assert [r.email_id for r in (await harness.spool.get(message.id)).recipients] == [
        "MSG10$a@plain.example", "MSG10$b@secure.example", "MSG11$c@plain.example",
    ]


async def test_more_recipients_than_a_transaction_may_carry_are_split_in_rcpt_order(start):
    harness = await start()  # max_recipients_per_transaction: 2
    addresses = [f"r{n}@example.org" for n in range(5)]
    message = new_message(recipients=addresses)
    await harness.intake(message)
    await until(final(harness, message.id))
    assert [s.transaction.recipients for s in harness.upstream.sent] == [addresses[0:2], addresses[2:4], addresses[4:]]
    assert await harness.states(message.id) == [State.DELIVERED] * 5


async def test_the_text_streamed_upstream_is_the_spooled_message_with_x_smtpapi_to_per_transaction(start):
    addresses = ["a@example.org", "b@example.org", "c@example.org"]
    smtpapi = base64.b64encode(json.dumps({"to": addresses, "sub": {"%name%": ["A", "B", "C"]}}).encode())
    head = b"From: billing@acme.com\r\nX-SMTPAPI: " + smtpapi + b"\r\nSubject: big\r\n\r\n"
    rest = "Grüße, line of the body\r\n".encode() * 40_000  # ~1 MB over several spool chunks, 8-bit
    harness = await start()
    message = new_message(recipients=addresses, body=head + rest)
    await harness.intake(message)
    await until(final(harness, message.id))
    first, second = harness.upstream.sent
    for sent, wanted, names in [(first, addresses[:2], ["A", "B"]), (second, addresses[2:], ["C"])]:
        sent_head, sent_rest = sent.text.split(b"\r\n\r\n", 1)
        assert sent_rest == rest
        (header_field,) = [line for line in sent_head.split(b"\r\n") if line.startswith(b"X-SMTPAPI:")]
        value = json.loads(base64.b64decode(header_field.split(b":", 1)[1].strip()))
        assert (value["to"], value["sub"]["%name%"]) == (wanted, names)
        assert sent.transaction.size == len(sent.text)
        assert sent.transaction.eight_bit is True


async def test_without_x_smtpapi_every_transaction_streams_exactly_the_spooled_bytes(start):
    body = b"From: billing@acme.com\r\nSubject: s\r\n\r\n" + bytes(range(256)) * 3000
    harness = await start()
    message = new_message(recipients=[f"r{n}@example.org" for n in range(3)], body=body)
    await harness.intake(message)
    await until(final(harness, message.id))
    assert [sent.text for sent in harness.upstream.sent] == [body, body]
    assert [sent.transaction.size for sent in harness.upstream.sent] == [len(body), len(body)]


# -- one worker per message ----------------------------------------------------------------------------


async def test_a_message_is_never_in_two_workers_at_once(start):
    """Submitted twice, and due at every poll while its transaction is under way: sent once."""
    upstream = FakeUpstream(hold=asyncio.Event())
    harness = await start(upstream=upstream)  # four workers for the account
    message = new_message(recipients=("a@example.org",))
    await harness.intake(message)
    harness.scheduler.submit(message)
    await until(lambda: upstream.sent)
    await asyncio.sleep(10 * POLL)  # ten polls that find it due (queued, next_attempt in the past)
    harness.scheduler.submit(message)
    assert len(upstream.sent) == 1
    upstream.hold.set()
    await until(final(harness, message.id))
    await asyncio.sleep(5 * POLL)
    assert (len(upstream.sent), upstream.most_at_once) == (1, 1)


# -- reconfigure, throttling ---------------------------------------------------------------------------


async def test_mail_of_an_account_removed_by_reconfigure_waits_in_the_spool_until_it_is_back(start):
    upstream = FakeUpstream(hold=asyncio.Event())
    harness = await start(TWO_ACCOUNTS.replace("max_recipients_per_transaction: 2", "connections_per_account: 1"),
                          upstream)
    in_flight, waiting = new_message(account="acme_batch"), new_message(account="acme_batch")
    await harness.intake(in_flight)
    await harness.intake(waiting)  # behind it in the account's queue: one worker
    await until(lambda: upstream.sent)

    harness.reconfigure(CONFIG)  # acme_batch is gone
    upstream.hold.set()
    await until(final(harness, in_flight.id))  # the worker finishes the transaction it was in
    late = new_message(account="acme_batch")
    await harness.intake(late)

    async def both_wait() -> bool:  # deferred with the reason `queue show` gives, no attempt spent
        recipients = [r for stranded in (waiting, late) for r in (await harness.spool.get(stranded.id)).recipients]
        return {(r.state, r.attempts, r.last_reply) for r in recipients} == {
            (State.DEFERRED, 0, "account acme_batch is not configured"),
        }
    await until(both_wait)  # looked for after the reload, then once per the schedule's first delay
    assert [s.transaction.queue_id for s in upstream.sent] == [in_flight.id]

    harness.reconfigure(TWO_ACCOUNTS)  # back: the poller finds what waited
    await until(final(harness, waiting.id))
    await until(final(harness, late.id))
    assert sorted(s.transaction.queue_id for s in upstream.sent[1:]) == sorted([waiting.id, late.id])
    assert {s.api_user for s in upstream.sent} == {"acme_batch"}


async def test_536_frequency_limited_pauses_the_account_without_spending_an_attempt(start):
    answers = iter([[SMTPReply.received(536, "Frequency limited")], [SMTPReply.received(250, "2.0.0 #M3#Queued")]])
    upstream = FakeUpstream(answer=lambda sent: next(answers))
    harness = await start(upstream=upstream)  # throttle_pause: 0.1
    message = new_message(recipients=("a@example.org",))
    await harness.intake(message)
    await until(lambda: _first_state_is(harness, message.id, State.DEFERRED))
    throttle = harness.scheduler.throttles["acme_trigger"]
    assert throttle.pauses == 1 and throttle.remaining() > 0
    (recipient,) = (await harness.spool.get(message.id)).recipients
    assert recipient.attempts == 0
    assert recipient.last_reply == "536 Frequency limited (account paused; not counted as an attempt)"

    await until(final(harness, message.id))
    first, second = upstream.sent
    assert second.at - first.at >= 0.1 - 0.01  # not before the pause ended
    assert throttle.consecutive == 0  # the probe got through: the account runs again


# -- outcomes the spool refuses to record (disk full) ----------------------------------------------------


DISK_FULL = OSError(28, "No space left on device")


async def test_an_outcome_the_spool_cannot_record_is_held_and_the_message_is_never_sent_again(start):
    harness = await start()
    message = new_message(recipients=("a@example.org",))
    await harness.intake(message)
    harness.spool.fail_writes = DISK_FULL  # the store got through; the record after delivery will not
    await until(lambda: harness.scheduler.held_outcomes() == [message.id])
    await asyncio.sleep(20 * POLL)  # twenty polls that find it due (still queued on disk)
    harness.scheduler.submit(message)
    assert len(harness.upstream.sent) == 1
    assert await harness.states(message.id) == [State.QUEUED]

    harness.spool.fail_writes = None  # space returns: the held outcome is recorded by a retry
    await until(final(harness, message.id))
    await asyncio.sleep(5 * POLL)
    assert harness.scheduler.held_outcomes() == []
    (recipient,) = (await harness.spool.get(message.id)).recipients
    assert (recipient.state, recipient.attempts, recipient.email_id) == (State.DELIVERED, 1, "MSG10$a@example.org")
    assert len(harness.upstream.sent) == 1


async def test_each_transaction_is_recorded_before_the_next_is_sent(start):
    """Two transactions (at most 2 recipients each): the first one's record fails, so the second
    waits until it is on disk; every recipient is sent exactly once."""
    harness = await start()
    addresses = ["a@example.org", "b@example.org", "c@example.org"]
    message = new_message(recipients=addresses)
    await harness.intake(message)
    harness.spool.fail_writes = DISK_FULL
    await until(lambda: harness.scheduler.held_outcomes() == [message.id])
    await asyncio.sleep(10 * POLL)
    assert [s.transaction.recipients for s in harness.upstream.sent] == [addresses[:2]]

    harness.spool.fail_writes = None
    await until(final(harness, message.id))
    await asyncio.sleep(5 * POLL)
    assert [s.transaction.recipients for s in harness.upstream.sent] == [addresses[:2], addresses[2:]]
    assert await harness.states(message.id) == [State.DELIVERED] * 3


async def test_a_held_failure_gets_exactly_one_dsn_once_it_is_recorded(start):
    harness = await start(upstream=FakeUpstream(answer=by_address({}, SMTPReply.received(550, "5.1.1 no such user"))))
    message = new_message(recipients=("bad@example.org",))
    await harness.intake(message)
    harness.spool.fail_writes = DISK_FULL
    await until(lambda: harness.scheduler.held_outcomes() == [message.id])
    await asyncio.sleep(5 * POLL)
    harness.spool.fail_writes = None
    await until(final(harness, message.id))
    (dsn,) = [m for m in await harness.spool.list(ListQuery(include_final=True)) if m.id != message.id]
    await until(final(harness, dsn.id))
    await asyncio.sleep(5 * POLL)
    assert [s.transaction.queue_id for s in harness.upstream.sent] == [message.id, dsn.id]


# -- mail of an account that is not configured ------------------------------------------------------------


async def test_600_recipients_of_an_unconfigured_account_do_not_block_a_deliverable_one(start):
    harness = await start()
    stranded = [
        new_message(recipients=[f"r{n}@example.org" for n in range(100)], account="gone_account")
        for _ in range(6)
    ]
    for message in stranded:  # due before the deliverable one, and stored only: the poller must find all
        await harness.spool.store(message)
    deliverable = new_message(recipients=("a@example.org",))
    await harness.spool.store(deliverable)
    await until(final(harness, deliverable.id))
    assert {s.transaction.queue_id for s in harness.upstream.sent} == {deliverable.id}

    async def all_waiting() -> bool:
        recipients = [r for m in stranded for r in (await harness.spool.get(m.id)).recipients]
        return {(r.state, r.attempts, r.last_reply) for r in recipients} == {
            (State.DEFERRED, 0, "account gone_account is not configured"),
        }
    await until(all_waiting)


async def test_mail_of_an_unconfigured_account_expires_at_max_lifetime_with_a_dsn_through_the_users_account(start):
    harness = await start()
    old = dataclasses.replace(new_message(recipients=("a@example.org",), account="gone_account"),
                              received_at=time.time() - 6 * 86400)  # max_lifetime: 5 days
    await harness.spool.store(old)
    await until(final(harness, old.id))
    (recipient,) = (await harness.spool.get(old.id)).recipients
    assert (recipient.state, recipient.attempts) == (State.FAILED, 0)
    assert recipient.last_reply.startswith("account gone_account is not configured (gave up")
    (dsn,) = [m for m in await harness.spool.list(ListQuery(include_final=True)) if m.id != old.id]
    assert (dsn.account, [r.address for r in dsn.recipients]) == ("acme_trigger", ["billing@acme.com"])
    await until(final(harness, dsn.id))
    (bounce,) = harness.upstream.sent
    assert b"Status: 4.4.7" in bounce.text and b"a@example.org" in bounce.text


# -- races ------------------------------------------------------------------------------------------------


async def test_a_probe_that_fails_before_sending_does_not_leave_the_account_paused(start, monkeypatch):
    """After a pause, one worker probes alone; if its transaction fails before it is sent, the
    probe must still be given back, or every worker of the account waits for good."""
    harness = await start()
    throttle = harness.scheduler.throttles["acme_trigger"]
    throttle.consecutive = 1  # a pause just ended: the next transaction is the probe
    real, raised = scheduler_module.for_transaction, []

    def failing_once(head, addresses):
        if not raised:
            raised.append(addresses)
            raise ValueError("unreadable X-SMTPAPI")
        return real(head, addresses)

    monkeypatch.setattr(scheduler_module, "for_transaction", failing_once)
    first, second = new_message(recipients=("a@example.org",)), new_message(recipients=("b@example.org",))
    await harness.intake(first)
    await until(lambda: raised)
    await harness.intake(second)
    await until(final(harness, second.id))
    await until(final(harness, first.id))  # the poller retries the one that failed


async def test_a_dsn_that_cannot_be_made_does_not_send_the_message_again(start, monkeypatch):
    """A bug in building DSNs once made every failed delivery raise after the upstream had
    answered: the outcome was never recorded and the message went out again at every poll."""
    def broken_dsn(**fields):
        raise TypeError("a bug in the DSN")

    monkeypatch.setattr(scheduler_module, "build_dsn", broken_dsn)
    harness = await start(upstream=FakeUpstream(answer=by_address({"bad@example.org": SMTPReply.received(550, "5.1.1 no")})))
    message = new_message(recipients=("good@example.org", "bad@example.org"))
    await harness.intake(message)
    await until(final(harness, message.id))
    await asyncio.sleep(10 * POLL)
    assert await harness.states(message.id) == [State.DELIVERED, State.FAILED]
    assert len(harness.upstream.sent) == 1


async def test_stopping_records_a_held_outcome_when_the_spool_takes_it_again():
    harness = Harness(CONFIG, FakeUpstream())
    await harness.scheduler.start()
    message = new_message(recipients=("a@example.org",))
    await harness.intake(message)
    harness.spool.fail_writes = DISK_FULL
    await until(lambda: harness.scheduler.held_outcomes() == [message.id])
    harness.spool.fail_writes = None
    harness.scheduler._held[message.id].next_try = float("inf")  # not before the stop
    await harness.scheduler.stop(1.0)
    assert await harness.states(message.id) == [State.DELIVERED]
    assert harness.scheduler.held_outcomes() == []


# -- the events stage's rows ----------------------------------------------------------------------------


async def test_the_events_stages_rows_are_recorded_in_the_outcomes_own_write(start):
    def rows(message, updates):
        delivered = sum(update.state is State.DELIVERED for update in updates)
        return OutcomeRows((("2026-12-01T10", "user", message.user, "requested", delivered),))

    harness = await start(outcome_rows=rows)
    await until(lambda: harness.spool.commits == 1)  # the poller's first purge of old mail
    message = new_message()
    await harness.intake(message)
    await until(final(harness, message.id))
    assert await harness.spool.stats("2026-12-01T10") == [("2026-12-01T10", "user", "billing", "requested", 2)]
    assert harness.spool.commits == 3  # then the message, then its outcome with its counters


async def test_rows_that_cannot_be_made_never_keep_a_known_outcome_off_the_disk(start):
    def broken(message, updates):
        raise KeyError("a bug in the events stage")

    harness = await start(outcome_rows=broken)
    message = new_message()
    await harness.intake(message)
    await until(final(harness, message.id))
    await asyncio.sleep(5 * POLL)
    assert await harness.states(message.id) == [State.DELIVERED, State.DELIVERED]
    assert len(harness.upstream.sent) == 1  # recorded without its counters, never sent again


# -- a new message's body, kept from its intake ---------------------------------------------------------


@pytest.mark.parametrize(("size", "kept_for", "reads"), [
    (5_000, 1.0, 0),  # small, taken at once: sent from memory, no spool read
    (70_000, 1.0, 1),  # past _KEPT_BODY: read from the spool
    (5_000, -1.0, 1),  # kept too long (a `queue delete` meanwhile must be seen): read again
])
async def test_a_new_small_message_is_sent_from_its_kept_body_only_while_fresh(start, monkeypatch, size, kept_for, reads):
    monkeypatch.setattr(scheduler_module, "_KEPT_FOR", kept_for)
    harness = await start()
    started = []
    spool_start = harness.spool.start

    async def counted(message_id):
        started.append(message_id)
        return await spool_start(message_id)

    harness.spool.start = counted
    message = new_message(body=b"From: billing@acme.com\r\nSubject: kept\r\n\r\n" + b"x" * size + b"\r\n")
    await harness.intake(message)
    await until(final(harness, message.id))
    assert len(started) == reads
    assert [sent.text for sent in harness.upstream.sent] == [message.body]


async def test_a_kept_body_is_not_sent_after_its_account_was_paused(start):
    """Waiting out a pause, a message may be deleted: it is read after the pause, not sent from memory."""
    harness = await start()
    harness.scheduler.throttles["acme_trigger"].release(await harness.scheduler.throttles["acme_trigger"].acquire(), True)
    assert harness.scheduler.throttles["acme_trigger"].remaining() > 0
    message = new_message()
    await harness.intake(message)
    await harness.spool.delete(message.id)
    await asyncio.sleep(0.3)  # the pause (throttle_pause 0.1) is over
    assert harness.upstream.sent == []
