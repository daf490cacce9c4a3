//! The publisher's queue: bounded, and when full it drops its oldest items first.
//!
//! A queued update only hints that something changed, and readers repair a lost hint
//! from Postgres within their repair interval. The oldest hints are the ones most
//! likely repaired already, so a full queue makes room at its front: what reaches Redis
//! after a stall is the most recent news, and memory stays bounded however long Redis
//! stays away.

use std::collections::VecDeque;

#[derive(Debug)]
pub(super) struct Backlog<T> {
    items: VecDeque<T>,
    capacity: usize,
}

impl<T> Backlog<T> {
    /// A queue of at most `capacity` items (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            items: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Queues `items` in order and returns the items dropped to make room: the oldest
    /// queued ones, and the first of `items` themselves when they alone exceed the
    /// capacity.
    pub fn push(&mut self, items: impl IntoIterator<Item = T>) -> Vec<T> {
        let mut dropped = Vec::new();
        for item in items {
            if self.items.len() == self.capacity {
                dropped.extend(self.items.pop_front());
            }
            self.items.push_back(item);
        }
        dropped
    }

    /// Takes up to `max` of the oldest items.
    pub fn take(&mut self, max: usize) -> Vec<T> {
        let n = max.min(self.items.len());
        self.items.drain(..n).collect()
    }

    /// Takes everything.
    pub fn take_all(&mut self) -> Vec<T> {
        self.items.drain(..).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_come_out_in_order_in_takes_of_at_most_max() {
        let mut q = Backlog::new(10);
        assert!(q.push([1, 2, 3, 4, 5]).is_empty());
        assert_eq!(q.take(2), [1, 2]);
        assert_eq!(q.take(10), [3, 4, 5]);
        assert!(q.take(3).is_empty());
        assert!(q.is_empty());
    }

    #[test]
    fn a_full_queue_drops_its_oldest_items_and_keeps_its_bound() {
        let mut q = Backlog::new(3);
        assert!(q.push([1, 2, 3]).is_empty());
        assert_eq!(q.push([4]), [1]);
        assert_eq!(q.push([5, 6]), [2, 3]);
        assert_eq!(q.take_all(), [4, 5, 6]);
    }

    #[test]
    fn a_push_larger_than_the_capacity_keeps_its_newest_items() {
        let mut q = Backlog::new(2);
        q.push([1]);
        assert_eq!(q.push([10, 11, 12, 13]), [1, 10, 11]);
        assert_eq!(q.take_all(), [12, 13]);
    }

    #[test]
    fn a_zero_capacity_still_holds_one_item() {
        let mut q = Backlog::new(0);
        assert_eq!(q.push([1, 2]), [1]);
        assert_eq!(q.take_all(), [2]);
    }
}
