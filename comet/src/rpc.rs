//! gRPC services on the comet's gRPC listener: goim's `goim.comet.Comet`
//! (called by job, §8.3), Herald's `herald.push.v1.CometPush` (job's batched
//! single-key pushes) and `herald.admin.v1.CometAdmin` (called by the
//! operator).
//!
//! Each push is encoded once per transport (TCP bytes, WebSocket op-9
//! message) and the same [`Bytes`] is shared by every recipient's queue.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use herald_protocol::pb::admin::comet_admin_server::{CometAdmin, CometAdminServer};
use herald_protocol::pb::admin::{
    CancelDrainReply, CancelDrainRequest, DrainReply, DrainRequest, LoadReply, LoadRequest,
};
use herald_protocol::pb::goim::comet::{
    BroadcastReply, BroadcastReq, BroadcastRoomReply, BroadcastRoomReq, PushMsgReply, PushMsgReq,
    RoomsReply, RoomsReq,
};
use herald_protocol::pb::push::comet_push_server::{CometPush, CometPushServer};
use herald_protocol::pb::push::{PushMsgsReply, PushMsgsReq};
use herald_protocol::pb::{Comet, CometServer, Proto};
use herald_protocol::redirect::Redirect;
use herald_protocol::{Frame, op, ws};
use herald_runtime::grpc_auth::Token;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info, info_span};

use crate::conn::{self, CloseReason, Conn, Refused};
use crate::metrics::Metrics;
use crate::{Error, Shared};

/// Serves the three services on `listener` until shutdown, each call
/// refused unless it carries `token` (when one is set).
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    token: Token,
) -> Result<(), Error> {
    let service = Service {
        shared: shared.clone(),
    };
    let stop = shared.shutdown.wait();
    tonic::transport::Server::builder()
        .layer(token.server_layer(shared.metrics.grpc_auth_refusals()))
        .add_service(CometServer::new(service.clone()))
        .add_service(CometPushServer::new(service.clone()))
        .add_service(CometAdminServer::new(service))
        .serve_with_incoming_shutdown(incoming(listener, shared), stop)
        .await
        .map_err(Error::Grpc)
}

/// The gRPC listener's connections, accepted like client connections:
/// tonic's own accept loop retries failed accepts at once, which spins a
/// core for as long as descriptors are exhausted.
fn incoming(
    listener: TcpListener,
    shared: Arc<Shared>,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    let acceptor = herald_runtime::listen::Acceptor::default();
    futures::stream::unfold(
        (listener, shared, acceptor),
        |(listener, shared, mut acceptor)| async move {
            let (stream, _) = crate::server::accept(&listener, &shared, &mut acceptor).await?;
            // gRPC frames are small and latency-bound.
            let _ = stream.set_nodelay(true);
            Some((Ok(stream), (listener, shared, acceptor)))
        },
    )
}

#[derive(Debug, Clone)]
struct Service {
    shared: Arc<Shared>,
}

/// A push encoded for each transport, shared by all recipients.
struct Encoded {
    tcp: Bytes,
    ws: Bytes,
}

impl Encoded {
    fn new(proto: &Proto) -> Encoded {
        Encoded {
            tcp: ws::push_for_tcp(proto),
            ws: ws::push_for_ws(proto),
        }
    }
}

/// How long a push waits for space in the queue of a client that keeps up
/// while comet itself is behind, before that client is closed as a slow
/// consumer after all. Under job's default 3 s call timeout, so a call that
/// waited still answers before job gives up on it and sends it again.
const BEHIND_WAIT: Duration = Duration::from_secs(2);

