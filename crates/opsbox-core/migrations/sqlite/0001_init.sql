-- opsbox SQLite schema, version 1.

-- The event log: every state change, with a global revision.
CREATE TABLE events (
    rev     INTEGER PRIMARY KEY AUTOINCREMENT,
    at      TEXT    NOT NULL,
    kind    TEXT    NOT NULL,
    subject TEXT    NOT NULL,
    data    TEXT    NOT NULL
);

-- Counters that outlive compaction (compacted_through: the newest revision dropped).
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO meta (key, value) VALUES ('compacted_through', 0);

CREATE TABLE jobs (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT    NOT NULL UNIQUE,
    script        TEXT    NOT NULL,
    state         TEXT    NOT NULL,
    params        TEXT    NOT NULL,
    node          TEXT,
    submitted_by  TEXT,
    created_at    TEXT    NOT NULL,
    started_at    TEXT,
    finished_at   TEXT,
    exit_code     INTEGER,
    signal        INTEGER,
    reason        TEXT,
    return_values TEXT    NOT NULL,
    results       TEXT    NOT NULL,
    spec          TEXT    NOT NULL,
    -- Process group of the running task on this server's node, to clean up after a crash.
    pid           INTEGER
);
CREATE INDEX jobs_by_state ON jobs (state, id);
CREATE INDEX jobs_by_script ON jobs (script, id);

CREATE TABLE job_output (
    job    TEXT    NOT NULL,
    seq    INTEGER NOT NULL,
    stream INTEGER NOT NULL,
    data   BLOB    NOT NULL,
    PRIMARY KEY (job, seq)
) WITHOUT ROWID;

CREATE TABLE users (
    name          TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    role          TEXT NOT NULL,
    created_at    TEXT NOT NULL
);

CREATE TABLE tokens (
    id          TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    role        TEXT NOT NULL,
    nodes       TEXT NOT NULL,
    description TEXT,
    created_at  TEXT NOT NULL
);
