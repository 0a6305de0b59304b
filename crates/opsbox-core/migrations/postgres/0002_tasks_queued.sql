-- The scheduler asks for the first queued tasks of each job: this index answers with a
-- seek per job instead of a scan of every queued task (see `queued_tasks`).
CREATE INDEX tasks_queued ON tasks (state, job, seq);