/// Queues `encoded` on each of `conns`.
///
/// A queue that is full while its writer is blocked on the client's socket
/// belongs to a slow consumer: that connection is closed (in the push). A
/// queue that is full while its client keeps reading means comet's core is
/// saturated: closing healthy clients there would shed the clients instead
/// of the load, and send them all back as a reconnect storm. Those pushes
/// wait for their writers to take the queue instead, and the RPC's answer
/// waits with them: job sends a room's next batch only after the answer,
/// so the backlog turns into fewer, larger batches upstream. A queue still
/// full after [`BEHIND_WAIT`] is closed as a slow consumer.
async fn deliver(shared: &Shared, conns: impl IntoIterator<Item = Arc<Conn>>, encoded: &Encoded) {
    let mut behind = Vec::new();
    for conn in conns {
        match conn.push(&encoded.tcp, &encoded.ws) {
            Ok(()) => {}
            Err(Refused::Behind) => behind.push(conn),
            Err(Refused::Closed(closed)) => shared.metrics.drop_push(closed.0.as_str()),
        }
    }
    if behind.is_empty() {
        return;
    }
    shared.metrics.push_waited(behind.len());
    let deadline = tokio::time::Instant::now() + BEHIND_WAIT;
    // One connection at a time: their writers drain in parallel, so the
    // whole wait is about the slowest one's, and each wake-up costs one look.
    'conns: for conn in behind {
        loop {
            let space = conn::QUEUE_SPACE.notified();
            tokio::pin!(space);
            // Registered before the look: a take between the two is seen.
            space.as_mut().enable();
            match conn.push(&encoded.tcp, &encoded.ws) {
                Ok(()) => continue 'conns,
                Err(Refused::Closed(closed)) => {
                    shared.metrics.drop_push(closed.0.as_str());
                    continue 'conns;
                }
                Err(Refused::Behind) => {}
            }
            tokio::select! {
                () = space => {}
                () = tokio::time::sleep_until(deadline) => {
                    conn.close(CloseReason::SlowConsumer);
                    shared.metrics.drop_push(CloseReason::SlowConsumer.as_str());
                    continue 'conns;
                }
            }
        }
    }
}

/// A `PushMsg` that cannot be delivered: goim's comet refuses the same, and
/// Herald also refuses what [`check_proto`] does.
fn check_push(req: &PushMsgReq, metrics: &Metrics) -> Result<(), Status> {
    let Some(proto) = &req.proto else {
        return Err(Status::invalid_argument("proto is required"));
    };
    if req.keys.is_empty() {
        return Err(Status::invalid_argument("keys is empty"));
    }
    check_proto(proto, Some(req.proto_op), metrics)
}

/// A push that would put a reserved op on the wire (its filtering op or
/// any frame it carries), or an op-9 body that is not whole frames, is
/// refused as a whole and counted: no push path reaches a client with ops
/// 10, 11 or 18–31, which only the comet itself sends (op 18, to clients
/// that asked for it).
fn check_proto(proto: &Proto, proto_op: Option<i32>, metrics: &Metrics) -> Result<(), Status> {
    let checked = match proto_op {
        Some(reserved) if op::is_reserved(reserved) => Err(ws::PushError::ReservedOp(reserved)),
        _ => ws::check_push(proto),
    };
    checked.map_err(|err| {
        metrics.refused(match err {
            ws::PushError::ReservedOp(_) => "push_reserved_op",
            ws::PushError::NotFrames(_) => "push_malformed",
        });
        Status::invalid_argument(err.to_string())
    })
}

impl Service {
    /// Delivers one checked `PushMsg` to its keys' connections.
    async fn push_keys(&self, req: PushMsgReq, rpc: &'static str) {
        let PushMsgReq {
            keys,
            proto,
            proto_op,
        } = req;
        let Some(proto) = proto else { return };
        self.shared.metrics.push(rpc);
        let encoded = Encoded::new(&proto);
        // A slow consumer's full queue closes that connection; goim aborted
        // the whole call there (§13.6): the remaining keys still get the push.
        let conns = keys
            .iter()
            .filter_map(|key| self.shared.buckets.get(key))
            .filter(|conn| conn.accepts(proto_op));
        deliver(&self.shared, conns, &encoded).await;
    }
}

