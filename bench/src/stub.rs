//! A stub `goim.logic.Logic` that accepts every token, so comet can be
//! measured without Redis, Kafka or a real logic (as comet's own tests do).
//!
//! This is the one stub logic of the workspace: the benchmark runs it, and
//! tests use it (through `herald-testkit`) as comet's logic, writing the
//! session they want into the token:
//!
//! - `mid`, `key`, `room_id` and `accepts` come back in the session; an empty
//!   `key` gets a made-up one (`auto-<n>`), as logic does;
//! - `"fail": true` refuses the token (comet then closes the connection);
//! - `heartbeat_ms` sets the idle timeout; without it the stub's own (an hour
//!   by default: benchmark clients are idle on purpose).
//!
//! It counts the calls it served; a [`StubLogic`] built with
//! [`StubLogic::recording`] also keeps each call as an [`Event`], answers
//! `RenewOnline` with the room counts it was given, and can serve
//! `Disconnect` at a finite rate.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_protocol::pb::goim::logic::{
    DisconnectReply, DisconnectReq, HeartbeatReply, HeartbeatReq, NodesReply, NodesReq,
    OnlineReply, OnlineReq, ReceiveReply, ReceiveReq,
};
use herald_protocol::pb::{ConnectReply, ConnectReq, Logic, LogicServer, Proto};
use herald_protocol::token::Token;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// Idle timeout handed to comet unless the token or the stub says otherwise.
const IDLE: Duration = Duration::from_secs(3_600);

/// Calls the stub served.
#[derive(Debug, Default)]
pub struct Calls {
    pub(crate) connects: AtomicU64,
    pub(crate) disconnects: AtomicU64,
}

impl Calls {
    /// `Connect` calls that returned a session.
    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }

    /// `Disconnect` calls.
    pub fn disconnects(&self) -> u64 {
        self.disconnects.load(Ordering::Relaxed)
    }
}

/// One call a recording stub served.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// `Connect`, refused or not: the token as text and what comet sent.
    Connect {
        /// The op-7 body.
        token: String,
        /// Comet's server id.
        server: String,
        /// The WebSocket `Cookie` header, or empty.
        cookie: String,
    },
    /// `Disconnect`.
    Disconnect {
        /// The session's mid.
        mid: i64,
        /// The session's key.
        key: String,
    },
    /// `Heartbeat` (a session refresh).
    Heartbeat {
        /// The session's key.
        key: String,
    },
    /// `RenewOnline` with comet's per-room counts.
    Renew {
        /// Members per room on that comet.
        counts: HashMap<String, i32>,
    },
    /// `Receive`: an upstream message.
    Receive {
        /// The sender's mid.
        mid: i64,
        /// The frame it sent.
        proto: Proto,
    },
}

/// The stub logic: configure, then [`StubLogic::serve`].
#[derive(Debug, Clone)]
pub struct StubLogic {
    calls: Arc<Calls>,
    events: Option<Arc<Mutex<Vec<Event>>>>,
    online: Arc<HashMap<String, i32>>,
    idle: Duration,
    disconnect_cost: Option<Duration>,
    serial: Arc<tokio::sync::Mutex<()>>,
    auto_key: Arc<AtomicU64>,
}

impl Default for StubLogic {
    fn default() -> Self {
        StubLogic {
            calls: Arc::default(),
            events: None,
            online: Arc::default(),
            idle: IDLE,
            disconnect_cost: None,
            serial: Arc::default(),
            auto_key: Arc::default(),
        }
    }
}

/// The §6 token plus the stub's own members.
#[derive(serde::Deserialize)]
struct StubToken {
    #[serde(flatten)]
    token: Token,
    #[serde(default)]
    fail: bool,
    heartbeat_ms: Option<i64>,
    /// Grant op-18 redirects in the answer although the token's own
    /// `herald` member does not ask (what Herald's logic does for a signed
    /// token, whose claims comet cannot read).
    #[serde(default)]
    grant_redirect: bool,
}

impl StubLogic {
    /// A stub that counts calls but keeps no events (what the benchmark runs).
    pub fn new() -> StubLogic {
        StubLogic::default()
    }

    /// A stub that also keeps every call as an [`Event`] (what tests run).
    pub fn recording() -> StubLogic {
        StubLogic {
            events: Some(Arc::default()),
            ..StubLogic::default()
        }
    }

    /// The idle timeout for tokens without `heartbeat_ms`.
    #[must_use]
    pub fn idle_timeout(mut self, idle: Duration) -> StubLogic {
        self.idle = idle;
        self
    }

    /// `RenewOnline` answers these cluster-wide room counts.
    #[must_use]
    pub fn online(mut self, counts: HashMap<String, i32>) -> StubLogic {
        self.online = Arc::new(counts);
        self
    }

    /// `Disconnect`s are served one at a time, each taking `cost`: a logic
    /// with a finite rate, like one bound by its Redis.
    #[must_use]
    pub fn disconnect_cost(mut self, cost: Duration) -> StubLogic {
        self.disconnect_cost = Some(cost);
        self
    }

