//! One comet's worker: takes the calls queued for its comet in order, groups
//! what arrived during the last call (room frames per room, runs of pushes)
//! into batches, sends them, and sheds calls beyond the bound while its comet
//! fails.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::{Bytes, BytesMut};
use herald_protocol::pb::push::PushMsgsReq;
use herald_protocol::pb::push::comet_push_client::CometPushClient;
use herald_protocol::pb::{BroadcastRoomReq, CometClient, PushMsgReq};
use herald_protocol::ws;
use herald_runtime::grpc_auth::AuthChannel;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::batch::batches;
use super::call::Request;
use super::directory::Directory;
use super::queue::{Call, Done, Item};

/// Frames of one room gathered in one drain, in arrival order.
pub(super) type RoomFrames = Vec<(Bytes, Done)>;

#[derive(Debug)]
pub(super) struct Worker {
    pub(super) name: String,
    pub(super) addr: String,
    pub(super) failing: Arc<AtomicBool>,
    /// Cancelled when the comet leaves the list: wakes a backoff wait.
    pub(super) removed: CancellationToken,
    /// "Left the list while failing" was logged (once per worker).
    pub(super) gone_logged: bool,
    /// Unfinished calls of this comet (shared with its [`Handle`]).
    pub(super) queued: Arc<AtomicUsize>,
    pub(super) rx: mpsc::UnboundedReceiver<Item>,
    pub(super) clients: Clients,
    pub(super) directory: Directory,
}

/// One comet's gRPC clients, over one channel.
#[derive(Debug)]
pub(super) struct Clients {
    pub(super) comet: CometClient<AuthChannel>,
    pub(super) push: CometPushClient<AuthChannel>,
    /// Whether to send runs of pushes as one `PushMsgs`: true until the
    /// comet answers UNIMPLEMENTED (goim's comet), then one `PushMsg` each.
    pub(super) batches: bool,
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sent {
    Delivered,
    /// Refused for good or its comet left the list (counted).
    Dropped,
    /// The comet does not serve this method (a `PushMsgs` to goim's comet).
    Unsupported,
}

/// Calls taken off the queue in one go before a worker calls again.
const DRAIN_MAX: usize = 1024;

impl Worker {
    pub(super) async fn run(mut self) {
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
                            self.directory.stats.metrics.room_batch(n);
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
                    self.directory.stats.metrics.push_batch(n);
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
}

impl Worker {
    /// While this comet fails, drops queued calls beyond `max_queued`
    /// (completed and counted), so its records do not pin in-flight slots.
    pub(super) fn shed(&mut self) {
        let max = self.directory.settings.max_queued;
        while self.queued.load(Ordering::Relaxed) > max {
            let Ok(item) = self.rx.try_recv() else { break };
            self.directory
                .stats
                .metrics
                .dropped(&self.name, "comet_queue_full");
            let _ = item.done.send(());
        }
    }
}
