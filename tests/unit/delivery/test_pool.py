"""relay.delivery.transport.pool: an account's kept connections stay within its limit, and a
failure while making or closing one does not shrink the pool for good."""

from __future__ import annotations

import pytest

from relay.delivery.transport import AccountPool, Key

A, B, C = Key(None, "verify"), Key(None, "may"), Key(7, "verify")


class FakeConnection:
    def __init__(self, key: Key, close_error: Exception | None = None):
        self.key, self.closed, self._close_error = key, False, close_error

    async def close(self) -> None:
        self.closed = True
        if self._close_error is not None:
            raise self._close_error


def factory(failing: set[Key] = frozenset()):
    def make(key: Key) -> FakeConnection:
        if key in failing:
            raise OSError("cannot make a connection")
        return FakeConnection(key)
    return make


async def test_a_kept_connection_is_reused_for_its_key():
    pool = AccountPool(2, factory())
    first = await pool.acquire(A)
    pool.release(first)
    assert await pool.acquire(A) is first


async def test_at_the_limit_the_longest_idle_connection_of_another_key_is_closed():
    pool = AccountPool(2, factory())
    a, b = await pool.acquire(A), await pool.acquire(B)
    pool.release(a)
    pool.release(b)
    c = await pool.acquire(C)
    assert (a.closed, b.closed, c.key) == (True, False, C)


async def test_a_factory_that_raises_does_not_count_as_busy():
    """The busy count used to leak: after it, every acquire closed a kept connection it could keep."""
    pool = AccountPool(2, factory({C}))
    for _ in range(3):
        with pytest.raises(OSError):
            await pool.acquire(C)
    kept = await pool.acquire(A)
    pool.release(kept)
    pool.release(await pool.acquire(B))  # room for two: A stays open
    assert not kept.closed


async def test_a_close_that_raises_does_not_count_as_busy():
    pool = AccountPool(2, factory())
    kept = FakeConnection(B)
    pool._idle.extend([FakeConnection(A, close_error=OSError("reset")), kept])
    with pytest.raises(OSError):
        await pool.acquire(C)  # at the limit: the longest idle (A) is closed, and that fails
    pool.release(await pool.acquire(C))  # one idle, one new: within two, B stays open
    assert not kept.closed
