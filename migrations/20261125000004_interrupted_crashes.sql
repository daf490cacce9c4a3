-- A pod lost to an interruption that hit every node (Postgres restarting) is recorded
-- but charged to no restart budget.
ALTER TABLE pod_crashes DROP CONSTRAINT pod_crashes_kind_check;
ALTER TABLE pod_crashes ADD CONSTRAINT pod_crashes_kind_check CHECK (kind IN ('handler', 'node_lost', 'interrupted'));
