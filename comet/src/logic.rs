//! The gRPC client to logic (`goim.logic.Logic`, §8.2) and the periodic
//! room-count report.
//!
//! goim sets no deadlines on these calls; every call here has one (the
//! channel's `timeout`), so a hung logic fails handshakes instead of pinning
//! connections forever.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use herald_protocol::pb::goim::logic::{
    ConnectReply, ConnectReq, DisconnectReq, HeartbeatReq, NodesReq, OnlineReq, ReceiveReq,
};
use herald_protocol::pb::{LogicClient, Proto};
use herald_runtime::grpc_auth::{self, AuthChannel, Token};
use tonic::Code;
use tonic::transport::Endpoint;
use tracing::{debug, warn};

use crate::metrics::LogicFailures;
use crate::{Error, Shared};

/// Logic's client plus the latest cluster-wide room counts it reported.
#[derive(Debug)]
pub struct Logic {
    client: LogicClient<AuthChannel>,
    /// `allRoomCount` from the last `RenewOnline` reply, replaced wholesale.
    /// Read on every client heartbeat, written every renew period: RwLock.
    online: RwLock<Arc<HashMap<String, i32>>>,
    /// Where logic is, for the reachability probe's own connections.
    endpoint: Endpoint,
    /// Set once logic has been reached (a call succeeded or the probe
    /// was answered); `/readyz` fails until then.
    reachable: AtomicBool,
    /// Whether logic's last answer refused this comet's gRPC token: every
    /// client would fail to authenticate, so `/readyz` fails meanwhile.
    token_refused: AtomicBool,
    /// What the reachability probe's calls carry, as every other call.
    token: Token,
    failures: LogicFailures,
}

impl Logic {
    /// A lazily connecting client; the first call dials. At most
    /// `max_in_flight` calls are sent at once: without a bound, a few
    /// thousand clients closing together sent as many `Disconnect` streams
    /// over the one HTTP/2 connection, which then failed under them and
    /// took every call on it along (the benchmark's reconnect storms lost
    /// 68,500 of 95,000 `Disconnect`s so). Waiting calls queue in the
    /// channel and their deadline starts when they are sent. Every call
    /// carries `token` (when set), which logic's gRPC port requires.
    ///
    /// # Errors
    /// [`Error::LogicAddr`] when `addr` is not a valid URI.
    pub(crate) fn new(
        addr: &str,
        timeout: Duration,
        max_in_flight: usize,
        token: &Token,
        failures: LogicFailures,
    ) -> Result<Logic, Error> {
        let uri = if addr.contains("://") {
            addr.to_owned()
        } else {
            format!("http://{addr}")
        };
        let endpoint = Endpoint::from_shared(uri).map_err(|source| Error::LogicAddr {
            addr: addr.to_owned(),
            source,
        })?;
        let endpoint = endpoint
            .connect_timeout(timeout)
            .timeout(timeout)
            .concurrency_limit(max_in_flight.max(1));
        let channel = endpoint.connect_lazy();
        Ok(Logic {
            client: LogicClient::new(token.channel(channel)),
            online: RwLock::new(Arc::new(HashMap::new())),
            endpoint,
            reachable: AtomicBool::new(false),
            token_refused: AtomicBool::new(false),
            token: token.clone(),
            failures,
        })
    }

