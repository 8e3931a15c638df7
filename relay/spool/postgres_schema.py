"""The PostgreSQL spool's schema as numbered migrations, applied in order by ``sendcloud-relay migrate``.

A migration is never edited once released: a change is a new one at the end. ``serve`` checks
that the database is at exactly the last version here and refuses to start otherwise.
"""

from __future__ import annotations

QUEUE = """
CREATE TABLE messages (
    id          text PRIMARY KEY,
    received_at double precision NOT NULL,
    "user"      text NOT NULL,
    listener    text NOT NULL,
    client      text NOT NULL,
    account     text NOT NULL,
    channel     text NOT NULL,
    sender      text NOT NULL,
    size        bigint NOT NULL,
    label       integer,
    mail_from   text,
    eight_bit   boolean NOT NULL DEFAULT false,
    pending     boolean NOT NULL DEFAULT true,  -- false once every recipient is final (the body is gone)
    next_due    double precision,               -- the earliest next_attempt of a waiting recipient (NULL: none)
    lease_owner text,                           -- the node that holds it, until lease_until
    lease_until double precision                -- the database's clock (epoch seconds), never a node's
);
CREATE INDEX messages_received ON messages (received_at);
CREATE INDEX messages_due ON messages (next_due) WHERE pending;  -- claims walk this, earliest due first
CREATE INDEX messages_pending ON messages (id) WHERE pending;    -- `queue list`: pending messages in ID order
CREATE TABLE bodies (
    message_id text NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    seq        integer NOT NULL,                -- pieces in order, each 256 KiB but the last (offset = seq * 256 KiB)
    data       bytea NOT NULL,
    PRIMARY KEY (message_id, seq)
);
ALTER TABLE bodies ALTER COLUMN data SET STORAGE EXTERNAL;  -- pieces are mostly base64 or compressed: no pglz try
CREATE TABLE recipients (
    message_id   text NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    idx          integer NOT NULL,
    address      text NOT NULL,
    state        text NOT NULL,
    attempts     integer NOT NULL DEFAULT 0,
    next_attempt double precision NOT NULL,
    last_reply   text,
    email_id     text,
    PRIMARY KEY (message_id, idx)
);
CREATE INDEX recipients_pending ON recipients (next_attempt) WHERE state IN ('queued', 'deferred');
CREATE INDEX recipients_pending_messages ON recipients (message_id) WHERE state IN ('queued', 'deferred');
CREATE INDEX recipients_email_id ON recipients (email_id) WHERE email_id IS NOT NULL;
CREATE TABLE health (id integer PRIMARY KEY CHECK (id = 1), checked_at double precision);  -- /readyz's write
"""

# (version, name, SQL): applied in one transaction each, recorded in schema_migrations.
MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "queue", QUEUE),
]
LATEST = MIGRATIONS[-1][0]
