//! The comet set, kept in step with the node list: one [`Handle`] per listed
//! comet (its worker's queue, its queue bound, its rooms view), how calls are
//! queued on one, some or all comets, and how a comet's worker and rooms
//! poller are started.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald_protocol::pb::CometClient;
use herald_protocol::pb::push::comet_push_client::CometPushClient;
use herald_runtime::grpc_auth::Token;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tracing::{Instrument, info, info_span, warn};

use super::CallSettings;
use super::queue::{Call, Done, Item};
use super::rooms::{RoomView, poll_rooms};
use super::stats::Stats;
use super::worker::{Clients, Worker};

#[derive(Debug)]
struct Handle {
    addr: String,
    // Unbounded: the drivers bound the records in flight, which bounds this.
    tx: mpsc::UnboundedSender<Item>,
    /// Unfinished calls (queued or being sent), bounded by `max_queued`
    /// while `failing`.
    queued: Arc<AtomicUsize>,
    /// Whether the worker's last call attempt failed.
    failing: Arc<AtomicBool>,
    /// What the comet's `Rooms` said; shared with its poller.
    rooms: Arc<Mutex<RoomView>>,
    /// Cancelled when the comet leaves the list (on drop): stops the
    /// poller and wakes the worker from a backoff wait.
    poller: CancellationToken,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.poller.cancel();
    }
}

/// The current comets and their workers.
#[derive(Debug, Clone)]
pub(crate) struct Directory {
    // std Mutex: held only to look up or swap entries, never across an await.
    comets: Arc<Mutex<HashMap<String, Handle>>>,
    pub(super) settings: Arc<CallSettings>,
    /// Sent on every call: comets' gRPC ports may require it.
    token: Token,
    rooms_poll: Option<Duration>,
    pub(super) stats: Arc<Stats>,
    pub(super) cancel: CancellationToken,
}

impl Directory {
    pub(crate) fn new(
        settings: CallSettings,
        token: Token,
        rooms_poll: Option<Duration>,
        stats: Arc<Stats>,
        cancel: CancellationToken,
    ) -> Self {
        Directory {
            comets: Arc::default(),
            settings: Arc::new(settings),
            token,
            rooms_poll,
            stats,
            cancel,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Handle>> {
        match self.comets.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Replaces the comet list: new or moved comets get a worker, removed
    /// ones lose theirs (it finishes what it holds, then stops).
    pub(crate) fn set(&self, list: Vec<(String, String)>) {
        let mut comets = self.lock();
        let wanted: HashMap<String, String> = list.into_iter().collect();
        comets.retain(|name, handle| wanted.get(name) == Some(&handle.addr));
        for (name, addr) in wanted {
            if comets.contains_key(&name) {
                continue;
            }
            match self.spawn_worker(&name, &addr) {
                Ok(handle) => {
                    info!(comet = %name, %addr, "comet added");
                    comets.insert(name, handle);
                }
                Err(err) => {
                    warn!(comet = %name, %addr, cause = %err, "invalid comet address; ignored")
                }
            }
        }
    }

    /// Whether `name` is still listed at `addr`.
    pub(super) fn contains(&self, name: &str, addr: &str) -> bool {
        self.lock().get(name).is_some_and(|h| h.addr == addr)
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Queues `call` on the named comet; `None` when it is not listed.
    pub(crate) fn send_to(&self, name: &str, call: Call) -> Option<oneshot::Receiver<()>> {
        let comets = self.lock();
        let handle = comets.get(name)?;
        self.enqueue(name, handle, call)
    }

    /// Queues one call, or drops it (completed at once, counted) when the
    /// comet is failing and already holds `max_queued` unfinished calls.
    fn enqueue(&self, name: &str, handle: &Handle, call: Call) -> Option<oneshot::Receiver<()>> {
        let (tx, rx) = oneshot::channel();
        let held = handle.queued.fetch_add(1, Ordering::Relaxed);
        let done = Done::new(tx, handle.queued.clone());
        if held >= self.settings.max_queued && handle.failing.load(Ordering::Relaxed) {
            self.stats.metrics.dropped(name, "comet_queue_full");
            let _ = done.send(());
            return Some(rx);
        }
        handle.tx.send(Item { call, done }).ok()?;
        Some(rx)
    }

    /// Queues `make()` on every listed comet that may have members in
    /// `room` (see [`RoomView`]); skipped comets are counted.
    pub(crate) fn send_to_room(
        &self,
        room: &str,
        make: impl Fn() -> Call,
    ) -> Vec<oneshot::Receiver<()>> {
        let comets = self.lock();
        let now = Instant::now();
        comets
            .iter()
            .filter_map(|(name, handle)| {
                if let Some(every) = self.rooms_poll {
                    let view = match handle.rooms.lock() {
                        Ok(view) => view,
                        Err(poisoned) => poisoned.into_inner(),
                    };
                    if view.skips(room, every, now) {
                        self.stats.metrics.room_skipped(name);
                        return None;
                    }
                }
                self.enqueue(name, handle, make())
            })
            .collect()
    }

    /// Queues `make()` on every listed comet.
    pub(crate) fn send_to_all(&self, make: impl Fn() -> Call) -> Vec<oneshot::Receiver<()>> {
        let comets = self.lock();
        comets
            .iter()
            .filter_map(|(name, handle)| self.enqueue(name, handle, make()))
            .collect()
    }

    fn spawn_worker(&self, name: &str, addr: &str) -> Result<Handle, tonic::transport::Error> {
        let uri = if addr.contains("://") {
            addr.to_owned()
        } else {
            format!("http://{addr}")
        };
        // Lazy: a comet that is not up yet costs nothing until a call needs it.
        let channel = Endpoint::from_shared(uri)?
            .connect_timeout(self.settings.timeout)
            .timeout(self.settings.timeout)
            .connect_lazy();
        let channel = self.token.channel(channel);
        let (tx, rx) = mpsc::unbounded_channel();
        let client = CometClient::new(channel.clone());
        let push_client = CometPushClient::new(channel);
        let rooms = Arc::new(Mutex::new(RoomView::default()));
        let poller = self.cancel.child_token();
        if let Some(every) = self.rooms_poll {
            tokio::spawn(
                poll_rooms(
                    client.clone(),
                    rooms.clone(),
                    every,
                    self.settings.timeout,
                    poller.clone(),
                )
                .instrument(info_span!("rooms", comet = %name)),
            );
        }
        let failing = Arc::new(AtomicBool::new(false));
        let queued = Arc::new(AtomicUsize::new(0));
        let worker = Worker {
            name: name.to_owned(),
            addr: addr.to_owned(),
            failing: failing.clone(),
            removed: poller.clone(),
            gone_logged: false,
            queued: queued.clone(),
            rx,
            clients: Clients {
                comet: client,
                push: push_client,
                batches: true,
            },
            directory: self.clone(),
        };
        tokio::spawn(worker.run().instrument(info_span!("comet", comet = %name)));
        Ok(Handle {
            addr: addr.to_owned(),
            tx,
            queued,
            failing,
            rooms,
            poller,
        })
    }
}
