-- Each worker's own advisory key is (NODE_LOCK_NAMESPACE, lock_key): peers probe it with
-- pg_try_advisory_lock_shared to tell whether the node's lock session is alive.
CREATE SEQUENCE nodes_lock_key_seq AS integer CYCLE;
ALTER TABLE nodes ADD COLUMN lock_key integer NOT NULL DEFAULT nextval('nodes_lock_key_seq');
CREATE UNIQUE INDEX nodes_lock_key_idx ON nodes (lock_key);

-- Handler output, kept apart from the event stream (never folded into state), in chunks
-- bounded by size and time.
CREATE TABLE task_output (
    task_id uuid        NOT NULL REFERENCES tasks (task_id) ON DELETE CASCADE,
    epoch   bigint      NOT NULL,
    seq     integer     NOT NULL,
    stream  text        NOT NULL CHECK (stream IN ('stdout', 'stderr')),
    data    bytea       NOT NULL,
    at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, epoch, seq)
);

CREATE INDEX pod_crashes_at_idx ON pod_crashes (at);
