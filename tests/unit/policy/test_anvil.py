"""One connection table and AUTH guard per relay: the local table, the acceptor's remote client
over a real socketpair, and how many acceptors ``server.processes`` means."""

from __future__ import annotations

import asyncio
import pickle
import socket

import pytest

from relay.config import acceptor_count
from relay.errors import SMTPReply
from relay.policy.anvil import LimitsUnavailable, LocalLimits
from relay.process import acceptor, supervisor
from relay.process.acceptor import LoopPassWriter, RemoteLimits
from relay.process.ipc import LimitsAnswer, LimitsCall, read_frame
from tests.unit.helpers import BASE, config_from

LIMITED = BASE.replace(
    "  listeners:",
    "  max_connections: 4\n  max_connections_per_address: 2\n"
    "  trusted_networks: [{cidr: 10.0.0.0/8, user: billing}]\n  listeners:",
)


def limits() -> LocalLimits:
    config = config_from(LIMITED)
    return LocalLimits(lambda: config)


def code(reply: SMTPReply | None) -> str | None:
    return None if reply is None else f"{reply.code} {reply.enhanced}"


async def test_per_address_and_total_limits_count_every_connection_once():
    table = limits()
    assert [code(await table.admit(n, "192.0.2.1")) for n in range(3)] == [None, None, "421 4.7.1"]
    # trusted networks are exempt per address, not from the total
    assert [code(await table.admit(n, "10.0.0.1")) for n in range(10, 13)] == [None, None, "421 4.3.2"]
    table.release(0)
    table.release(0)  # a second release of the same connection frees nothing more
    table.release(2)  # nor does the release of one that was refused
    assert table.connections.total == 3 and table.connections.by_address["192.0.2.1"] == 1
    assert code(await table.admit(20, "192.0.2.1")) is None


async def test_behind_a_proxy_the_address_counts_once_it_is_known():
    table = limits()
    for key in ("a", "b", "c"):
        assert await table.admit(key, None) is None
    assert code(await table.admit_address("a", "192.0.2.9")) is None
    assert code(await table.admit_address("b", "192.0.2.9")) is None
    assert code(await table.admit_address("c", "192.0.2.9")) == "421 4.7.1"
    table.release("a")
    assert table.connections.by_address["192.0.2.9"] == 1 and table.connections.total == 2


async def test_an_acceptor_that_dies_frees_exactly_its_own_connections():
    table = limits()
    for key in [(0, 1), (0, 2), (1, 1)]:
        assert await table.admit(key, f"192.0.2.{key[0]}{key[1]}") is None
    assert table.release_owner(0) == 2
    assert table.connections.total == 1 and dict(table.connections.by_address) == {"192.0.2.11": 1}


async def test_auth_failures_lock_out_through_the_same_guard():
    config = config_from(BASE.replace("  listeners:", "  auth_lockout_failures: 2\n  listeners:"))
    table = LocalLimits(lambda: config)
    await table.auth_failed("192.0.2.1", "billing")
    assert await table.auth_locked_for("192.0.2.1", "billing") is None
    await table.auth_failed("192.0.2.2", "billing")
    assert await table.auth_locked_for("192.0.2.3", "billing") > 0  # the username, from anywhere new
    table.auth_succeeded("192.0.2.4", "billing")
    assert await table.auth_locked_for("192.0.2.4", "billing") is None  # known good for that user


def test_a_refusal_crosses_processes_intact():
    reply = pickle.loads(pickle.dumps(SMTPReply(421, "4.7.1", "Too many connections")))
    assert (reply.code, reply.enhanced, str(reply)) == (421, "4.7.1", "421 4.7.1 Too many connections")


@pytest.fixture
async def pipe():
    """An acceptor's RemoteLimits and the raw other end of its socketpair."""
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    main_reader, main_writer = await asyncio.open_unix_connection(sock=theirs)
    closed = asyncio.Event()
    yield RemoteLimits(LoopPassWriter(writer), closed), closed, main_reader, main_writer
    writer.close()
    main_writer.close()