#[tonic::async_trait]
impl CometPush for Service {
    /// Job's batch of single-key pushes: one call, one answer, in place of
    /// as many `PushMsg` round trips when job has a backlog for this comet.
    /// All or nothing on bad input: a batch with one malformed push is
    /// refused before any is delivered, so job's drop of it (it does not
    /// retry INVALID_ARGUMENT) loses no push it was told went out.
    async fn push_msgs(
        &self,
        req: Request<PushMsgsReq>,
    ) -> Result<Response<PushMsgsReply>, Status> {
        let PushMsgsReq { pushes } = req.into_inner();
        for (i, push) in pushes.iter().enumerate() {
            check_push(push, &self.shared.metrics).map_err(|status| {
                Status::invalid_argument(format!("push {i}: {}", status.message()))
            })?;
        }
        for push in pushes {
            self.push_keys(push, "push_msgs").await;
        }
        Ok(Response::new(PushMsgsReply {}))
    }
}

#[tonic::async_trait]
impl Comet for Service {
    async fn push_msg(&self, req: Request<PushMsgReq>) -> Result<Response<PushMsgReply>, Status> {
        let req = req.into_inner();
        check_push(&req, &self.shared.metrics)?;
        self.push_keys(req, "push_msg").await;
        Ok(Response::new(PushMsgReply {}))
    }

    async fn broadcast(
        &self,
        req: Request<BroadcastReq>,
    ) -> Result<Response<BroadcastReply>, Status> {
        let BroadcastReq {
            proto_op,
            proto,
            speed,
        } = req.into_inner();
        let proto = proto.ok_or_else(|| Status::invalid_argument("proto is required"))?;
        check_proto(&proto, Some(proto_op), &self.shared.metrics)?;
        self.shared.metrics.push("broadcast");
        let encoded = Encoded::new(&proto);
        let shared = self.shared.clone();
        // Reply at once, deliver in the background (§8.3).
        tokio::spawn(
            async move {
                for index in 0..shared.buckets.len() {
                    let conns = shared.buckets.bucket_conns(index);
                    let n = conns.len();
                    let conns = conns.into_iter().filter(|conn| conn.accepts(proto_op));
                    deliver(&shared, conns, &encoded).await;
                    // "speed connections per second": pause after each bucket.
                    if speed > 0 && n > 0 {
                        let pause = Duration::from_secs_f64(n as f64 / f64::from(speed));
                        tokio::select! {
                            () = shared.shutdown.cancelled() => return,
                            () = tokio::time::sleep(pause) => {}
                        }
                    }
                }
            }
            .instrument(info_span!("broadcast", op = proto_op)),
        );
        Ok(Response::new(BroadcastReply {}))
    }

    async fn broadcast_room(
        &self,
        req: Request<BroadcastRoomReq>,
    ) -> Result<Response<BroadcastRoomReply>, Status> {
        let BroadcastRoomReq { room_id, proto } = req.into_inner();
        let proto = proto.ok_or_else(|| Status::invalid_argument("proto is required"))?;
        if room_id.is_empty() {
            return Err(Status::invalid_argument("roomID is empty"));
        }
        check_proto(&proto, None, &self.shared.metrics)?;
        self.shared.metrics.push("broadcast_room");
        let encoded = Encoded::new(&proto);
        // Room pushes ignore the accepted set (goim behaviour, §5.5).
        let members = self.shared.buckets.room_members(&room_id);
        deliver(&self.shared, members, &encoded).await;
        Ok(Response::new(BroadcastRoomReply {}))
    }

    async fn rooms(&self, _req: Request<RoomsReq>) -> Result<Response<RoomsReply>, Status> {
        let rooms = self
            .shared
            .buckets
            .room_counts()
            .into_keys()
            .map(|room| (room, true))
            .collect::<HashMap<_, _>>();
        Ok(Response::new(RoomsReply { rooms }))
    }
}

