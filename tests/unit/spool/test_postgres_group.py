"""The pure parts of the PostgreSQL group commit: the order a group runs its kinds in, the counters' one upsert."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from relay.spool.postgres_group import Kind, by_kind, each, stat_totals


async def _nothing(conn, calls, tally):
    return [None] * len(calls)


STORE, RECORD, APPLY = Kind(_nothing), Kind(_nothing), Kind(_nothing, first=True)


@pytest.mark.parametrize("arrived, expected", [
    ([], []),
    ([(STORE, 1), (STORE, 2)], [(STORE, [1, 2])]),
    ([(STORE, 1), (RECORD, 2), (STORE, 3)], [(STORE, [1, 3]), (RECORD, [2])]),  # a kind's writes together
    ([(RECORD, 1), (STORE, 2), (APPLY, 3)], [(APPLY, [3]), (RECORD, [1]), (STORE, [2])]),  # the version's lock first
    ([(APPLY, 1), (STORE, 2), (APPLY, 3)], [(APPLY, [1, 3]), (STORE, [2])]),
])
def test_a_group_runs_each_kind_once_in_arrival_order_with_the_suppression_version_first(arrived, expected):
    writes = [SimpleNamespace(kind=kind, args=(n,)) for kind, n in arrived]
    assert [(kind, [write.args[0] for write in bucket]) for kind, bucket in by_kind(writes)] == expected


def test_counters_are_summed_once_each_in_key_order():
    rows = [("h2", "user", "a", "requested", 1), ("h1", "user", "b", "requested", 2), ("h2", "user", "a", "requested", 3)]
    assert stat_totals(rows) == [("h1", "user", "b", "requested", 2), ("h2", "user", "a", "requested", 4)]


async def test_each_runs_its_writes_one_after_another_in_order():
    seen = []

    async def operation(conn, value):
        seen.append(value)
        return value * 2

    assert await each(operation).run(None, [(1,), (2,), (3,)], []) == [2, 4, 6]
    assert seen == [1, 2, 3]