    /// Whether logic has been reached since start.
    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::SeqCst)
    }

    fn mark_reachable(&self) {
        self.reachable.store(true, Ordering::SeqCst);
    }

    /// Whether logic refused this comet's gRPC token in its last answer.
    pub fn token_refused(&self) -> bool {
        self.token_refused.load(Ordering::SeqCst)
    }

    /// Notes whether a call's answer refused the gRPC token; any other
    /// answer means the token is good.
    fn note<T>(&self, result: &Result<T, tonic::Status>) {
        let refused = result.as_ref().is_err_and(grpc_auth::is_refusal);
        if refused && !self.token_refused.swap(true, Ordering::SeqCst) {
            warn!("logic refuses this comet's gRPC token: clients cannot authenticate");
        } else if !refused {
            self.token_refused.store(false, Ordering::SeqCst);
        }
    }

    /// `Connect`: authenticates a token.
    ///
    /// # Errors
    /// The gRPC status logic (or the deadline) produced.
    pub async fn connect(
        &self,
        server: &str,
        cookie: String,
        token: bytes::Bytes,
    ) -> Result<ConnectReply, tonic::Status> {
        let req = ConnectReq {
            server: server.to_owned(),
            cookie,
            token,
        };
        let result = self.client.clone().connect(req).await;
        self.note(&result);
        let reply = result
            .inspect_err(|status| {
                // A refused client token is logic's answer, counted as an
                // auth outcome; the rest is the call failing, this comet's
                // own gRPC token refused included (a deployment error that
                // refuses every client).
                let refused_client = matches!(
                    status.code(),
                    Code::Unauthenticated | Code::InvalidArgument | Code::PermissionDenied
                ) && !grpc_auth::is_refusal(status);
                if !refused_client {
                    self.failures.failed("connect");
                }
            })?
            .into_inner();
        self.mark_reachable();
        Ok(reply)
    }

    /// `Disconnect`; failures are logged, the connection is gone either way.
    pub async fn disconnect(&self, mid: i64, key: &str, server: &str) {
        let req = DisconnectReq {
            mid,
            key: key.to_owned(),
            server: server.to_owned(),
        };
        let result = self.client.clone().disconnect(req).await;
        self.note(&result);
        if let Err(status) = result {
            self.failures.failed("disconnect");
            warn!(%key, cause = %status, "logic Disconnect failed");
        }
    }

    /// `Heartbeat` (session refresh); failures are logged.
    pub async fn heartbeat(&self, mid: i64, key: &str, server: &str) {
        let req = HeartbeatReq {
            mid,
            key: key.to_owned(),
            server: server.to_owned(),
        };
        let result = self.client.clone().heartbeat(req).await;
        self.note(&result);
        if let Err(status) = result {
            self.failures.failed("heartbeat");
            warn!(%key, cause = %status, "logic Heartbeat failed");
        }
    }

    /// `Receive`: forwards an upstream frame; the result is ignored (§5.2).
    pub async fn receive(&self, mid: i64, proto: Proto) {
        let req = ReceiveReq {
            mid,
            proto: Some(proto),
        };
        let result = self.client.clone().receive(req).await;
        self.note(&result);
        if let Err(status) = result {
            self.failures.failed("receive");
            debug!(cause = %status, "logic Receive failed");
        }
    }

    /// The cluster-wide count for `room` from the last report, if positive.
    pub fn cluster_count(&self, room: &str) -> Option<i32> {
        let online = self
            .online
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        online.get(room).copied().filter(|&n| n > 0)
    }

    async fn renew_online(&self, server: &str, counts: HashMap<String, i32>) {
        let req = OnlineReq {
            server: server.to_owned(),
            room_count: counts,
        };
        let result = self.client.clone().renew_online(req).await;
        self.note(&result);
        match result {
            Ok(reply) => {
                self.mark_reachable();
                let all = Arc::new(reply.into_inner().all_room_count);
                *self.online.write().unwrap_or_else(PoisonError::into_inner) = all;
            }
            Err(status) => {
                self.failures.failed("renew_online");
                warn!(cause = %status, "logic RenewOnline failed");
            }
        }
    }
}

impl Logic {
    /// One `Nodes` call on a connection of its own; whether logic answered
    /// it with anything but a refusal of the gRPC token.
    async fn probe(&self) -> bool {
        let Ok(channel) = self.endpoint.connect().await else {
            return false;
        };
        let mut client = LogicClient::new(self.token.channel(channel));
        let result = client.nodes(NodesReq::default()).await;
        self.note(&result);
        !result.is_err_and(|status| grpc_auth::is_refusal(&status))
    }
}

/// Reports local room counts to logic every renew period until shutdown.
pub(crate) async fn renew_online_loop(shared: Arc<Shared>) {
    let period = shared.config.renew_online_interval;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let counts = shared.buckets.room_counts();
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            () = shared.logic.renew_online(&shared.config.server_id, counts) => {}
        }
    }
}

/// Dials logic (an HTTP/2 connection of its own) until it answers once, so
/// `/readyz` turns ready without waiting for a client or a renew period.
/// The answer is to a `Nodes` call with the gRPC token: a logic that
/// refuses the token has not been reached (any other answer, even
/// `Unimplemented`, has).
pub(crate) async fn reachability_loop(shared: Arc<Shared>) {
    let mut pause = Duration::from_millis(100);
    while !shared.logic.reachable() {
        let connected = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            connected = shared.logic.probe() => connected,
        };
        if connected {
            debug!("logic reachable");
            shared.logic.mark_reachable();
            return;
        }
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}
