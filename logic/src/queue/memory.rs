//! [`PushQueue`] as a bounded in-process channel for `herald standalone`:
//! the job side holds the receiver. `push` waits for room in the channel
//! (backpressure instead of unbounded memory) and fails once the receiver is
//! gone, so the HTTP API answers 503 rather than dropping pushes silently.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use futures::future::BoxFuture;
use herald_protocol::pb::PushMsg;
use tokio::sync::mpsc;

use super::{Error, PushQueue, RecordId, Result};

/// One queued record: the §10 record key and the value.
pub type Record = (String, PushMsg);

/// In-memory push queue.
#[derive(Debug, Clone)]
pub struct MemoryQueue {
    tx: mpsc::Sender<Record>,
    /// Message ids: records numbered from 0 in acceptance order.
    next: Arc<AtomicI64>,
}

impl MemoryQueue {
    /// A queue holding up to `capacity` records, and its consuming end.
    pub fn new(capacity: usize) -> (Self, mpsc::Receiver<Record>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            MemoryQueue {
                tx,
                next: Arc::new(AtomicI64::new(0)),
            },
            rx,
        )
    }
}

impl PushQueue for MemoryQueue {
    fn push<'a>(&'a self, key: &'a str, msg: &'a PushMsg) -> BoxFuture<'a, Result<RecordId>> {
        Box::pin(async move {
            // Reserve a slot first so the id is taken only by records that
            // are really queued, in queue order.
            let permit = self.tx.reserve().await.map_err(|_| Error::Closed)?;
            let offset = self.next.fetch_add(1, Ordering::Relaxed);
            permit.send((key.to_owned(), msg.clone()));
            Ok(RecordId {
                partition: 0,
                offset,
            })
        })
    }

    fn ready(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if self.tx.is_closed() {
                Err(Error::Closed)
            } else {
                Ok(())
            }
        })
    }
}
