//! The comets job delivers to: a directory of `name → gRPC address`, and one
//! worker task per comet that owns its lazily-connected channel.
//!
//! A worker takes calls in the order records were submitted. When it is idle
//! a call goes out at once; calls that arrive while one is in flight queue up
//! and go out together next, with room frames merged per room into one
//! `BroadcastRoom` (at most `batch_frames` frames / `batch_bytes` bytes).
//! Frames of one room keep their order because one worker sends them, batch
//! after batch. Unlike goim (flush at 20 frames or 1 s), an idle comet gets
//! a room push with no delay; batches only form under load.
//!
//! Each call completes its records' `done` senders; a worker stopped by
//! shutdown drops them instead, which the caller reads as "abandoned" (not
//! delivered, offset not stored).
//!
//! # A slow or dead comet does not hold up the others
//! Records in flight are bounded for the whole job; without a bound per
//! comet, one comet that never answers would collect every in-flight slot
//! while its calls are retried, and delivery to all comets would stop. So
//! a comet whose last call failed (it is being retried) holds at most
//! `max_queued` unfinished calls; a call beyond that is dropped at once,
//! counted (`comet_queue_full`), and its record may complete: the clients
//! of a comet that cannot be reached lose those pushes, everyone else keeps
//! getting theirs. A comet that answers keeps every call (a burst only
//!
//! # Layout
//! - `directory`: the comet set, kept in step with the node list, and how
//!   calls are queued on it.
//! - `queue`: what a queued call is and how it completes.
//! - `worker`: one comet's worker (gathering, grouping, shedding).
//! - `batch`: cutting gathered calls into batches within the caps.
//! - `call`: the gRPC call to a comet and its retries.
//! - `rooms`: which comets a room push may skip (the `Rooms` poller).
//! - `stats`: the counters.

mod batch;
mod call;
mod directory;
mod queue;
mod rooms;
mod stats;
mod worker;

use std::time::Duration;

pub(crate) use self::directory::Directory;
pub(crate) use self::queue::Call;
pub use self::stats::{Stats, StatsSnapshot};

/// How workers call comets.
#[derive(Debug, Clone)]
pub struct CallSettings {
    /// Deadline of one gRPC call.
    pub timeout: Duration,
    /// Attempts on a retryable error before checking whether the comet is
    /// still listed (then: drop if gone, another round if not).
    pub attempts: u32,
    /// First retry delay; doubles up to `backoff_max`.
    pub backoff: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Most frames in one `BroadcastRoom` batch, and most pushes in one
    /// `PushMsgs` batch.
    pub batch_frames: usize,
    /// Most frame bytes in one `BroadcastRoom` or `PushMsgs` batch.
    pub batch_bytes: usize,
    /// Most unfinished calls one comet may hold before new ones are dropped.
    pub max_queued: usize,
}