    /// Serves this stub on a loopback port of its own and returns the
    /// address. The server task lives as long as the runtime; this handle
    /// keeps reading what it records.
    ///
    /// # Errors
    /// No loopback port to bind.
    pub async fn serve(&self) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(LogicServer::new(self.clone()))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Ok(addr)
    }

    /// The call counters.
    pub fn calls(&self) -> &Arc<Calls> {
        &self.calls
    }

    /// Every call so far, oldest first; empty unless [`StubLogic::recording`].
    pub fn events(&self) -> Vec<Event> {
        match &self.events {
            Some(events) => events.lock().map(|e| e.clone()).unwrap_or_default(),
            None => Vec::new(),
        }
    }

    /// `Disconnect`s recorded for `key`.
    pub fn disconnects(&self, key: &str) -> usize {
        self.events()
            .iter()
            .filter(|e| matches!(e, Event::Disconnect { key: k, .. } if k == key))
            .count()
    }

    /// `Receive`s recorded from `mid`.
    pub fn receives(&self, mid: i64) -> usize {
        self.events()
            .iter()
            .filter(|e| matches!(e, Event::Receive { mid: m, .. } if *m == mid))
            .count()
    }

    /// Polls the recorded events until `pred` holds; false if it still does
    /// not after `within`.
    pub async fn wait_until(&self, within: Duration, pred: impl Fn(&[Event]) -> bool) -> bool {
        tokio::time::timeout(within, async {
            while !pred(&self.events()) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .is_ok()
    }

    fn record(&self, event: Event) {
        if let Some(events) = &self.events
            && let Ok(mut events) = events.lock()
        {
            events.push(event);
        }
    }
}

#[tonic::async_trait]
impl Logic for StubLogic {
    async fn connect(&self, req: Request<ConnectReq>) -> Result<Response<ConnectReply>, Status> {
        let req = req.into_inner();
        if self.events.is_some() {
            self.record(Event::Connect {
                token: String::from_utf8_lossy(&req.token).into_owned(),
                server: req.server,
                cookie: req.cookie,
            });
        }
        let StubToken {
            token,
            fail,
            heartbeat_ms,
            grant_redirect,
        } = serde_json::from_slice(&req.token)
            .map_err(|err| Status::invalid_argument(format!("token: {err}")))?;
        if fail {
            return Err(Status::unauthenticated("refused"));
        }
        self.calls.connects.fetch_add(1, Ordering::Relaxed);
        let key = if token.key.is_empty() {
            format!("auto-{}", self.auto_key.fetch_add(1, Ordering::Relaxed))
        } else {
            token.key
        };
        let idle_ns = match heartbeat_ms {
            Some(ms) => ms.saturating_mul(1_000_000),
            None => i64::try_from(self.idle.as_nanos()).unwrap_or(i64::MAX),
        };
        Ok(Response::new(ConnectReply {
            herald_redirect: grant_redirect || token.herald.is_some_and(|h| h.redirect),
            mid: token.mid,
            key,
            room_id: token.room_id,
            accepts: token.accepts,
            heartbeat: idle_ns,
        }))
    }

    async fn disconnect(
        &self,
        req: Request<DisconnectReq>,
    ) -> Result<Response<DisconnectReply>, Status> {
        let req = req.into_inner();
        if let Some(cost) = self.disconnect_cost {
            let _serial = self.serial.lock().await;
            tokio::time::sleep(cost).await;
        }
        self.calls.disconnects.fetch_add(1, Ordering::Relaxed);
        self.record(Event::Disconnect {
            mid: req.mid,
            key: req.key,
        });
        Ok(Response::new(DisconnectReply { has: true }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatReq>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        self.record(Event::Heartbeat {
            key: req.into_inner().key,
        });
        Ok(Response::new(HeartbeatReply {}))
    }

    async fn renew_online(&self, req: Request<OnlineReq>) -> Result<Response<OnlineReply>, Status> {
        self.record(Event::Renew {
            counts: req.into_inner().room_count,
        });
        Ok(Response::new(OnlineReply {
            all_room_count: (*self.online).clone(),
        }))
    }

    async fn receive(&self, req: Request<ReceiveReq>) -> Result<Response<ReceiveReply>, Status> {
        let req = req.into_inner();
        self.record(Event::Receive {
            mid: req.mid,
            proto: req.proto.unwrap_or_default(),
        });
        Ok(Response::new(ReceiveReply {}))
    }

    async fn nodes(&self, _req: Request<NodesReq>) -> Result<Response<NodesReply>, Status> {
        Err(Status::unimplemented("not in the stub logic"))
    }
}

/// Serves a counting stub ([`StubLogic::new`]) on a loopback port of its
/// own; returns its address and call counters. The server task lives as
/// long as the runtime.
///
/// # Errors
/// No loopback port to bind.
pub async fn start() -> std::io::Result<(SocketAddr, Arc<Calls>)> {
    let stub = StubLogic::new();
    let addr = stub.serve().await?;
    Ok((addr, stub.calls.clone()))
}
