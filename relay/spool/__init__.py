"""The durable queue between the SMTP side and the delivery side.

``model`` holds the records every backend speaks (messages, recipients, outcomes, body
pieces, queue IDs), ``base`` the :class:`Spool` protocol the rest of the relay codes against,
``sqlite`` the embedded backend and ``memory`` the one unit tests use. The process wiring and
the CLI get a spool from :func:`open_spool` by ``spool.backend``, so no code outside this
package names a backend.
"""

from __future__ import annotations

from relay.config import Spool as SpoolSettings
from relay.spool.base import (
    BodyGone,
    Cursor,
    ListQuery,
    RateStore,
    SchemaMismatch,
    Spool,
    SpoolMissing,
    WindowKey,
    due_key,
)
from relay.spool.events_model import NO_ROWS, OutcomeRows
from relay.spool.model import (
    FileRegion,
    NewMessage,
    Piece,
    QueuedMessage,
    Recipient,
    RecipientUpdate,
    State,
    is_eight_bit,
    new_queue_id,
    piece_chunks,
    use_queue_id_partition,
)

__all__ = [
    "NO_ROWS", "BodyGone", "Cursor", "FileRegion", "ListQuery", "NewMessage", "OutcomeRows", "Piece", "QueuedMessage", "RateStore", "Recipient",
    "RecipientUpdate", "SchemaMismatch", "Spool", "SpoolMissing", "State", "WindowKey", "due_key", "is_eight_bit",
    "new_queue_id", "open_spool",
    "piece_chunks", "rate_store", "suppression_reader",
    "use_queue_id_partition",
]


def open_spool(settings: SpoolSettings, create: bool = True) -> Spool:
    """The spool ``spool.backend`` names (not opened yet: ``await spool.open()``); with
    ``create=False`` opening raises :class:`SpoolMissing` rather than making an empty one."""
    if settings.backend == "sqlite":
        from relay.spool.sqlite import SqliteSpool

        return SqliteSpool(settings.path, settings.commit_timeout, create=create)
    if settings.backend == "postgres":
        from relay.spool.postgres import PostgresSpool  # only here: a SQLite relay never imports asyncpg

        assert settings.dsn is not None  # the config requires it
        return PostgresSpool(settings.dsn.get_secret_value(), node=settings.node, lease=settings.lease,
                             commit_timeout=settings.commit_timeout, spill_directory=settings.path.parent)
    raise ValueError(f"spool.backend {settings.backend!r} is not supported")


def rate_store(settings: SpoolSettings) -> RateStore:
    """Where this process keeps rate-limit windows: beside the queue, shared with the other processes
    (and, on PostgreSQL, with every process of every node)."""
    if settings.backend == "sqlite":
        from relay.spool.sqlite import SqliteRateStore

        return SqliteRateStore(settings.path)
    if settings.backend == "postgres":
        from relay.spool.postgres_events import PostgresRateStore

        return PostgresRateStore(_dsn(settings))
    raise ValueError(f"spool.backend {settings.backend!r} is not supported")


def suppression_reader(settings: SpoolSettings):
    """The suppression list of the spool, read on a connection of its own (for acceptor processes)."""
    if settings.backend == "sqlite":
        from relay.spool.sqlite_events import SqliteSuppressionReader

        return SqliteSuppressionReader(settings.path)
    if settings.backend == "postgres":
        from relay.spool.postgres_events import PostgresSuppressionReader

        return PostgresSuppressionReader(_dsn(settings))
    raise ValueError(f"spool.backend {settings.backend!r} is not supported")


def _dsn(settings: SpoolSettings) -> str:
    if settings.dsn is None:
        raise ValueError("spool.backend postgres needs spool.dsn")
    return settings.dsn.get_secret_value()
