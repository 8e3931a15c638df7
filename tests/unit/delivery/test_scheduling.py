"""relay.delivery.scheduler as a queue manager: per-message retries, the bounded active queue,
and the dead-destination gate (issue 13).

The same harness as test_scheduler.py (a real Scheduler over a MemorySpool and a fake
upstream); the unreachable-upstream cases use the real SMTP transport against sockets on
127.0.0.1 (a closed port, a listener that never answers), then a real SMTP server there.
"""

from __future__ import annotations

import asyncio
import socket
import time

from aiosmtpd.smtp import SMTP

from relay.delivery.transport import open_connection
from relay.errors import SMTPReply
from relay.spool import State
from tests.unit.delivery.test_scheduler import (
    CONFIG,
    POLL,
    QUEUED,
    FakeUpstream,
    Harness,
    final,
    new_message,
    start,  # noqa: F401 - the fixture
    until,
)

PER_100 = CONFIG.replace("max_recipients_per_transaction: 2", "max_recipients_per_transaction: 100")
JITTERED = "retry: [0.2], retry_jitter: 0.5"  # a jitter per recipient would spread them over 0.1 to 0.3 s


def later(answers: list[list[SMTPReply] | None]):
    """Answers in turn, one list of replies per transaction (None: every recipient accepted)."""
    script = iter(answers)

    def answer(sent):
        replies = next(script, None)
        return replies if replies is not None else [QUEUED] * len(sent.transaction.recipients)
    return answer


def sizes(upstream: FakeUpstream, message_id: str) -> list[int]:
    return [len(s.transaction.recipients) for s in upstream.sent if s.transaction.queue_id == message_id]


# -- one retry time per message ------------------------------------------------------------------------------


async def test_a_5_recipient_message_deferred_by_a_451_retries_at_one_time_as_one_transaction(start):
    text = PER_100.replace("retry: [0.1], retry_jitter: 0", JITTERED)
    harness = await start(text, FakeUpstream(answer=later([[SMTPReply.received(451, "4.3.0 try later")] * 5])))
    message = new_message(recipients=[f"r{n}@example.org" for n in range(5)])
    await harness.intake(message)
    await until(lambda: _deferred(harness, message.id, 5))
    recipients = (await harness.spool.get(message.id)).recipients
    assert len({r.next_attempt for r in recipients}) == 1
    assert {r.attempts for r in recipients} == {1}

    await until(final(harness, message.id))
    assert sizes(harness.upstream, message.id) == [5, 5]
    assert await harness.states(message.id) == [State.DELIVERED] * 5


async def _deferred(harness: Harness, message_id: str, count: int) -> bool:
    return (await harness.states(message_id)).count(State.DEFERRED) == count


async def test_recipients_deferred_over_several_transactions_share_one_retry_time_and_come_back_together(start):
    """Two per transaction: 2 + 2 + 1 deferred by different replies in one delivery, one time for all."""
    text = CONFIG.replace("retry: [0.1], retry_jitter: 0", JITTERED)
    answers = [[SMTPReply.received(451, "4.3.0 later")] * 2, [SMTPReply.received(421, "4.4.2 closing")] * 2,
               [SMTPReply(None, None, "lost connection with fake: timed out")]]
    harness = await start(text, FakeUpstream(answer=later(answers)))
    message = new_message(recipients=[f"r{n}@example.org" for n in range(5)])
    await harness.intake(message)
    await until(lambda: _deferred(harness, message.id, 5))
    assert len({r.next_attempt for r in (await harness.spool.get(message.id)).recipients}) == 1
    await until(final(harness, message.id))
    first_round, second_round = harness.upstream.sent[:3], harness.upstream.sent[3:]
    assert [len(s.transaction.recipients) for s in second_round] == [2, 2, 1]
    assert min(s.at for s in second_round) - max(s.at for s in first_round) < 0.3  # one herd, not a spread


async def test_250_recipients_go_as_100_100_50_before_and_after_an_outage(start):
    upstream = FakeUpstream()
    harness = await start(PER_100.replace("throttle_max_pause: 0.1", "throttle_max_pause: 0.1, unreachable_backoff: 0.05, "
                                          "unreachable_max_backoff: 0.05"), upstream)
    before = new_message(recipients=[f"r{n}@example.org" for n in range(250)])
    await harness.intake(before)
    await until(final(harness, before.id))

    upstream.down = True
    during = new_message(recipients=[f"r{n}@example.org" for n in range(250)])
    await harness.intake(during)
    await until(lambda: _deferred(harness, during.id, 250))
    recipients = (await harness.spool.get(during.id)).recipients
    assert len({r.next_attempt for r in recipients}) == 1  # the two transactions not sent wait with the first
    assert {r.last_reply for r in recipients[100:]} == {
        "delivery temporarily suspended: connect to fake[upstream]: Connection refused"}
    assert upstream.connects_failed == 1

    upstream.down = False
    await until(final(harness, during.id))
    assert sizes(upstream, before.id) == sizes(upstream, during.id) == [100, 100, 50]


