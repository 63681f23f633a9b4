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
//! waits), so healthy comets never drop.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use herald_protocol::pb::goim::comet::RoomsReq;
use herald_protocol::pb::push::PushMsgsReq;
use herald_protocol::pb::push::comet_push_client::CometPushClient;
use herald_protocol::pb::{BroadcastReq, BroadcastRoomReq, CometClient, PushMsgReq};
use herald_protocol::ws;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tracing::{Instrument, debug, info, info_span, warn};

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
    fn new(tx: oneshot::Sender<()>, queued: Arc<AtomicUsize>) -> Self {
        Done {
            tx,
            _slot: Slot(queued),
        }
    }

    fn send(self, value: ()) -> Result<(), ()> {
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
    /// Stops the poller when the comet leaves the list (on drop).
    poller: CancellationToken,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.poller.cancel();
    }
}

/// One comet's rooms as seen by its last `Rooms` polls.
///
/// # The race, and which side we err on
/// A client may join a room on a comet right after a poll that found the
/// room empty there; a room push sent before the next poll would skip that
/// comet and the client would miss it. That cannot be closed from job's
/// side without the comet telling it of every join, so a comet is skipped
/// only when all of these hold, and is sent to otherwise:
/// - its last poll succeeded and is at most two intervals old (a failing,
///   slow or never-answered comet always gets the push);
/// - its rooms set did not change in the last two intervals (a comet whose
///   rooms are moving is likely gaining members);
/// - the room is not in that set.
///
/// What remains: a client joining a room on a comet whose rooms set was
/// stable may miss room pushes for up to one poll interval after it joined.
#[derive(Debug, Default)]
struct RoomView {
    last: Option<(HashSet<String>, Instant)>,
    changed: Option<Instant>,
}

impl RoomView {
    fn update(&mut self, answer: Option<HashSet<String>>, now: Instant) {
        match answer {
            None => self.last = None,
            Some(rooms) => {
                // A first answer (or one after failures) counts as a change:
                // skipping starts only once a comet's rooms have held still.
                if self.last.as_ref().is_none_or(|(old, _)| *old != rooms) {
                    self.changed = Some(now);
                }
                self.last = Some((rooms, now));
            }
        }
    }

    fn skips(&self, room: &str, every: Duration, now: Instant) -> bool {
        let Some((rooms, at)) = &self.last else {
            return false;
        };
        let recent = |t: Instant| now.saturating_duration_since(t) <= every * 2;
        recent(*at) && !self.changed.is_some_and(recent) && !rooms.contains(room)
    }
}

/// The current comets and their workers.
#[derive(Debug, Clone)]
pub(crate) struct Directory {
    // std Mutex: held only to look up or swap entries, never across an await.
    comets: Arc<Mutex<HashMap<String, Handle>>>,
    settings: Arc<CallSettings>,
    rooms_poll: Option<Duration>,
    stats: Arc<Stats>,
    cancel: CancellationToken,
}

