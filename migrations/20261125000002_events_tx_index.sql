-- WatchTasks finds the tasks changed since a resume point by the writing transaction's
-- id (served only below the snapshot xmin, so a late commit is never skipped).
CREATE INDEX events_tx_id_idx ON events (tx_id);
