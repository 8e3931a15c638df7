"""STAND-IN, to be replaced at merge: the PostgreSQL spool's schema and queue, as little of them
as the tests of :class:`relay.spool.postgres_events.PostgresEvents` need.

The queue half (``relay/spool/postgres.py`` ``PostgresSpool`` and its migration runner) is
written on another branch. Until it is merged, :func:`apply_migrations` applies
``MIGRATIONS`` itself and :class:`EventsOnPostgres` is a pool with PostgresEvents mixed in
plus ``store``/``record``/``delete`` for the few queue rows the event tests need, written
against migration 1's tables. At merge: ``apply_migrations`` becomes the real runner and
``EventsOnPostgres`` becomes ``PostgresSpool``.
"""

from __future__ import annotations

import asyncpg

from relay.spool import NewMessage, RecipientUpdate, State
from relay.spool.postgres_events import PostgresEvents
from relay.spool.postgres_schema import MIGRATIONS


async def apply_migrations(dsn: str) -> None:
    """Every migration, each in a transaction of its own."""
    conn = await asyncpg.connect(dsn)
    try:
        for _, _, sql in MIGRATIONS:
            async with conn.transaction():
                await conn.execute(sql)
    finally:
        await conn.close()


class EventsOnPostgres(PostgresEvents):
    """PostgresEvents on a pool of its own, with just enough of a queue to hang events on."""

    def __init__(self, dsn: str):
        self._dsn = dsn

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=4)

    async def close(self) -> None:
        await self._pool.close()

    async def store(self, message: NewMessage) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                'INSERT INTO messages (id, received_at, "user", listener, client, account, channel, sender, size, label) '
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                message.id, message.received_at, message.user, message.listener, message.client,
                message.account, message.channel, message.sender, message.size, message.label,
            )
            await conn.executemany(
                "INSERT INTO recipients (message_id, idx, address, state, next_attempt) VALUES ($1, $2, $3, $4, $5)",
                [(message.id, idx, address, State.QUEUED.value, message.received_at)
                 for idx, address in enumerate(message.recipients)],
            )

    async def record(self, updates: list[RecipientUpdate]) -> None:
        await self._pool.executemany(
            "UPDATE recipients SET state = $1, attempts = $2, next_attempt = $3, last_reply = $4, "
            "email_id = COALESCE($5, email_id) WHERE message_id = $6 AND idx = $7",
            [(u.state.value, u.attempts, u.next_attempt, u.last_reply, u.email_id, u.message_id, u.idx) for u in updates],
        )

    async def delete(self, message_id: str) -> bool:
        return await self._pool.execute("DELETE FROM messages WHERE id = $1", message_id) == "DELETE 1"
