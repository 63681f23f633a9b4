//! What happened to records and calls, as logs and tests read it: a
//! snapshot of job's Prometheus counters.

/// What happened to records and calls, for logs, metrics and tests. The
/// counts live only in job's Prometheus registry ([`crate::metrics::Metrics`]);
/// [`Stats::snapshot`] reads them back.
#[derive(Debug, Default)]
pub struct Stats {
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
        self.metrics.snapshot()
    }
}
