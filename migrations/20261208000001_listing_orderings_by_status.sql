-- no-transaction
-- The listing row loses its three plain ordering indexes (created_at, updated_at,
-- priority; this one and the next two migrations, one index each, since a concurrent
-- drop must be alone in its statement). Every create wrote them and every lifecycle
-- change rewrote them (the update is never HOT: updated_at is indexed). ListTasks now
-- merges one ordered walk per status over the (status, sort_key, task_id) indexes,
-- which serve every ordering (crates/core/src/store/query.rs `list_tasks`). Dropped
-- concurrently: on a live cluster the listing must stay writable meanwhile.
DROP INDEX CONCURRENTLY IF EXISTS tasks_created_at_idx;
