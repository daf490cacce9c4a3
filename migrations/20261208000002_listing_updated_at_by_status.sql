-- no-transaction
-- See 20261208000001_listing_orderings_by_status.sql.
DROP INDEX CONCURRENTLY IF EXISTS tasks_updated_at_idx;