async def test_after_a_deferral_recipients_under_different_tls_policies_split_only_there(start):
    text = PER_100 + "tls_rules:\n  - {domains: [secure.example], rule: verify}\n  - {rule: may}\n"
    harness = await start(text, FakeUpstream(answer=later([[SMTPReply.received(451, "later")] * 3,
                                                           [SMTPReply.received(451, "later")] * 2])))
    addresses = ["a@plain.example", "b@secure.example", "c@plain.example", "d@secure.example", "e@plain.example"]
    message = new_message(recipients=addresses)
    await harness.intake(message)
    await until(final(harness, message.id))
    assert [(s.key.tls, s.transaction.recipients) for s in harness.upstream.sent] == [
        ("may", ["a@plain.example", "c@plain.example", "e@plain.example"]),
        ("verify", ["b@secure.example", "d@secure.example"]),
    ] * 2


async def test_a_throttled_message_sends_nothing_more_and_all_its_recipients_wait_for_the_same_pause(start):
    harness = await start(upstream=FakeUpstream(answer=later([[SMTPReply.received(536, "Frequency limited")] * 2])))
    message = new_message(recipients=[f"r{n}@example.org" for n in range(5)])  # 2 + 2 + 1
    await harness.intake(message)
    await until(lambda: _deferred(harness, message.id, 5))
    recipients = (await harness.spool.get(message.id)).recipients
    assert len(harness.upstream.sent) == 1
    assert len({r.next_attempt for r in recipients}) == 1
    assert {r.attempts for r in recipients} == {0}
    await until(final(harness, message.id))
    assert sizes(harness.upstream, message.id) == [2, 2, 2, 1]


# -- the active queue ------------------------------------------------------------------------------------------


async def test_the_active_limit_holds_and_the_overflow_is_delivered_later_from_the_spool(start):
    upstream = FakeUpstream(hold=asyncio.Event())
    harness = await start(CONFIG.replace("poll_interval", "active_limit: 4, poll_interval"), upstream)
    messages = [new_message(recipients=("a@example.org",)) for _ in range(30)]
    peak, done = 0, asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, harness.scheduler.active())
            await asyncio.sleep(0)
    watcher = asyncio.create_task(watch())
    for message in messages:
        await harness.intake(message)  # stored, then handed over only while there is room
    await until(lambda: upstream.sent)  # the first transaction (the connect probe) is held
    await asyncio.sleep(10 * POLL)  # ten polls that find 26 messages due in the spool
    assert harness.scheduler.active() == 4
    upstream.hold.set()
    for message in messages:
        await until(final(harness, message.id))
    done.set()
    await watcher
    assert peak == 4
    assert sorted(s.transaction.queue_id for s in upstream.sent) == sorted(m.id for m in messages)  # each once


async def test_a_new_message_goes_promptly_while_a_backlog_drains(start):
    text = CONFIG.replace("poll_interval", "active_limit: 40, poll_interval").replace(
        "max_recipients_per_transaction: 2", "max_recipients_per_transaction: 2, connections_per_account: 1")

    def slow(sent):
        time.sleep(0.002)  # the fake upstream's time per transaction, so the backlog takes a while
        return [QUEUED] * len(sent.transaction.recipients)
    harness = await start(text, FakeUpstream(answer=slow))
    backlog = [new_message(recipients=("a@example.org",)) for _ in range(300)]
    for message in backlog:  # as after a restart or an outage: in the spool only
        await harness.spool.store(message)
    await until(lambda: len(harness.upstream.sent) >= 20)
    fresh = new_message(recipients=("new@example.org",))
    sent_before = len(harness.upstream.sent)
    await harness.intake(fresh)
    await until(final(harness, fresh.id))
    ahead = [s.transaction.queue_id for s in harness.upstream.sent].index(fresh.id) - sent_before
    assert harness.scheduler.active() > 10 and ahead <= 1  # next, not behind the 30 the poller holds
    for message in backlog:
        await until(final(harness, message.id), timeout=10)


# -- an unreachable upstream -------------------------------------------------------------------------------------


UNREACHABLE = CONFIG.replace(
    "upstream: {kind: capture, max_recipients_per_transaction: 2, throttle_pause: 0.1, throttle_max_pause: 0.1}",
    "upstream: {kind: smtp, host: 127.0.0.1, port: PORT, tls: none, timeout: 0.3, unreachable_backoff: 0.2, "
    "unreachable_max_backoff: 0.2}",
) + "tls_rules:\n  - {rule: may}\n"


class Connects:
    """The real transport, counting the sends that found no connection."""

    def __init__(self) -> None:
        self.failed = 0

    def __call__(self, upstream, account, key, local_hostname, tls):
        connection = open_connection(upstream, account, key, local_hostname, tls)
        send = connection.send

        async def counted(transaction):
            result = await send(transaction)
            self.failed += result.unreachable
            return result
        connection.send = counted
        return connection


