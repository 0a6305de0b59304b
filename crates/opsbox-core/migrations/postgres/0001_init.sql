-- opsbox PostgreSQL schema: the tables of the SQLite store (see migrations/sqlite), with
-- PostgreSQL types. Several servers share one database; every rule that keeps them from
-- stepping on each other is in store/postgres.rs.
--
-- Times of events, jobs, users and tokens are nanoseconds since the Unix epoch
-- (BIGINT): a record reads back exactly as written, as with SQLite's text times
-- (BIGINT would cut them to microseconds).

-- The event log. Revisions come from meta.revision, taken under its row lock at the end
-- of each writing transaction, so revisions are committed in order and a reader of
-- "rev > N" never sees a later revision before an earlier one.
CREATE TABLE events (
    rev     BIGINT PRIMARY KEY,
    at      BIGINT NOT NULL,
    kind    TEXT NOT NULL,
    subject TEXT NOT NULL,
    data    TEXT NOT NULL
);

-- revision: the newest revision given out; compacted_through: the newest one dropped.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO meta (key, value) VALUES ('revision', 0), ('compacted_through', 0);

CREATE TABLE jobs (
    id            BIGSERIAL PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    script        TEXT NOT NULL,
    state         TEXT NOT NULL,
    params        TEXT NOT NULL,
    node          TEXT,
    submitted_by  TEXT,
    created_at    BIGINT NOT NULL,
    started_at    BIGINT,
    finished_at   BIGINT,
    exit_code     INTEGER,
    signal        INTEGER,
    reason        TEXT,
    return_values TEXT NOT NULL,
    results       TEXT NOT NULL,
    spec          TEXT NOT NULL,
    pid           BIGINT,
    -- The server that runs the job's process (scripts run where they were submitted).
    server        TEXT
);
CREATE INDEX jobs_by_state ON jobs (state, id);
CREATE INDEX jobs_by_script ON jobs (script, id);

CREATE TABLE job_output (
    job    TEXT   NOT NULL,
    seq    BIGINT NOT NULL,
    stream SMALLINT NOT NULL,
    data   BYTEA  NOT NULL,
    PRIMARY KEY (job, seq)
);

CREATE TABLE users (
    name          TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    role          TEXT NOT NULL,
    created_at    BIGINT NOT NULL
);

CREATE TABLE tokens (
    id          TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    role        TEXT NOT NULL,
    nodes       TEXT NOT NULL,
    description TEXT,
    created_at  BIGINT NOT NULL
);

-- Queues; times are milliseconds since the Unix epoch, due_at as in the SQLite schema.
CREATE TABLE messages (
    seq            BIGSERIAL PRIMARY KEY,
    id             TEXT   NOT NULL UNIQUE,
    source         TEXT   NOT NULL,
    destination    TEXT   NOT NULL,
    status         TEXT   NOT NULL,
    kind           TEXT   NOT NULL,
    payload_type   TEXT   NOT NULL,
    payload        BYTEA  NOT NULL,
    tries          INTEGER NOT NULL DEFAULT 0,
    max_tries      INTEGER,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT,
    scheduled_at   BIGINT,
    processing_at  BIGINT,
    processed_at   BIGINT,
    lease_until    BIGINT,
    due_at         BIGINT
);
CREATE INDEX messages_claim ON messages (destination, status, due_at);
CREATE INDEX messages_by_source ON messages (source, status);

CREATE TABLE nodes (
    id   TEXT PRIMARY KEY,
    data TEXT NOT NULL
);

CREATE TABLE tasks (
    job   TEXT   NOT NULL,
    id    TEXT   NOT NULL,
    seq   BIGINT NOT NULL,
    state TEXT   NOT NULL,
    node  TEXT,
    data  TEXT   NOT NULL,
    PRIMARY KEY (job, id)
);
CREATE INDEX tasks_by_state ON tasks (state, seq);

CREATE TABLE model (
    kind TEXT NOT NULL,
    id   TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (kind, id)
);

CREATE TABLE model_sequences (
    name TEXT PRIMARY KEY,
    next BIGINT NOT NULL
);
