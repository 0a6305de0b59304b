-- Durable per-node message queues. Times are milliseconds since the Unix epoch.

CREATE TABLE messages (
    -- Insertion order: ties of created_at are broken by it.
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    id             TEXT    NOT NULL UNIQUE,
    source         TEXT    NOT NULL,
    destination    TEXT    NOT NULL,
    status         TEXT    NOT NULL,
    kind           TEXT    NOT NULL,
    payload_type   TEXT    NOT NULL,
    payload        BLOB    NOT NULL,
    tries          INTEGER NOT NULL DEFAULT 0,
    max_tries      INTEGER,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER,
    scheduled_at   INTEGER,
    processing_at  INTEGER,
    processed_at   INTEGER,
    lease_until    INTEGER,
    -- When the claim query may take it: created_at (pending), scheduled_at (scheduled),
    -- lease_until (processing under a lease); NULL when it can never be taken.
    due_at         INTEGER
);

-- The claim query: a node's deliverable messages, in order.
CREATE INDEX messages_claim ON messages (destination, status, due_at);
-- Listing what a node sent.
CREATE INDEX messages_by_source ON messages (source, status);
