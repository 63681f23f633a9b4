//! What logic does, independent of transport: `grpc` and `http` both call
//! [`Service`], which owns the session store, the push queue, the node list
//! and the cluster-wide room counts.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use herald_protocol::limits;
use herald_protocol::pb::goim::logic::{Backoff, NodesReply};
use herald_protocol::pb::{ConnectReply, Proto, PushMsg, push_msg};
use herald_runtime::nodes::Nodes;

use crate::metrics::Metrics;
use crate::queue::{self, PushQueue, RecordId, Upstream};
use crate::store::{self, Online, SessionStore, redis::unix_now};
use crate::token::{self, Verifier};

/// Why a request failed, by the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The client's token was refused.
    #[error("invalid token")]
    Token(#[from] token::Error),
    /// The request itself is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The session store (Redis) failed.
    #[error("session store unavailable")]
    Store(#[from] store::Error),
    /// The push queue (Kafka) failed.
    #[error("push queue unavailable")]
    Queue(#[from] queue::Error),
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the service needs to know beyond its backends.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Client heartbeat interval advertised in `NodesReply.heartbeat`.
    pub heartbeat: Duration,
    /// Missed heartbeats before comet drops a connection; Connect's idle
    /// timeout is `heartbeat × heartbeat_max`.
    pub heartbeat_max: u32,
    /// `domain` of the node answer (`spec.nodeList.domain`).
    pub node_domain: String,
    /// Most addresses in one node answer.
    pub node_count: usize,
    /// `backoff.base_delay` of the node answer.
    pub node_backoff: Duration,
    /// Comets silent longer than this are left out of room counts.
    pub online_stale: Duration,
}

/// The logic service; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Service {
    store: Arc<dyn SessionStore>,
    queue: Arc<dyn PushQueue>,
    nodes: Nodes,
    verifier: Verifier,
    settings: Settings,
    /// Last aggregation: comet → room → count. std RwLock: never held across
    /// an await, and only swapped or cloned.
    online: RwLock<HashMap<String, HashMap<String, i32>>>,
    /// Where client upstream messages go; `None` = logged only (goim).
    upstream: Option<Arc<dyn Upstream>>,
    metrics: Arc<Metrics>,
}

impl Service {
    /// Assembles a service from its parts.
    pub fn new(
        store: Arc<dyn SessionStore>,
        queue: Arc<dyn PushQueue>,
        nodes: Nodes,
        verifier: Verifier,
        settings: Settings,
    ) -> Self {
        Service {
            store,
            queue,
            nodes,
            verifier,
            settings,
            online: RwLock::new(HashMap::new()),
            upstream: None,
            metrics: Arc::new(Metrics::new()),
        }
    }

    /// Sends client upstream messages to `upstream` instead of only logging them.
    #[must_use]
    pub fn with_upstream(mut self, upstream: Arc<dyn Upstream>) -> Self {
        self.upstream = Some(upstream);
        self
    }

    /// The metrics this service records into.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether both backends answer now.
    ///
    /// # Errors
    /// The first backend that does not.
    pub async fn ready(&self) -> Result<()> {
        self.store.ping().await?;
        self.queue.ready().await?;
        Ok(())
    }

    /// The node list (for `/goim/nodes/instances` and totals).
    pub fn nodes(&self) -> &Nodes {
        &self.nodes
    }

    /// Checks a client's token exactly as [`Service::connect`] would (goim
    /// JSON or a verified JWT), without routing anything: the client
    /// listener's `--client-auth token`.
    ///
    /// # Errors
    /// The token is refused.
    pub fn check_client_token(&self, token: &[u8]) -> Result<(), token::Error> {
        self.verifier.parse(token).map(drop)
    }

    /// Authenticates a connection and routes it to `server`.
    ///
    /// # Errors
    /// A bad token or empty server (invalid argument); Redis failing.
    pub async fn connect(&self, server: &str, token: &[u8]) -> Result<ConnectReply> {
        if server.is_empty() {
            return Err(Error::BadRequest("server is empty".to_owned()));
        }
        let token = self.verifier.parse(token)?;
        // The comet refuses these too (it may face a goim logic); refused
        // here, no route is written for a connection that cannot stay.
        if !limits::room_fits(&token.room_id) {
            return Err(Error::BadRequest(format!(
                "room_id is longer than {} bytes",
                limits::MAX_ROOM_ID_BYTES
            )));
        }
        if token.accepts.len() > limits::MAX_ACCEPTED_OPS {
            return Err(Error::BadRequest(format!(
                "accepts has more than {} ops",
                limits::MAX_ACCEPTED_OPS
            )));
        }
        self.store
            .add_mapping(token.mid, &token.key, server)
            .await?;
        let idle = self.settings.heartbeat * self.settings.heartbeat_max.max(1);
        Ok(ConnectReply {
            herald_redirect: token.herald.is_some_and(|h| h.redirect),
            mid: token.mid,
            key: token.key,
            room_id: token.room_id,
            accepts: token.accepts,
            heartbeat: i64::try_from(idle.as_nanos()).unwrap_or(i64::MAX).max(1),
        })
    }

    /// Removes the routes if they still point at `server`.
    ///
    /// # Errors
    /// Redis failing.
    pub async fn disconnect(&self, mid: i64, key: &str, server: &str) -> Result<bool> {
        Ok(self.store.del_mapping(mid, key, server).await?)
    }

    /// Refreshes (or recreates) the routes.
    ///
    /// # Errors
    /// Redis failing.
    pub async fn heartbeat(&self, mid: i64, key: &str, server: &str) -> Result<()> {
        self.store.expire_mapping(mid, key, server).await?;
        Ok(())
    }

    /// Stores `server`'s room counts and returns the cluster-wide counts with
    /// the caller's fresh numbers in place of its last aggregated ones.
    ///
    /// # Errors
    /// Redis failing.
    pub async fn renew_online(
        &self,
        server: &str,
        room_count: HashMap<String, i32>,
    ) -> Result<HashMap<String, i32>> {
        let online = Online {
            server: server.to_owned(),
            room_count,
            updated: unix_now(),
        };
        self.store.add_server_online(&online).await?;
        let mut guard = match self.online.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        guard.insert(online.server, online.room_count);
        Ok(sum_rooms(&guard))
    }

    /// Re-reads every comet's room counts from the store.
    ///
    /// # Errors
    /// Redis failing (the previous counts stay in place).
    pub async fn refresh_online(&self) -> Result<()> {
        let onlines = self
            .store
            .server_onlines(self.settings.online_stale)
            .await?;
        let fresh: HashMap<String, HashMap<String, i32>> = onlines
            .into_iter()
            .map(|o| (o.server, o.room_count))
            .collect();
        match self.online.write() {
            Ok(mut g) => *g = fresh,
            Err(p) => *p.into_inner() = fresh,
        }
        Ok(())
    }

    fn room_totals(&self) -> HashMap<String, i32> {
        match self.online.read() {
            Ok(g) => sum_rooms(&g),
            Err(p) => sum_rooms(&p.into_inner()),
        }
    }

    /// Upstream message from a client (op 4 etc.). goim only logs it; with
    /// an upstream configured it becomes a record keyed by mid (so one
    /// user's messages stay in order) holding comet's `ReceiveReq` bytes.
    ///
    /// # Errors
    /// The upstream queue failing (comet sees `Unavailable`).
    pub async fn receive(&self, mid: i64, proto: Option<&Proto>) -> Result<Option<RecordId>> {
        let (op, len) = proto.map_or((0, 0), |p| (p.op, p.body.len()));
        tracing::debug!(mid, op, len, "client message received");
        let Some(upstream) = &self.upstream else {
            self.metrics.upstream("logged");
            return Ok(None);
        };
        let value = prost::Message::encode_to_vec(&herald_protocol::pb::goim::logic::ReceiveReq {
            mid,
            proto: proto.cloned(),
        });
        match upstream.send(&mid.to_string(), &value).await {
            Ok(id) => {
                self.metrics.upstream("ok");
                Ok(Some(id))
            }
            Err(err) => {
                self.metrics.upstream("error");
                Err(err.into())
            }
        }
    }

    /// The balancer answer for a client (§11).
    pub fn nodes_reply(&self, platform: &str) -> NodesReply {
        let list = self.nodes.get();
        let (nodes, first) = list.pick(platform, self.settings.node_count);
        let base_delay = i32::try_from(self.settings.node_backoff.as_secs()).unwrap_or(i32::MAX);
        let (tcp_port, ws_port, wss_port) =
            first.map_or((0, 0, 0), |n| (n.tcp_port, n.ws_port, n.wss_port));
        NodesReply {
            domain: self.settings.node_domain.clone(),
            tcp_port,
            ws_port,
            wss_port,
            heartbeat: i32::try_from(self.settings.heartbeat.as_secs()).unwrap_or(i32::MAX),
            nodes,
            backoff: Some(Backoff {
                // goim's ceiling, raised if the base is above it.
                max_delay: base_delay.max(300),
                base_delay,
                factor: 1.8,
                jitter: 0.3,
            }),
            heartbeat_max: i32::try_from(self.settings.heartbeat_max).unwrap_or(i32::MAX),
        }
    }

    /// Pushes to keys: one PUSH record per comet; unknown keys are skipped.
    ///
    /// # Errors
    /// Redis or Kafka failing.
    pub async fn push_keys(
        &self,
        op: i32,
        keys: &[String],
        msg: bytes::Bytes,
    ) -> Result<Vec<RecordId>> {
        let servers = self.store.servers_by_keys(keys).await?;
        let routes = keys
            .iter()
            .zip(servers)
            .filter_map(|(k, s)| s.map(|s| (k.clone(), s)));
        self.push_routes(op, routes, msg).await
    }

    /// Pushes to every connection of the mids.
    ///
    /// # Errors
    /// Redis or Kafka failing.
    pub async fn push_mids(
        &self,
        op: i32,
        mids: &[i64],
        msg: bytes::Bytes,
    ) -> Result<Vec<RecordId>> {
        let routes = self.store.keys_by_mids(mids).await?;
        self.push_routes(op, routes.into_iter(), msg).await
    }

    async fn push_routes(
        &self,
        op: i32,
        routes: impl Iterator<Item = (String, String)>,
        msg: bytes::Bytes,
    ) -> Result<Vec<RecordId>> {
        // Group by comet, keeping first-seen order so record keys are stable.
        let mut order: Vec<String> = Vec::new();
        let mut by_server: HashMap<String, Vec<String>> = HashMap::new();
        for (key, server) in routes {
            let keys = by_server.entry(server.clone()).or_insert_with(|| {
                order.push(server);
                Vec::new()
            });
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        let msgs: Vec<PushMsg> = order
            .into_iter()
            .map(|server| PushMsg {
                r#type: push_msg::Type::Push as i32,
                operation: op,
                keys: by_server.remove(&server).unwrap_or_default(),
                server,
                msg: msg.clone(),
                ..PushMsg::default()
            })
            .collect();
        self.produce_all(&msgs).await
    }

    /// One ROOM record for `type://room`.
    ///
    /// # Errors
    /// Kafka failing.
    pub async fn push_room(
        &self,
        op: i32,
        typ: &str,
        room: &str,
        msg: bytes::Bytes,
    ) -> Result<Vec<RecordId>> {
        let msg = PushMsg {
            r#type: push_msg::Type::Room as i32,
            operation: op,
            room: room_key(typ, room),
            msg,
            ..PushMsg::default()
        };
        self.produce_all(std::slice::from_ref(&msg)).await
    }

    /// One BROADCAST record.
    ///
    /// # Errors
    /// Kafka failing.
    pub async fn push_all(&self, op: i32, speed: i32, msg: bytes::Bytes) -> Result<Vec<RecordId>> {
        let msg = PushMsg {
            r#type: push_msg::Type::Broadcast as i32,
            operation: op,
            speed,
            msg,
            ..PushMsg::default()
        };
        self.produce_all(std::slice::from_ref(&msg)).await
    }

    /// Writes every record concurrently (they share the producer's batch)
    /// and returns their ids in input order, or the first failure.
    async fn produce_all(&self, msgs: &[PushMsg]) -> Result<Vec<RecordId>> {
        let keys: Vec<String> = msgs.iter().map(queue::record_key).collect();
        let sends = msgs.iter().zip(&keys).map(|(msg, key)| async move {
            let start = std::time::Instant::now();
            let res = self.queue.push(key, msg).await;
            self.metrics
                .record(msg.r#type().label(), res.is_ok(), start.elapsed());
            res
        });
        let mut ids = Vec::with_capacity(msgs.len());
        for res in futures::future::join_all(sends).await {
            ids.push(res?);
        }
        Ok(ids)
    }

    /// Rooms of type `typ` (exactly `typ://…`), largest first, at most `limit`.
    pub fn online_top(&self, typ: &str, limit: usize) -> Vec<(String, i32)> {
        let prefix = format!("{typ}://");
        let mut rooms: Vec<(String, i32)> = self
            .room_totals()
            .into_iter()
            .filter_map(|(room, n)| room.strip_prefix(&prefix).map(|id| (id.to_owned(), n)))
            .collect();
        rooms.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        rooms.truncate(limit);
        rooms
    }

    /// Count of each room id of type `typ` (0 when unknown).
    pub fn online_room(&self, typ: &str, rooms: &[String]) -> HashMap<String, i32> {
        let totals = self.room_totals();
        rooms
            .iter()
            .map(|id| {
                let n = totals.get(&room_key(typ, id)).copied().unwrap_or(0);
                (id.clone(), n)
            })
            .collect()
    }

    /// `(connections, client IPs)` from the node list.
    pub fn online_total(&self) -> (u64, u64) {
        self.nodes.get().totals()
    }
}

/// goim's `type://id` room key.
pub fn room_key(typ: &str, room: &str) -> String {
    format!("{typ}://{room}")
}

fn sum_rooms(servers: &HashMap<String, HashMap<String, i32>>) -> HashMap<String, i32> {
    let mut out: HashMap<String, i32> = HashMap::new();
    for rooms in servers.values() {
        for (room, n) in rooms {
            let e = out.entry(room.clone()).or_insert(0);
            *e = e.saturating_add(*n);
        }
    }
    out
}

/// Re-aggregates room counts every `interval` until `shutdown` fires.
pub async fn aggregate_online(
    service: Arc<Service>,
    interval: Duration,
    shutdown: herald_runtime::Shutdown,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        if let Err(err) = service.refresh_online().await {
            tracing::warn!(cause = %err, source = ?std::error::Error::source(&err), "online aggregation failed; keeping previous counts");
        }
    }
}