#[tonic::async_trait]
impl CometAdmin for Service {
    async fn load(&self, _req: Request<LoadRequest>) -> Result<Response<LoadReply>, Status> {
        let (connections, client_ips, rooms) = self.shared.buckets.load();
        Ok(Response::new(LoadReply {
            server: self.shared.config.server_id.clone(),
            connections: connections as u64,
            client_ips: client_ips as u64,
            rooms: rooms as u64,
            draining: self.shared.draining.load(Ordering::SeqCst),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }))
    }

    async fn drain(&self, req: Request<DrainRequest>) -> Result<Response<DrainReply>, Status> {
        let DrainRequest {
            deadline_ms,
            close_rate,
            nodes,
            tcp_port,
            ws_port,
            wss_port,
            reconnect_within_ms,
        } = req.into_inner();
        let (connections, started) = start_drain(
            &self.shared,
            &DrainPlan {
                deadline: Duration::from_millis(deadline_ms),
                close_rate,
                nodes,
                tcp_port,
                ws_port,
                wss_port,
                reconnect_within_ms,
            },
            false,
        );
        Ok(Response::new(DrainReply {
            connections,
            started,
        }))
    }

    async fn cancel_drain(
        &self,
        _req: Request<CancelDrainRequest>,
    ) -> Result<Response<CancelDrainReply>, Status> {
        let cancelled = cancel_drain(&self.shared)
            .map_err(|err| Status::failed_precondition(err.to_string()))?;
        Ok(Response::new(CancelDrainReply {
            cancelled,
            connections: self.shared.buckets.load().0 as u64,
        }))
    }
}

/// One drain's handles: a drain has one of each, and the next drain gets new
/// ones (a token once cancelled stays so).
#[derive(Debug, Clone, Default)]
pub(crate) struct DrainRun {
    /// Cancelled when the drain task has closed its last connection, given
    /// up at shutdown, or been cancelled.
    pub(crate) done: CancellationToken,
    /// Cancelled by `CancelDrain`: the task stops closing connections.
    cancel: CancellationToken,
    /// The process was asked to stop: this drain cannot be cancelled.
    last: bool,
}

impl Shared {
    /// The drain under way, or the last one.
    pub(crate) fn drain_run(&self) -> DrainRun {
        self.drain_lock().clone()
    }

