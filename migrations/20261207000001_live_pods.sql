-- no-transaction
-- Every live pod (minted, running or stopping), by owner: what a worker reads to find
-- the pods a lost node left behind on its partitions, whatever their task's status, so
-- no task that ended while its node died keeps a phantom pod. Partial, so it holds only
-- the pods alive now (bounded by the cluster's capacity), and only the updates that
-- mint, start or end a pod touch it: a phase change on the head stays a HOT update.
-- Built concurrently: on a live cluster the heads must stay writable meanwhile.
CREATE INDEX CONCURRENTLY IF NOT EXISTS task_heads_live_pods_idx
    ON task_heads (owner_node) WHERE pod_state <> 'none';
