//! The advisory-lock key scheme, shared by the workers that hold the locks (on their
//! dedicated lock sessions) and the store statements that check them.
//!
//! Two-int keys: `(PARTITION_NAMESPACE, partition)` for partition ownership, and
//! `(NODE_NAMESPACE, nodes.lock_key)` for a node's own liveness key, held for as long as
//! its lock session lives. Every fenced worker write (a mint, a crash record) checks in
//! the same transaction that the writing node's key is still held, with
//! `pg_try_advisory_xact_lock_shared`: a shared lock is granted only when no session
//! holds the key exclusively, so getting it means the node's lock session is gone, and
//! the write is refused. The shared lock itself is released at commit.

/// "tp" + 1: partition keys.
pub const PARTITION_NAMESPACE: i32 = 0x7470_0001;
/// "tp" + 2: node liveness keys.
pub const NODE_NAMESPACE: i32 = 0x7470_0002;

/// A two-int advisory key.
pub type Key = (i32, i32);

/// The key a node holds for as long as its lock session lives.
pub fn node_key(lock_key: i32) -> Key {
    (NODE_NAMESPACE, lock_key)
}

/// The key whose holder owns `partition`.
pub fn partition_key(partition: i32) -> Key {
    (PARTITION_NAMESPACE, partition)
}

/// A SQL expression, true while the lock session of the node whose id is the given
/// parameter (e.g. `$4`) lives. A node without a row is not alive.
macro_rules! node_alive_sql {
    ($node:literal) => {
        concat!(
            "EXISTS (SELECT 1 FROM nodes n WHERE n.node_id = ",
            $node,
            " AND NOT pg_try_advisory_xact_lock_shared(1953497090, n.lock_key))"
        )
    };
}
pub(crate) use node_alive_sql;

#[cfg(test)]
mod tests {
    #[test]
    fn the_sql_checks_the_node_namespace() {
        assert_eq!(super::NODE_NAMESPACE, 1_953_497_090);
        assert!(node_alive_sql!("$1").contains("1953497090"));
    }
}