async def test_remote_questions_are_answered_and_one_way_calls_need_no_answer(pipe):
    remote, _, main_reader, _ = pipe
    remote.release(7)
    asking = asyncio.create_task(remote.admit(8, "192.0.2.1"))
    told, _ = await read_frame(main_reader)
    asked, _ = await read_frame(main_reader)
    assert told == LimitsCall(None, "release", (7,))
    assert (asked.method, asked.args) == ("admit", (8, "192.0.2.1"))
    remote.answered(LimitsAnswer(asked.sequence, SMTPReply(421, "4.7.1", "no")))
    assert code(await asking) == "421 4.7.1"
    remote.answered(LimitsAnswer(asked.sequence, None))  # a late or repeated answer is dropped


async def test_a_question_never_answered_fails_instead_of_hanging(pipe, monkeypatch):
    remote, closed, _, _ = pipe
    monkeypatch.setattr(acceptor, "_ASK_TIMEOUT", 0.05)
    with pytest.raises(LimitsUnavailable, match="no answer"):
        await remote.auth_locked_for("192.0.2.1", "billing")
    waiting = asyncio.create_task(remote.auth_failed("192.0.2.1", "billing"))
    await asyncio.sleep(0)
    closed.set()
    remote.close()  # the main process went away: what waits fails at once, and so does what is asked next
    with pytest.raises(LimitsUnavailable, match="gone"):
        await waiting
    with pytest.raises(LimitsUnavailable, match="gone"):
        await remote.admit(1, None)


async def test_the_main_process_answers_in_order_from_its_table():
    table = limits()
    pool = supervisor.AcceptorPool(config_from(LIMITED), None, None, table, 2)
    ours, theirs = socket.socketpair()
    _, writer = await asyncio.open_unix_connection(sock=ours)
    reader, other = await asyncio.open_unix_connection(sock=theirs)
    for sequence, key in enumerate((1, 2, 3), 1):
        await pool._answer(0, writer, LimitsCall(sequence, "admit", (key, "192.0.2.1")))
    await pool._answer(0, writer, LimitsCall(None, "release", (1,)))
    await pool._answer(0, writer, LimitsCall(None, "admit", (4, "192.0.2.1")))  # asked without a sequence: ignored
    answers = [(await read_frame(reader))[0] for _ in range(3)]
    assert [code(answer.value) for answer in answers] == [None, None, "421 4.7.1"]
    assert table.connections.by_address["192.0.2.1"] == 1  # keys are per acceptor: (0, 2) is still open
    assert table.release_owner(0) == 1
    writer.close()
    other.close()


@pytest.mark.parametrize(("setting", "cpus", "expected"), [
    (1, 64, 1), (3, 1, 3), ("auto", 1, 2), ("auto", 2, 2), ("auto", 6, 6), ("auto", 64, 8),
])
def test_processes_auto_is_one_per_cpu_from_2_to_8(setting, cpus, expected, monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cpus)))
    config = config_from(BASE.replace("  listeners:", f"  processes: {setting}\n  listeners:"))
    assert acceptor_count(config) == expected


def test_the_default_is_auto():
    assert config_from(BASE).server.processes == "auto"


async def test_a_failure_in_the_main_process_is_a_refusal_for_now_not_a_hang(monkeypatch):
    table = limits()
    monkeypatch.setattr(table, "auth_failed", lambda address, username: 1 / 0)
    pool = supervisor.AcceptorPool(config_from(LIMITED), None, None, table, 2)
    ours, theirs = socket.socketpair()
    _, writer = await asyncio.open_unix_connection(sock=ours)
    reader, other = await asyncio.open_unix_connection(sock=theirs)
    await pool._answer(0, writer, LimitsCall(5, "auth_failed", ("192.0.2.1", "billing")))
    answer, _ = await read_frame(reader)
    remote = RemoteLimits(LoopPassWriter(other), asyncio.Event())
    waiting = remote._waiting[5] = asyncio.get_running_loop().create_future()
    remote.answered(answer)
    with pytest.raises(LimitsUnavailable, match="could not answer auth_failed"):
        await waiting
    writer.close()
    other.close()
