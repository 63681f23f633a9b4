//! The call to a comet: one gRPC [`Request`] per call or batch, sent until it
//! succeeds, is refused for good, or its comet leaves the list while
//! failing; retryable errors back off, doubling up to the cap.
//!
//! A comet that fails and is no longer listed (it died and the operator
//! dropped it from the node list) gets no more attempts: the call in hand
//! is dropped as soon as the list changes (the backoff sleep wakes up), and
//! every call still queued for it is dropped without being sent. Checking
//! only every `attempts` failures, as before, kept a dead comet's worker
//! calling it for tens of seconds after it left the list (3 s per queued
//! batch, and its queue holds `max_queued` calls).

use std::sync::atomic::Ordering;
use std::time::Instant;

use herald_protocol::pb::push::PushMsgsReq;
use herald_protocol::pb::{BroadcastReq, BroadcastRoomReq, PushMsgReq};
use herald_protocol::ws;
use tracing::{debug, warn};

use super::queue::Call;
use super::worker::{Clients, Sent, Worker};

impl Worker {
    /// Calls until success, a permanent failure or the comet leaving the
    /// list (dropped, counted), or shutdown (`None`).
    pub(super) async fn deliver(&mut self, req: &Request) -> Option<Sent> {
        let settings = self.directory.settings.clone();
        let stats = self.directory.stats.clone();
        let cancel = self.directory.cancel.clone();
        let mut attempt = 0u32;
        let mut delay = settings.backoff;
        loop {
            if self.failing.load(Ordering::Relaxed) && self.gone() {
                stats.metrics.dropped(&self.name, "comet_gone");
                if !std::mem::replace(&mut self.gone_logged, true) {
                    warn!(
                        rpc = req.name(),
                        "comet left the list while failing; dropping what it holds"
                    );
                }
                return Some(Sent::Dropped);
            }
            let started = Instant::now();
            let result = tokio::select! {
                () = cancel.cancelled() => return None,
                result = req.call(&mut self.clients) => result,
            };
            stats.metrics.call_took(req.name(), started.elapsed());
            let status = match result {
                Ok(()) => {
                    self.failing.store(false, Ordering::Relaxed);
                    stats.metrics.call_ok();
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
                stats.metrics.dropped(&self.name, "rejected");
                warn!(rpc = req.name(), code = ?status.code(), message = status.message(), "comet refused the call; dropped");
                return Some(Sent::Dropped);
            }
            if self.gone() {
                // Checked at the top of the loop.
                continue;
            }
            attempt += 1;
            if attempt >= settings.attempts.max(1) {
                warn!(rpc = req.name(), attempts = attempt, cause = %status.message(), "comet unavailable; still listed, retrying");
                attempt = 0;
            } else {
                debug!(rpc = req.name(), attempt, cause = %status.message(), "retrying");
            }
            stats.metrics.retry(&self.name);
            self.shed();
            // Leaving the list ends the wait, once: after that (listed again
            // at the same address) the token stays cancelled.
            let removed = self.removed.clone();
            let leaves = async {
                if removed.is_cancelled() {
                    std::future::pending::<()>().await;
                }
                removed.cancelled().await;
            };
            tokio::select! {
                biased;
                () = cancel.cancelled() => return None,
                () = leaves => {}
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(settings.backoff_max);
        }
    }
}

impl Worker {
    /// Whether this comet is no longer listed at this address.
    fn gone(&self) -> bool {
        !self.directory.contains(&self.name, &self.addr)
    }
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
pub(super) enum Request {
    Push(PushMsgReq),
    Batch(PushMsgsReq),
    Broadcast(BroadcastReq),
    Room(BroadcastRoomReq),
}

impl Request {
    pub(super) fn from_call(call: Call) -> Request {
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

    #[test]
    fn unavailable_is_retried_invalid_argument_is_not() {
        assert!(retryable(tonic::Code::Unavailable));
        assert!(!retryable(tonic::Code::InvalidArgument));
    }
}
