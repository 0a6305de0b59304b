-- The model: applications, units, machines and relations as JSON documents (the
-- opsbox-api model types), keyed by kind and id, plus the sequences that number units,
-- machines and relations so that a number is never given out twice.

CREATE TABLE model (
    kind TEXT NOT NULL,
    id   TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (kind, id)
);

CREATE TABLE model_sequences (
    name TEXT PRIMARY KEY,
    next INTEGER NOT NULL
);
