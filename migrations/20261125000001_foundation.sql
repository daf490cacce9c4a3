-- taskpod foundation schema. See docs/architecture.md ("Storage") for why each table is
-- shaped the way it is; the comments here only say what a reader of the SQL needs.

-- Cluster-wide constants fixed at the first migration. The partition count can never
-- change in place: every task's partition is a hash over it.
CREATE TABLE cluster_config (
    id              smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    partition_count integer  NOT NULL CHECK (partition_count BETWEEN 1 AND 4096),
    created_at      timestamptz NOT NULL DEFAULT now()
);
INSERT INTO cluster_config (partition_count) VALUES (256);

-- One row per partition. `generation` is bumped on every claim, so a worker that lost
-- its advisory lock can never mint a pod epoch (see "Ownership" in the brief).
CREATE TABLE partitions (
    partition  integer PRIMARY KEY,
    owner_node uuid,
    generation bigint  NOT NULL DEFAULT 0
);
INSERT INTO partitions (partition)
SELECT p FROM generate_series(0, (SELECT partition_count - 1 FROM cluster_config)) AS p;

-- The listing row. Rewritten only when status, phase or last_error change, so
-- `updated_at` means "last lifecycle change".
CREATE TABLE tasks (
    task_id     uuid        PRIMARY KEY,
    title       text        NOT NULL,
    description text        NOT NULL DEFAULT '',
    kind        text        NOT NULL,
    payload     jsonb       NOT NULL DEFAULT 'null',
    metadata    jsonb       NOT NULL DEFAULT '{}',
    priority    integer     NOT NULL DEFAULT 0,
    partition   integer     NOT NULL,
    status      text        NOT NULL CHECK (status IN ('inactive', 'active', 'completed', 'cancelled', 'failed')),
    phase       text        NOT NULL CHECK (phase IN ('spec_clarification', 'planning', 'development', 'review', 'completed', 'cancelled', 'failed')),
    last_error  text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text        NOT NULL
);

-- Keyset indexes: every ListTasks ordering has a plain (sort_key, task_id) index, and
-- the filters users reach for first (status above all) get a composite in front of the
-- orderings they are listed by. Other filter/order combinations use the plain ordering
-- index and filter rows as they are read. docs/architecture.md lists the set and why.
CREATE INDEX tasks_created_at_idx        ON tasks (created_at, task_id);
CREATE INDEX tasks_updated_at_idx        ON tasks (updated_at, task_id);
CREATE INDEX tasks_priority_idx          ON tasks (priority, task_id);
CREATE INDEX tasks_status_created_at_idx ON tasks (status, created_at, task_id);
CREATE INDEX tasks_status_updated_at_idx ON tasks (status, updated_at, task_id);
CREATE INDEX tasks_status_priority_idx   ON tasks (status, priority, task_id);
CREATE INDEX tasks_phase_updated_at_idx  ON tasks (phase, updated_at, task_id);
CREATE INDEX tasks_kind_created_at_idx   ON tasks (kind, created_at, task_id);
CREATE INDEX tasks_created_by_created_at_idx ON tasks (created_by, created_at, task_id);
-- Workers look for active tasks of their partitions.
CREATE INDEX tasks_active_partition_idx  ON tasks (partition) WHERE status = 'active';

-- The narrow, hot row every append updates. Primary key only and a fillfactor below
-- 100 so that the update is HOT (no index touched, the new tuple on the same page).
-- It holds every mutable field the state table decides on (status, phase, last_error
-- are copied to `tasks` for listing): commands lock this row and read it in the same
-- statement, and under READ COMMITTED a row lock re-reads only the locked row, so a
-- mutable field read from a joined table could be stale. kind and priority never
-- change, so they are safely joined from `tasks`.
CREATE TABLE task_heads (
    task_id        uuid        PRIMARY KEY REFERENCES tasks (task_id) ON DELETE CASCADE,
    version        bigint      NOT NULL,
    status         text        NOT NULL,
    phase          text        NOT NULL,
    last_error     text,
    pod_epoch      bigint      NOT NULL DEFAULT 0,
    owner_node     uuid,
    pod_state      text        NOT NULL DEFAULT 'none' CHECK (pod_state IN ('none', 'starting', 'running', 'stopping')),
    pod_started_at timestamptz,
    not_before     timestamptz,
    handler_state  jsonb
) WITH (fillfactor = 70);