    fn drain_lock(&self) -> std::sync::MutexGuard<'_, DrainRun> {
        self.drain
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Why a drain was not cancelled.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum CancelError {
    /// The comet drains because it was asked to stop.
    #[error("the comet is shutting down: its drain is final")]
    ShuttingDown,
}

/// Ends the drain under way, if there is one and the comet is not shutting
/// down: new clients are accepted again (and readiness returns), the drain
/// task closes no more connections. Returns whether a drain was cancelled.
/// Clients already closed are gone, and those already sent op 18 may still
/// move: a drain is undone for what comes next, not for what it did.
pub(crate) fn cancel_drain(shared: &Shared) -> Result<bool, CancelError> {
    let run = shared.drain_lock();
    if run.last || shared.shutdown.is_triggered() {
        return Err(CancelError::ShuttingDown);
    }
    if !shared.draining.load(Ordering::SeqCst) {
        return Ok(false);
    }
    run.cancel.cancel();
    shared.draining.store(false, Ordering::SeqCst);
    info!("drain cancelled");
    Ok(true)
}

/// What a drain does: the admin `Drain` request, or the configured defaults
/// when the process is asked to stop.
#[derive(Debug, Clone)]
pub(crate) struct DrainPlan {
    /// Every connection is closed by then, counted from the start.
    pub(crate) deadline: Duration,
    /// Connections closed per second; 0 = as fast as the deadline allows.
    pub(crate) close_rate: u32,
    /// Op-18 `nodes`; may be empty (the client then asks the node API).
    pub(crate) nodes: Vec<String>,
    pub(crate) tcp_port: i32,
    pub(crate) ws_port: i32,
    pub(crate) wss_port: i32,
    pub(crate) reconnect_within_ms: u32,
}

/// Starts a drain unless one is already running: refuse new connections,
/// then close the current ones paced by `plan`, op 18 first to those that
/// asked for it. A redirected connection stays open for
/// `reconnect_within_ms` after its op 18 (never past the deadline), or until
/// its client leaves: a client that follows the redirect connects to the new
/// comet before it lets go of this one, so a push sent meanwhile reaches it
/// on one or the other (make before break). Op 18s are paced; the closes
/// follow them. Returns the connection count and whether this call started
/// it; the run's [`DrainRun::done`] is cancelled when the drain task ends.
/// A `last` drain (the process was asked to stop) cannot be cancelled, nor
/// can one already running once a `last` call finds it.
pub(crate) fn start_drain(shared: &Arc<Shared>, plan: &DrainPlan, last: bool) -> (u64, bool) {
    let mut run = shared.drain_lock();
    run.last |= last;
    let conns = shared.buckets.all();
    let connections = conns.len() as u64;
    if shared.draining.swap(true, Ordering::SeqCst) {
        return (connections, false);
    }
    *run = DrainRun {
        last,
        ..DrainRun::default()
    };
    let (done, cancel) = (run.done.clone(), run.cancel.clone());
    drop(run);
    let body = Redirect {
        reason: "drain".to_owned(),
        nodes: plan.nodes.clone(),
        tcp_port: plan.tcp_port,
        ws_port: plan.ws_port,
        wss_port: plan.wss_port,
        reconnect_within_ms: plan.reconnect_within_ms,
    }
    .to_body();
    // On both transports op 18 is a reply-like frame, never op-9 wrapped.
    let redirect = Frame::push(op::REDIRECT, body).to_bytes();
    let linger = Duration::from_millis(u64::from(plan.reconnect_within_ms)).min(plan.deadline / 2);
    // Space closes at `close_rate`/s, but never so slowly that the last
    // one (and its linger) misses the deadline.
    let mut gap = if plan.close_rate > 0 {
        Duration::from_secs_f64(1.0 / f64::from(plan.close_rate))
    } else {
        Duration::ZERO
    };
    if !conns.is_empty() {
        let budget = plan.deadline.saturating_sub(linger) / (conns.len() as u32 + 1);
        gap = gap.min(budget);
    }
    info!(connections, ?gap, ?linger, "drain started");
    let shared = shared.clone();
    tokio::spawn(
        async move {
            // Signals the end of the drain however the task ends.
            let _done = done.drop_guard();
            let mut lingering = tokio::task::JoinSet::new();
            for (i, conn) in conns.into_iter().enumerate() {
                if i > 0 && !gap.is_zero() {
                    tokio::select! {
                        () = shared.shutdown.cancelled() => return,
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(gap) => {}
                    }
                }
                // Cancelled between two closes with no gap between them.
                if cancel.is_cancelled() {
                    return;
                }
                if conn.redirect && conn.send(redirect.clone()).is_ok() && !linger.is_zero() {
                    lingering.spawn(async move {
                        tokio::select! {
                            () = tokio::time::sleep(linger) => {}
                            () = conn.closed() => {}
                        }
                        conn.close(CloseReason::Drain);
                    });
                } else {
                    conn.close(CloseReason::Drain);
                }
            }
            // A cancel leaves the redirected clients open (dropping the
            // set aborts their close): they may move, or stay.
            tokio::select! {
                () = shared.shutdown.cancelled() => return,
                () = cancel.cancelled() => return,
                () = async { while lingering.join_next().await.is_some() {} } => {}
            }
            info!("drain finished");
        }
        .instrument(info_span!("drain")),
    );
    (connections, true)
}