impl Directory {
    pub(crate) fn new(
        settings: CallSettings,
        rooms_poll: Option<Duration>,
        stats: Arc<Stats>,
        cancel: CancellationToken,
    ) -> Self {
        Directory {
            comets: Arc::default(),
            settings: Arc::new(settings),
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
    fn contains(&self, name: &str, addr: &str) -> bool {
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
            bump(&self.stats.queue_full);
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
                        bump(&self.stats.room_skipped);
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

/// Asks a comet for its rooms every `every` until `stop`; a failed answer
/// makes the view unknown (room pushes go to this comet).
async fn poll_rooms(
    mut client: CometClient<Channel>,
    view: Arc<Mutex<RoomView>>,
    every: Duration,
    timeout: Duration,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let answer = tokio::select! {
            () = stop.cancelled() => return,
            answer = tokio::time::timeout(timeout, client.rooms(RoomsReq {})) => answer,
        };
        let rooms = match answer {
            Ok(Ok(reply)) => Some(
                reply
                    .into_inner()
                    .rooms
                    .into_iter()
                    .filter_map(|(room, member)| member.then_some(room))
                    .collect(),
            ),
            Ok(Err(status)) => {
                debug!(code = ?status.code(), cause = status.message(), "Rooms failed");
                None
            }
            Err(_) => {
                debug!("Rooms timed out");
                None
            }
        };
        let mut view = match view.lock() {
            Ok(view) => view,
            Err(poisoned) => poisoned.into_inner(),
        };
        view.update(rooms, Instant::now());
    }
}

/// Frames of one room gathered in one drain, in arrival order.
type RoomFrames = Vec<(Bytes, Done)>;

#[derive(Debug)]
struct Worker {
    name: String,
    addr: String,
    failing: Arc<AtomicBool>,
    /// Unfinished calls of this comet (shared with its [`Handle`]).
    queued: Arc<AtomicUsize>,
    rx: mpsc::UnboundedReceiver<Item>,
    clients: Clients,
    directory: Directory,
}

/// One comet's gRPC clients, over one channel.
#[derive(Debug)]
struct Clients {
    comet: CometClient<Channel>,
    push: CometPushClient<Channel>,
    /// Whether to send runs of pushes as one `PushMsgs`: true until the
    /// comet answers UNIMPLEMENTED (goim's comet), then one `PushMsg` each.
    batches: bool,
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    Delivered,
    /// Refused for good or its comet left the list (counted).
    Dropped,
    /// The comet does not serve this method (a `PushMsgs` to goim's comet).
    Unsupported,
}

/// Calls taken off the queue in one go before a worker calls again.
const DRAIN_MAX: usize = 1024;

impl Worker {
    async fn run(mut self) {
        let cancel = self.directory.cancel.clone();
        loop {
            let first = tokio::select! {
                () = cancel.cancelled() => return,
                item = self.rx.recv() => match item {
                    Some(item) => item,
                    None => return,
                },
            };
            let mut drained = vec![first];
            // At most `max_queued` in hand, so shedding (below) can bring a
            // failing comet down to its bound from the queue alone.
            let limit = DRAIN_MAX.min(self.directory.settings.max_queued.max(1));
            while drained.len() < limit {
                match self.rx.try_recv() {
                    Ok(item) => drained.push(item),
                    Err(_) => break,
                }
            }
            // Room frames grouped per room (first-seen order); other calls
            // keep their order. Different targets, so no order between them.
            let mut rooms: Vec<(String, RoomFrames)> = Vec::new();
            let mut others = Vec::new();
            for Item { call, done } in drained {
                match call {
                    Call::Room { room, frame } => {
                        match rooms.iter_mut().find(|(r, _)| *r == room) {
                            Some((_, frames)) => frames.push((frame, done)),
                            None => rooms.push((room, vec![(frame, done)])),
                        }
                    }
                    call => others.push((Request::from_call(call), done)),
                }
            }
            let mut others = others.into_iter().peekable();
            while let Some((req, done)) = others.next() {
                let Request::Push(push) = req else {
                    if self.deliver(&req).await.is_none() {
                        return;
                    }
                    let _ = done.send(());
                    continue;
                };
                // A run of consecutive pushes goes out in batches within the
                // caps, as room frames do: comet keeps the order of a batch.
                let mut run = vec![(push, done)];
                while let Some((Request::Push(push), done)) =
                    others.next_if(|(req, _)| matches!(req, Request::Push(_)))
                {
                    run.push((push, done));
                }
                for batch in batches(run, &self.directory.settings, |(push, _)| {
                    push.proto.as_ref().map_or(0, |p| p.body.len())
                }) {
                    if self.send_pushes(batch).await.is_none() {
                        return;
                    }
                }
            }
            for (room, frames) in rooms {
                for batch in batches(frames, &self.directory.settings, |(f, _)| f.len()) {
                    let mut body =
                        BytesMut::with_capacity(batch.iter().map(|(f, _)| f.len()).sum());
                    for (frame, _) in &batch {
                        body.extend_from_slice(frame);
                    }
                    let n = batch.len() as u64;
                    let req = BroadcastRoomReq {
                        room_id: room.clone(),
                        proto: Some(ws::raw_proto(body.freeze())),
                    };
                    match self.deliver(&Request::Room(req)).await {
                        None => return,
                        Some(Sent::Delivered) => {
                            let stats = &self.directory.stats;
                            bump(&stats.room_batches);
                            stats.room_frames.fetch_add(n, Ordering::Relaxed);
                        }
                        Some(Sent::Dropped | Sent::Unsupported) => {}
                    }
                    for (_, done) in batch {
                        let _ = done.send(());
                    }
                }
            }
        }
    }

    /// Sends a run of pushes: one `PushMsgs` when there are several and the
    /// comet serves it, else one `PushMsg` each, in order. `None` on shutdown.
    async fn send_pushes(&mut self, run: Vec<(PushMsgReq, Done)>) -> Option<()> {
        let (pushes, dones): (Vec<_>, Vec<_>) = run.into_iter().unzip();
        if pushes.len() > 1 && self.clients.batches {
            let n = pushes.len() as u64;
            let req = Request::Batch(PushMsgsReq { pushes });
            match self.deliver(&req).await? {
                Sent::Unsupported => {
                    info!(
                        "comet does not serve herald.push.v1 PushMsgs (goim's comet?); one PushMsg per push from now on"
                    );
                    self.clients.batches = false;
                    let Request::Batch(PushMsgsReq { pushes }) = req else {
                        unreachable!("built as a batch above")
                    };
                    return self.send_each(pushes, dones).await;
                }
                Sent::Delivered => {
                    let stats = &self.directory.stats;
                    bump(&stats.push_batches);
                    stats.push_batched.fetch_add(n, Ordering::Relaxed);
                }
                Sent::Dropped => {}
            }
            for done in dones {
                let _ = done.send(());
            }
            return Some(());
        }
        self.send_each(pushes, dones).await
    }

    async fn send_each(&mut self, pushes: Vec<PushMsgReq>, dones: Vec<Done>) -> Option<()> {
        for (push, done) in pushes.into_iter().zip(dones) {
            self.deliver(&Request::Push(push)).await?;
            let _ = done.send(());
        }
        Some(())
    }

    /// Calls until success, a permanent failure or the comet leaving the
    /// list (dropped, counted), or shutdown (`None`).
    async fn deliver(&mut self, req: &Request) -> Option<Sent> {
        let settings = self.directory.settings.clone();
        let stats = self.directory.stats.clone();
        let cancel = self.directory.cancel.clone();
        let mut attempt = 0u32;
        let mut delay = settings.backoff;
        loop {
            let started = Instant::now();
            let result = tokio::select! {
                () = cancel.cancelled() => return None,
                result = req.call(&mut self.clients) => result,
            };
            stats.metrics.call_took(req.name(), started.elapsed());
            let status = match result {
                Ok(()) => {
                    self.failing.store(false, Ordering::Relaxed);
                    bump(&stats.calls);
                    return Some(Sent::Delivered);
                }
                Err(status) => status,
            };
            if status.code() == tonic::Code::Unimplemented && matches!(req, Request::Batch(_)) {
                return Some(Sent::Unsupported);
            }
            self.failing.store(true, Ordering::Relaxed);
            stats.metrics.call_failed(&self.name);
            if !retryable(status.code()) {
                bump(&stats.rejected);
                stats.metrics.dropped(&self.name, "rejected");
                warn!(rpc = req.name(), code = ?status.code(), message = status.message(), "comet refused the call; dropped");
                return Some(Sent::Dropped);
            }
            attempt += 1;
            if attempt >= settings.attempts.max(1) {
                if !self.directory.contains(&self.name, &self.addr) {
                    bump(&stats.comet_gone);
                    stats.metrics.dropped(&self.name, "comet_gone");
                    warn!(
                        rpc = req.name(),
                        "comet left the list while failing; dropped"
                    );
                    return Some(Sent::Dropped);
                }
                warn!(rpc = req.name(), attempts = attempt, cause = %status.message(), "comet unavailable; still listed, retrying");
                attempt = 0;
            } else {
                debug!(rpc = req.name(), attempt, cause = %status.message(), "retrying");
            }
            stats.metrics.retry(&self.name);
            self.shed();
            tokio::select! {
                () = cancel.cancelled() => return None,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(settings.backoff_max);
        }
    }
}

impl Worker {
    /// While this comet fails, drops queued calls beyond `max_queued`
    /// (completed and counted), so its records do not pin in-flight slots.
    fn shed(&mut self) {
        let max = self.directory.settings.max_queued;
        while self.queued.load(Ordering::Relaxed) > max {
            let Ok(item) = self.rx.try_recv() else { break };
            bump(&self.directory.stats.queue_full);
            self.directory
                .stats
                .metrics
                .dropped(&self.name, "comet_queue_full");
            let _ = item.done.send(());
        }
    }
}

/// Splits one room's frames, or a run of pushes, into batches within the
/// frame and byte caps (`size` gives an item's frame bytes), in order; a
/// single item above the byte cap goes alone.
fn batches<T>(items: Vec<T>, settings: &CallSettings, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = Vec::new();
    let mut current: Vec<T> = Vec::new();
    let mut bytes = 0;
    for item in items {
        let len = size(&item);
        let full = current.len() >= settings.batch_frames.max(1)
            || (!current.is_empty() && bytes + len > settings.batch_bytes);
        if full {
            out.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += len;
        current.push(item);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

fn retryable(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::ResourceExhausted
            | tonic::Code::Aborted
            | tonic::Code::Cancelled
    )
}

/// One gRPC request, cloned per attempt (bodies are shared [`Bytes`]).
#[derive(Debug)]
enum Request {
    Push(PushMsgReq),
    Batch(PushMsgsReq),
    Broadcast(BroadcastReq),
    Room(BroadcastRoomReq),
}

impl Request {
    fn from_call(call: Call) -> Request {
        match call {
            Call::Push { keys, op, frame } => Request::Push(PushMsgReq {
                keys,
                proto_op: op,
                proto: Some(ws::raw_proto(frame)),
            }),
            Call::Broadcast { op, speed, frame } => Request::Broadcast(BroadcastReq {
                proto_op: op,
                proto: Some(ws::raw_proto(frame)),
                speed,
            }),
            Call::Room { room, frame } => Request::Room(BroadcastRoomReq {
                room_id: room,
                proto: Some(ws::raw_proto(frame)),
            }),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Request::Push(_) => "PushMsg",
            Request::Batch(_) => "PushMsgs",
            Request::Broadcast(_) => "Broadcast",
            Request::Room(_) => "BroadcastRoom",
        }
    }

    async fn call(&self, clients: &mut Clients) -> Result<(), tonic::Status> {
        let client = &mut clients.comet;
        match self {
            Request::Push(req) => client.push_msg(req.clone()).await.map(drop),
            Request::Batch(req) => clients.push.push_msgs(req.clone()).await.map(drop),
            Request::Broadcast(req) => client.broadcast(req.clone()).await.map(drop),
            Request::Room(req) => client.broadcast_room(req.clone()).await.map(drop),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(frames: usize, bytes: usize) -> CallSettings {
        CallSettings {
            timeout: Duration::from_secs(1),
            attempts: 1,
            backoff: Duration::from_millis(1),
            backoff_max: Duration::from_millis(1),
            batch_frames: frames,
            batch_bytes: bytes,
            max_queued: 100,
        }
    }

    fn frames(sizes: &[usize]) -> RoomFrames {
        sizes
            .iter()
            .map(|&n| {
                let done = Done::new(oneshot::channel().0, Arc::new(AtomicUsize::new(1)));
                (Bytes::from(vec![n as u8; n]), done)
            })
            .collect()
    }

    fn shape(batches: &[RoomFrames]) -> Vec<Vec<usize>> {
        batches
            .iter()
            .map(|b| b.iter().map(|(f, _)| f.len()).collect())
            .collect()
    }

    #[test]
    fn batches_respect_frame_cap_and_keep_order() {
        let out = batches(frames(&[1, 2, 3, 4, 5]), &settings(2, 1000), |(f, _)| {
            f.len()
        });
        assert_eq!(shape(&out), vec![vec![1, 2], vec![3, 4], vec![5]]);
    }

    #[test]
    fn batches_respect_byte_cap_and_pass_oversized_frames_alone() {
        let out = batches(frames(&[10, 10, 10, 50, 5]), &settings(20, 25), |(f, _)| {
            f.len()
        });
        assert_eq!(shape(&out), vec![vec![10, 10], vec![10], vec![50], vec![5]]);
    }

    fn rooms(names: &[&str]) -> Option<HashSet<String>> {
        Some(names.iter().map(|n| (*n).to_owned()).collect())
    }

    #[test]
    fn room_view_skips_only_fresh_stable_answers_lacking_the_room() {
        let every = Duration::from_secs(1);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut view = RoomView::default();
        assert!(!view.skips("a", every, t0), "never answered: send");

        view.update(rooms(&["a"]), t0);
        assert!(
            !view.skips("b", every, at(500)),
            "a first answer counts as a change"
        );
        view.update(rooms(&["a"]), at(1000));
        view.update(rooms(&["a"]), at(2000));
        assert!(view.skips("b", every, at(2100)), "stable, fresh, lacks b");
        assert!(!view.skips("a", every, at(2100)), "has members in a");
        assert!(
            !view.skips("b", every, at(4500)),
            "poll older than 2 intervals"
        );

        view.update(rooms(&["a", "c"]), at(3000));
        assert!(!view.skips("b", every, at(3100)), "rooms just changed");
        assert!(
            !view.skips("b", every, at(4900)),
            "changed < 2 intervals ago"
        );
        view.update(rooms(&["a", "c"]), at(4000));
        view.update(rooms(&["a", "c"]), at(5000));
        assert!(view.skips("b", every, at(5100)), "stable again");

        view.update(None, at(6000));
        assert!(!view.skips("b", every, at(6100)), "failed poll: unknown");
        view.update(rooms(&["a", "c"]), at(7000));
        assert!(!view.skips("b", every, at(7100)), "back after a failure");
    }

    #[test]
    fn unavailable_is_retried_invalid_argument_is_not() {
        assert!(retryable(tonic::Code::Unavailable));
        assert!(!retryable(tonic::Code::InvalidArgument));
    }
}
