//! What happened to records and calls: the counters job keeps for logs,
//! tests and `/metrics`, and their snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

/// What happened to records, for logs, metrics and tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub(crate) records: AtomicU64,
    pub(crate) poison: AtomicU64,
    pub(crate) unknown_comet: AtomicU64,
    pub(crate) comet_gone: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) calls: AtomicU64,
    pub(crate) room_batches: AtomicU64,
    pub(crate) room_frames: AtomicU64,
    pub(crate) push_batches: AtomicU64,
    pub(crate) push_batched: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) room_skipped: AtomicU64,
    pub(crate) queue_full: AtomicU64,
    /// The same events (and more) for Prometheus.
    pub(crate) metrics: crate::metrics::Metrics,
}

/// A copy of [`Stats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Records submitted (poison included).
    pub records: u64,
    /// Records skipped as undecodable or invalid.
    pub poison: u64,
    /// PUSH records for a comet not in the list (dropped).
    pub unknown_comet: u64,
    /// Calls dropped because their comet left the list while failing.
    pub comet_gone: u64,
    /// Calls a comet refused with a non-retryable error (dropped).
    pub rejected: u64,
    /// Successful gRPC calls.
    pub calls: u64,
    /// Successful `BroadcastRoom` calls.
    pub room_batches: u64,
    /// Frames carried by those calls.
    pub room_frames: u64,
    /// Successful `PushMsgs` calls (single-key pushes batched).
    pub push_batches: u64,
    /// Pushes carried by those calls.
    pub push_batched: u64,
    /// Poison records written to the dead-letter topic.
    pub dead_lettered: u64,
    /// Room sends skipped because the comet's fresh `Rooms` lacked the room.
    pub room_skipped: u64,
    /// Calls dropped because their comet already held `max_queued` calls.
    pub queue_full: u64,
}

impl Stats {
    /// The current counts.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            records: get(&self.records),
            poison: get(&self.poison),
            unknown_comet: get(&self.unknown_comet),
            comet_gone: get(&self.comet_gone),
            rejected: get(&self.rejected),
            calls: get(&self.calls),
            room_batches: get(&self.room_batches),
            room_frames: get(&self.room_frames),
            push_batches: get(&self.push_batches),
            push_batched: get(&self.push_batched),
            dead_lettered: get(&self.dead_lettered),
            room_skipped: get(&self.room_skipped),
            queue_full: get(&self.queue_full),
        }
    }
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}
