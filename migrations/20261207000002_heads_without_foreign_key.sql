-- The head's foreign key to its listing row is dropped: both rows are written by the
-- one statement that creates a task and are never deleted apart, so the check could only
-- pass. It cost every create a lookup and a lock of the listing row just inserted (5
-- buffers and a WAL record a task, about a quarter of a batch create's statement time;
-- crates/core/tests/store_costs.rs). Whatever deletes tasks deletes both rows.
ALTER TABLE task_heads DROP CONSTRAINT IF EXISTS task_heads_task_id_fkey;
