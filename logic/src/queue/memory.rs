//! [`PushQueue`] as a bounded in-process channel for `herald standalone`:
//! the job side holds the receiver. `push` waits for room in the channel
//! (backpressure instead of unbounded memory) and fails once the receiver is
//! gone, so the HTTP API answers 503 rather than dropping pushes silently.

use futures::future::BoxFuture;
use herald_protocol::pb::PushMsg;
use tokio::sync::mpsc;

use super::{Error, PushQueue, Result};

/// One queued record: the §10 record key and the value.
pub type Record = (String, PushMsg);

/// In-memory push queue.
#[derive(Debug, Clone)]
pub struct MemoryQueue {
    tx: mpsc::Sender<Record>,
}

impl MemoryQueue {
    /// A queue holding up to `capacity` records, and its consuming end.
    pub fn new(capacity: usize) -> (Self, mpsc::Receiver<Record>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (MemoryQueue { tx }, rx)
    }
}

impl PushQueue for MemoryQueue {
    fn push<'a>(&'a self, key: &'a str, msg: &'a PushMsg) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.tx
                .send((key.to_owned(), msg.clone()))
                .await
                .map_err(|_| Error::Closed)
        })
    }
}
