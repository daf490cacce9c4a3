//! The stable task -> partition hash.
//!
//! It must never change: a task's partition is stored with it and workers claim
//! partitions by number. FNV-1a over the id's 16 bytes is simple, stable across
//! platforms and releases (unlike `std`'s hasher), and spreads UUIDv7's random tail well.

use super::ids::TaskId;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The partition of `task` among `count` partitions. `count` must be positive.
pub fn partition_of(task: TaskId, count: u32) -> u32 {
    let hash = task.as_uuid().as_bytes().iter().fold(FNV_OFFSET, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(FNV_PRIME)
    });
    (hash % u64::from(count.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use uuid::Uuid;

    #[test]
    fn known_ids_hash_to_fixed_partitions() {
        // Pinned values: if these change, every stored task is in the wrong partition.
        assert_eq!(partition_of(TaskId(Uuid::nil()), 256), 101);
        assert_eq!(partition_of(TaskId(Uuid::max()), 256), 85);
    }

    #[test]
    fn new_ids_spread_over_partitions() {
        let mut seen = [0u32; 16];
        for _ in 0..16_000 {
            seen[partition_of(TaskId::new(), 16) as usize] += 1;
        }
        for n in seen {
            assert!((700..1300).contains(&n), "skewed spread: {seen:?}");
        }
    }

    proptest! {
        #[test]
        fn partition_is_in_range(bytes in any::<[u8; 16]>(), count in 1u32..4096) {
            let id = TaskId(Uuid::from_bytes(bytes));
            prop_assert!(partition_of(id, count) < count);
        }
    }
}
