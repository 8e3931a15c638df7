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

# What happens after the 250 (issue #12), the tables of relay/spool/sqlite_events.py under the
# same names: the queue half's `list` joins recipient_status. The claims on events and fan-out
# rows keep two nodes from applying one event or POSTing one row at once
# (relay/spool/postgres_events.py).
EVENTS = """
CREATE TABLE events (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at   double precision NOT NULL,
    event         text NOT NULL,
    fields        text NOT NULL,             -- JSON of the fields as received, without the signature
    applied       boolean NOT NULL DEFAULT false,
    claimed_by    text,                      -- the store that received it applies it, until claimed_until
    claimed_until timestamptz
);
CREATE INDEX events_unapplied ON events (id) WHERE NOT applied;
CREATE INDEX events_received ON events (received_at);
CREATE TABLE event_keys (
    key      text PRIMARY KEY,
    event_id bigint NOT NULL REFERENCES events(id) ON DELETE CASCADE
);
CREATE INDEX event_keys_event ON event_keys (event_id);
CREATE TABLE recipient_status (
    message_id  text NOT NULL,
    idx         integer NOT NULL,
    status      text,
    status_time double precision,
    PRIMARY KEY (message_id, idx),
    FOREIGN KEY (message_id) REFERENCES messages(id) ON DELETE CASCADE
);
CREATE TABLE recipient_events (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- the order of events at one time
    message_id    text NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    idx           integer NOT NULL,
    event         text NOT NULL,
    time          double precision NOT NULL,
    ip            text,
    url           text,
    sub_stat      text,
    sub_stat_desc text
);
CREATE INDEX recipient_events_of ON recipient_events (message_id, idx);
CREATE TABLE suppressions (
    address    text COLLATE "C" NOT NULL,
    account    text COLLATE "C" NOT NULL DEFAULT '',     -- '' relay-wide (a NULL would defeat the primary key)
    reason     text NOT NULL,
    channels   text[] NOT NULL,              -- sorted: {batch,trigger}
    added_at   double precision NOT NULL,
    expires_at double precision,
    source     text,
    PRIMARY KEY (address, account)
);
CREATE TABLE suppression_version (
    id      integer PRIMARY KEY CHECK (id = 1),
    version bigint NOT NULL                  -- bumped in every transaction that changes the list
);
-- COLLATE "C": listed in code-point order, as SQLite lists them
CREATE TABLE stats (
    hour    text COLLATE "C" NOT NULL,
    grp     text COLLATE "C" NOT NULL,
    value   text COLLATE "C" NOT NULL,
    counter text COLLATE "C" NOT NULL,
    count   bigint NOT NULL,
    PRIMARY KEY (hour, grp, value, counter)
);
CREATE TABLE fanout (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    "user"        text NOT NULL,
    url           text NOT NULL,
    body          bytea NOT NULL,
    created_at    double precision NOT NULL,
    attempts      integer NOT NULL DEFAULT 0,
    next_attempt  double precision NOT NULL,
    claimed_by    text,                      -- the store POSTing it, until claimed_until
    claimed_until timestamptz
);
CREATE INDEX fanout_due ON fanout (next_attempt);
"""

# Rate-limit windows (relay/spool/base.py RateStore), shared by every process of every node.
RATES = """
CREATE TABLE rate_windows (
    key      text NOT NULL,
    period   double precision NOT NULL,
    "window" bigint NOT NULL,
    count    bigint NOT NULL,
    PRIMARY KEY (key, period, "window")
);
"""

# The queue tables change on every message and are kept small by deletion: vacuum them after 1 %
# of a table is dead (the default 20 % lets a week of kept records bloat the pending indexes),
# unthrottled. docs/scale-out.md, "Autovacuum"; checked by the soak of `bench/run.py --only nodes`.
HOT_TABLES_AUTOVACUUM = "".join(
    f"ALTER TABLE {table} SET (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000, "
    "autovacuum_vacuum_insert_scale_factor = 0.05, autovacuum_vacuum_cost_delay = 0);\n"
    for table in ("messages", "recipients", "bodies")
)

# (version, name, SQL): applied in one transaction each, recorded in schema_migrations.
MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "queue", QUEUE),
    (2, "events", EVENTS),
    (3, "rates", RATES),
    (4, "hot tables autovacuum", HOT_TABLES_AUTOVACUUM),
]
LATEST = MIGRATIONS[-1][0]
