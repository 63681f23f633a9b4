//! Per-partition offset tracking for at-least-once delivery.
//!
//! Records of one partition may finish out of order (different comets answer
//! at different speeds), so the offset handed to Kafka is the *lowest offset
//! still in flight*: everything below it is done. A record that is never
//! completed (abandoned at shutdown) pins its partition's stored offset, and
//! the group redelivers it after a restart.

use std::collections::{BTreeSet, HashMap};

/// Offsets started and not yet completed, per partition.
#[derive(Debug, Default)]
pub struct Tracker {
    partitions: HashMap<i32, Partition>,
}

#[derive(Debug, Default)]
struct Partition {
    pending: BTreeSet<i64>,
    /// Highest offset ever started.
    highest: Option<i64>,
    /// Last value handed out by [`Tracker::complete`] (or the first offset
    /// started, which is already the group's position).
    stored: Option<i64>,
}

impl Tracker {
    /// Records that `offset` of `partition` is being delivered.
    pub fn start(&mut self, partition: i32, offset: i64) {
        // The first offset seen is where the group resumed: nothing to store yet.
        let p = self
            .partitions
            .entry(partition)
            .or_insert_with(|| Partition {
                stored: Some(offset),
                ..Partition::default()
            });
        p.pending.insert(offset);
        p.highest = Some(p.highest.map_or(offset, |h| h.max(offset)));
    }

    /// Marks `offset` done. Returns the next offset to store (the first one
    /// not known to be done) when it moved forward.
    pub fn complete(&mut self, partition: i32, offset: i64) -> Option<i64> {
        let p = self.partitions.get_mut(&partition)?;
        p.pending.remove(&offset);
        let next = match p.pending.first() {
            Some(&lowest) => lowest,
            None => p.highest? + 1,
        };
        if p.stored.is_some_and(|stored| stored >= next) {
            return None;
        }
        p.stored = Some(next);
        Some(next)
    }

    /// Forgets a partition (after it was revoked from this consumer).
    pub fn forget(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    /// Records still in flight, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(|p| p.pending.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_completion_advances_one_by_one() {
        let mut t = Tracker::default();
        t.start(0, 10);
        t.start(0, 11);
        assert_eq!(t.complete(0, 10), Some(11));
        assert_eq!(t.complete(0, 11), Some(12));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn out_of_order_completion_waits_for_the_gap() {
        let mut t = Tracker::default();
        for o in 5..9 {
            t.start(3, o);
        }
        assert_eq!(t.complete(3, 7), None, "5 is still pending");
        assert_eq!(t.complete(3, 6), None);
        assert_eq!(t.complete(3, 5), Some(8), "5..=7 done, 8 pending");
        assert_eq!(t.complete(3, 8), Some(9));
    }

    #[test]
    fn a_partition_that_comes_back_after_revocation_starts_fresh() {
        let mut t = Tracker::default();
        t.start(0, 100);
        t.start(0, 200);
        // Revoked with 100 and 200 in flight; another member commits 150.
        t.forget(0);
        // Back to us from 150: the old run's "highest started" (200) must
        // not let 151..=200 be skipped.
        t.start(0, 150);
        assert_eq!(t.complete(0, 200), None, "stale completion is ignored");
        assert_eq!(t.complete(0, 150), Some(151));
    }

    #[test]
    fn partitions_are_independent_and_abandoned_records_pin() {
        let mut t = Tracker::default();
        t.start(0, 1);
        t.start(1, 100);
        t.start(0, 2);
        assert_eq!(t.complete(1, 100), Some(101));
        // Offset 1 is never completed (abandoned): 2 finishing stores nothing.
        assert_eq!(t.complete(0, 2), None);
        assert_eq!(t.in_flight(), 1);
        assert_eq!(t.complete(9, 1), None, "unknown partition");
        t.forget(0);
        assert_eq!(t.in_flight(), 0);
    }
}
