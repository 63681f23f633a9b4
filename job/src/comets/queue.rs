//! What goes on a comet's queue: the [`Call`] a record needs, the [`Item`]
//! carrying it, and the [`Done`] that completes it for its record and gives
//! back its place in the comet's queue (which bounds a failing comet).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::sync::oneshot;

/// One call a record needs on one comet. `frame` is the encoded client frame.
#[derive(Debug)]
pub(crate) enum Call {
    Push {
        keys: Vec<String>,
        op: i32,
        frame: Bytes,
    },
    Broadcast {
        op: i32,
        speed: i32,
        frame: Bytes,
    },
    Room {
        room: String,
        frame: Bytes,
    },
}

/// A call and who waits for it. The sender is completed when the call
/// succeeded or was dropped for good, and dropped unsent on shutdown.
#[derive(Debug)]
pub(crate) struct Item {
    pub(crate) call: Call,
    pub(crate) done: Done,
}

/// Completes one call for its record, and frees the call's place in its
/// comet's queue when dropped (sent or not).
#[derive(Debug)]
pub(crate) struct Done {
    tx: oneshot::Sender<()>,
    _slot: Slot,
}

impl Done {
    pub(super) fn new(tx: oneshot::Sender<()>, queued: Arc<AtomicUsize>) -> Self {
        Done {
            tx,
            _slot: Slot(queued),
        }
    }

    pub(super) fn send(self, value: ()) -> Result<(), ()> {
        self.tx.send(value)
    }
}

/// One place in a comet's queue, given back on drop.
#[derive(Debug)]
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