class Sink:
    async def handle_DATA(self, server, session, envelope) -> str:
        return "250 2.0.0 Ok: queued"


def closed_port() -> socket.socket:
    """A port bound and not listening: connecting is refused. Closed to make room for the server."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


async def _probes_then_delivered(text: str, port: int, seconds: float, counted, until_back,
                                 accounts: tuple[str, ...] = ("acme_trigger",)) -> None:
    connects = Connects()
    harness = Harness(text.replace("PORT", str(port)), FakeUpstream())
    harness.scheduler = type(harness.scheduler)(lambda: harness.config, harness.spool, connect=connects)
    await harness.scheduler.start()
    try:
        messages = [new_message(recipients=("a@example.org", "b@example.org"), account=accounts[n % len(accounts)])
                    for n in range(20)]
        for message in messages:
            await harness.intake(message)
        started = time.monotonic()
        await asyncio.sleep(seconds)
        probes = counted(connects)
        # One probe, then one per (timeout +) backoff of 0.2 s: a handful, not one per message,
        # worker or account (they share the destination's gate).
        assert 1 <= probes <= 2 + (time.monotonic() - started) / 0.2
        assert harness.scheduler.unreachable_for().keys() == set(accounts)
        # Only the probes used attempts, one per recipient of the probing message (which may be
        # the same message twice); one probe may still be on its way.
        spent = sum([r.attempts for m in messages for r in (await harness.spool.get(m.id)).recipients])
        assert probes - 1 <= spent / 2 <= probes

        server = await until_back()
        try:
            for message in messages:
                await until(final(harness, message.id), timeout=10)
            assert harness.scheduler.unreachable_for() == {}
            assert {s for m in messages for s in await harness.states(m.id)} == {State.DELIVERED}
        finally:
            server.close()
    finally:
        await harness.scheduler.stop(1.0)


def _serve_on(port: int):
    async def serve():
        return await asyncio.get_running_loop().create_server(lambda: SMTP(Sink(), hostname="sink.test"), "127.0.0.1", port)
    return serve


async def test_a_closed_port_costs_one_probe_per_backoff_and_the_backlog_goes_once_it_listens():
    sock = closed_port()
    port = sock.getsockname()[1]

    async def back():
        sock.close()
        return await _serve_on(port)()
    await _probes_then_delivered(UNREACHABLE, port, 1.0, lambda connects: connects.failed, back)


TEN_ACCOUNTS = ("acme_trigger", *(f"acme_{n}" for n in range(9)))


async def test_ten_accounts_on_one_dead_upstream_share_its_probe():
    """Reachability is the destination's (host, port, TLS): ten accounts connecting there cost
    one probe per backoff together, and all of them resume when it listens again."""
    lines = "".join(f"  {name}: {{api_user: {name}, type: trigger, domain: acme.com}}\n" for name in TEN_ACCOUNTS[1:])
    text = UNREACHABLE.replace("  acme_trigger: {api_user: acme_trigger, type: trigger, domain: acme.com}\n",
                               "  acme_trigger: {api_user: acme_trigger, type: trigger, domain: acme.com}\n" + lines)
    sock = closed_port()
    port = sock.getsockname()[1]

    async def back():
        sock.close()
        return await _serve_on(port)()
    await _probes_then_delivered(text, port, 1.0, lambda connects: connects.failed, back, TEN_ACCOUNTS)


async def test_a_listener_that_never_answers_ties_up_only_the_probe():
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader, writer):  # takes the connection, never sends a greeting
        accepted.append(writer)
    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def back():
        server.close()
        for writer in accepted:
            writer.close()
        await server.wait_closed()
        return await _serve_on(port)()
    # Each probe waits the 0.3 s timeout, then the 0.2 s backoff: 1.5 s is three probes or so.
    await _probes_then_delivered(UNREACHABLE, port, 1.5, lambda connects: len(accepted), back)


async def test_stopping_does_not_wait_out_an_unreachable_accounts_backoff():
    """Workers waiting for a paused account's next probe (minutes at most) stop at once; the mail waits in the spool."""
    sock = closed_port()
    text = UNREACHABLE.replace("PORT", str(sock.getsockname()[1])).replace(
        "unreachable_backoff: 0.2, unreachable_max_backoff: 0.2", "unreachable_backoff: 300, unreachable_max_backoff: 300")
    harness = Harness(text, FakeUpstream())
    harness.scheduler = type(harness.scheduler)(lambda: harness.config, harness.spool)
    await harness.scheduler.start()
    messages = [new_message(recipients=("a@example.org",)) for _ in range(10)]
    try:
        for message in messages:
            await harness.intake(message)
        await until(lambda: harness.scheduler.unreachable_for(), timeout=5)
        await asyncio.sleep(0.2)  # the workers are waiting for the probe 300 s away
    finally:
        started = time.monotonic()
        await harness.scheduler.stop(30.0)
        sock.close()
    assert time.monotonic() - started < 2
    assert {s for m in messages for s in await harness.states(m.id)} <= {State.QUEUED, State.DEFERRED}
