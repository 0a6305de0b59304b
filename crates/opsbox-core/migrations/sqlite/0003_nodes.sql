-- Nodes (agents and the local node) and the tasks of fan-out jobs. The records are
-- JSON documents (opsbox-core's NodeRecord and TaskRecord); the columns beside them are
-- what the scheduler queries by.

CREATE TABLE nodes (
    id   TEXT PRIMARY KEY,
    data TEXT NOT NULL
);

CREATE TABLE tasks (
    job   TEXT    NOT NULL,
    id    TEXT    NOT NULL,
    -- Submission order of the job, then the task's place in it.
    seq   INTEGER NOT NULL,
    state TEXT    NOT NULL,
    node  TEXT,
    data  TEXT    NOT NULL,
    PRIMARY KEY (job, id)
);
CREATE INDEX tasks_by_state ON tasks (state, seq);