-- The append-only log. Range-partitioned by the stream id: task ids are UUIDv7, whose
-- leading 48 bits are the creation time in milliseconds, so each partition holds the
-- tasks created in one month and all of a task's events live in one partition. That
-- keeps (stream_id, version) globally unique (a unique key must contain the partition
-- key) and lets retention drop whole months. recorded_at is when the event was written.
CREATE TABLE events (
    stream_id   uuid        NOT NULL,
    version     bigint      NOT NULL CHECK (version >= 1),
    type        text        NOT NULL,
    data        jsonb       NOT NULL,
    metadata    jsonb       NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    -- The writing transaction, for commit-order-safe resume across tasks: a reader serves
    -- only events whose tx_id is below pg_snapshot_xmin(pg_current_snapshot()).
    tx_id       xid8        NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (stream_id, version)
) PARTITION BY RANGE (stream_id);

-- Safety net for ids outside every monthly partition (clock skew, a missed maintenance
-- run). ensure_event_partitions() refuses to create a month the default already holds.
CREATE TABLE events_default PARTITION OF events DEFAULT;

-- The smallest UUIDv7 of a moment: its 48-bit millisecond timestamp, then zeros.
CREATE FUNCTION taskpod_uuid7_floor(ts timestamptz) RETURNS uuid
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT (lpad(to_hex((extract(epoch FROM ts) * 1000)::bigint), 12, '0') || '00000000000000000000')::uuid
$$;

-- Creates the monthly events partitions from `months_back` before to `months_ahead`
-- after the current month, skipping those that exist. Run by migrations and by
-- `Store::ensure_event_partitions` at start-up. Returns how many it created.
CREATE FUNCTION taskpod_ensure_event_partitions(months_back integer, months_ahead integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    month   timestamptz;
    created integer := 0;
    name    text;
BEGIN
    FOR i IN -months_back .. months_ahead LOOP
        month := date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' + make_interval(months => i);
        name := 'events_' || to_char(month AT TIME ZONE 'UTC', 'YYYY_MM');
        IF to_regclass(name) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF events FOR VALUES FROM (%L) TO (%L)',
                name,
                taskpod_uuid7_floor(month),
                taskpod_uuid7_floor(month + interval '1 month'));
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END
$$;

SELECT taskpod_ensure_event_partitions(1, 12);

-- One row per pod failure; (task_id, epoch) unique so one failure is never counted
-- twice. `at` is Postgres's clock, which the restart-window query also uses.
CREATE TABLE pod_crashes (
    task_id uuid        NOT NULL REFERENCES tasks (task_id) ON DELETE CASCADE,
    epoch   bigint      NOT NULL,
    node    uuid,
    reason  text        NOT NULL,
    kind    text        NOT NULL CHECK (kind IN ('handler', 'node_lost')),
    at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, epoch)
);

-- AIP-155 request ids, scoped to the principal that sent them. Written in the same
-- transaction as the change; pruned after the documented TTL (created_at index).
CREATE TABLE idempotency_keys (
    principal    text        NOT NULL,
    request_id   text        NOT NULL,
    method       text        NOT NULL,
    request_hash bytea       NOT NULL,
    response     jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (principal, request_id)
);
CREATE INDEX idempotency_keys_created_at_idx ON idempotency_keys (created_at);

-- Worker processes. node_id is per process (a restarted worker is a new incarnation);
-- name is the stable host name an operator recognises.
CREATE TABLE nodes (
    node_id      uuid        PRIMARY KEY,
    name         text        NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    capacity     integer     NOT NULL CHECK (capacity > 0),
    kinds        text[]      NOT NULL DEFAULT '{}',
    programs     text[]      NOT NULL DEFAULT '{}'
);
