//! Comet: holds client connections (raw TCP, WebSocket, WSS) and delivers pushes.
//!
//! Speaks goim 2.0's client protocol (§2–5), calls
//! logic's `goim.logic.Logic` to authenticate and report, serves goim's
//! `goim.comet.Comet` to job, and Herald's `herald.admin.v1.CometAdmin` to the
//! operator (load reports, drain with op-18 redirects).
//!
//! `§N` refers to docs/protocol.md.
//!
//! # Layout
//! In data-flow order, after mini-redis: a client comes in through
//! [`server`], is authenticated by [`logic`] and registered in [`buckets`];
//! a push comes in through [`rpc`], finds its connections in [`buckets`], is
//! queued on each one's [`conn`], and that connection's writer (`tcp` or
//! `websocket`) writes it to the socket.
//! - [`server`]: the client side, one submodule per step: `accept` (accept
//!   loops for TCP, WebSocket and WSS, the connection limit, the back-off
//!   while accepts fail), `upgrade` (the WebSocket upgrade and its limits),
//!   `session` (the handshake op 7 → logic `Connect` → op 8 under one
//!   deadline, then the per-connection session loop, §5) and `receive_limit`
//!   (the rate limit on ops forwarded to logic `Receive`).
//! - [`logic`]: the gRPC client to logic, with deadlines, and the periodic
//!   room-count report (`RenewOnline`).
//! - [`buckets`]: connections sharded by CityHash32(key) into buckets, each
//!   with its key map and room membership; every push looks up here.
//! - [`rpc`]: the gRPC services (`goim.comet.Comet`, `herald.admin.v1.CometAdmin`).
//! - [`conn`]: one connection's shared handle: accepted ops and a
//!   byte-bounded outbound queue; queueing wakes the connection's writer.
//! - `tcp`: a TCP connection, read by its session task, which also runs its
//!   writer (`TcpWriter`: the queue drained into the socket in batches).
//! - `websocket`: a WebSocket connection's read half, read by the session,
//!   and its writer task (`run_writer`) that drains the queue into the write
//!   half in batches.
//! - [`tls`]: the WSS certificate, re-read when its files change.
//! - [`metrics`]: Prometheus metrics, and what the admin endpoints report.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

pub mod buckets;
mod config;
pub mod conn;
pub mod logic;
pub mod metrics;
pub mod rpc;
pub mod server;
pub mod tls;

pub use config::{Args, Config};
mod tcp;
mod websocket;

/// Why the comet could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The logic address is not a valid URI.
    #[error("invalid logic address {addr:?}")]
    LogicAddr {
        /// The address as configured.
        addr: String,
        /// What the URI parser said.
        #[source]
        source: tonic::transport::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server failed")]
    Grpc(#[source] tonic::transport::Error),
    /// A WSS listener was given without a certificate and key.
    #[error("a WSS listener needs tls_cert and tls_key")]
    TlsMissing,
    /// The WSS certificate or key could not be loaded at start.
    #[error("WSS certificate")]
    Tls(#[from] tls::Error),
    /// The admin HTTP server failed.
    #[error("admin HTTP server failed")]
    Http(#[source] std::io::Error),
    /// The node-list file exists but cannot be read or parsed.
    #[error("node list")]
    NodeList(#[from] herald_runtime::nodes::Error),
    /// The gRPC token file cannot be read, or holds no usable token.
    #[error("gRPC token")]
    GrpcToken(#[from] herald_runtime::grpc_auth::Error),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Accept queue of client listeners (the kernel caps it at `somaxconn`).
/// Tokio's `bind` asks for 128, which a reconnect storm — every client of a
/// drained comet arriving at once — or a pause in accepting (descriptors
/// exhausted) overflows; the kernel then drops SYNs and clients wait for
/// retransmits. 1024 still overflowed in the benchmark's connection storm
/// (19k clients, 1,000 handshakes in flight: 237–330 SYNs dropped), so ask
/// for 4096, the default `somaxconn` of current kernels.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a client listener with [`LISTEN_BACKLOG`].
///
/// # Errors
/// The socket, bind or listen error.
pub fn bind_client_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As tokio's bind does: a restarted comet rebinds at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The bound listeners [`run`] serves; bind `127.0.0.1:0` in tests.
#[derive(Debug)]
pub struct Listeners {
    /// Raw TCP clients.
    pub tcp: TcpListener,
    /// WebSocket clients.
    pub ws: TcpListener,
    /// WebSocket-over-TLS clients; needs `tls_cert` and `tls_key`.
    pub wss: Option<TcpListener>,
    /// gRPC (comet + admin services).
    pub grpc: TcpListener,
    /// Admin HTTP (`/metrics`, `/healthz`, `/readyz`); `None` serves none.
    pub http: Option<TcpListener>,
}

/// State shared by the accept loops, sessions and gRPC services.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) buckets: buckets::Buckets,
    pub(crate) logic: logic::Logic,
    pub(crate) metrics: metrics::Metrics,
    /// Set while a drain runs: accept loops then refuse new connections.
    pub(crate) draining: std::sync::atomic::AtomicBool,
    /// The drain under way, or the last one. std Mutex: held only to
    /// start, cancel or look at a drain, never across an await.
    pub(crate) drain: std::sync::Mutex<rpc::DrainRun>,
    /// Fired when the comet shuts down; every task watches it.
    pub(crate) shutdown: herald_runtime::Shutdown,
    /// Tracks sessions so shutdown can wait for their `Disconnect` calls.
    pub(crate) tasks: TaskTracker,
}

/// Runs the comet until `shutdown` completes, then drains like the admin
/// `Drain` RPC with the configured defaults (readiness fails, new connections
/// are refused, connections close paced, op 18 first to those that asked),
/// closes whatever is left at the drain deadline, waits for every session's
/// logic `Disconnect` and returns.
///
/// # Errors
/// [`Error::LogicAddr`] for a malformed logic address; [`Error::Grpc`] or
/// [`Error::Http`] when a server fails.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let Listeners {
        tcp,
        ws,
        wss,
        grpc,
        http,
    } = listeners;
    let wss = match wss {
        Some(listener) => {
            let certificate = Arc::new(load_certificate(&config)?);
            let acceptor = tls::acceptor(certificate.clone())?;
            Some((listener, acceptor, certificate))
        }
        None => None,
    };
    let nodes = match &config.node_list {
        Some(source) => herald_runtime::nodes::Nodes::new(source.initial()?),
        None => herald_runtime::nodes::Nodes::default(),
    };
    let metrics = metrics::Metrics::new();
    let grpc_token = config.grpc_token.start()?;
    let logic = logic::Logic::new(
        &config.logic_addr,
        config.logic_timeout,
        config.logic_max_in_flight,
        &grpc_token,
        metrics.logic_failures(),
    )?;
    let shared = Arc::new(Shared {
        buckets: buckets::Buckets::new(config.buckets),
        logic,
        metrics,
        draining: std::sync::atomic::AtomicBool::new(false),
        drain: std::sync::Mutex::default(),
        shutdown: herald_runtime::Shutdown::new(),
        tasks: TaskTracker::new(),
        config,
    });
    info!(
        server = %shared.config.server_id,
        tcp = ?tcp.local_addr().ok(),
        ws = ?ws.local_addr().ok(),
        grpc = ?grpc.local_addr().ok(),
        grpc_token = grpc_token.is_on(),
        "comet listening"
    );

    let ports = (
        port(&tcp),
        port(&ws),
        wss.as_ref().map_or(0, |(listener, ..)| port(listener)),
    );
    shared.metrics.node_list(nodes.get().generation);
    let nodes_task = shared.config.node_list.clone().map(|source| {
        let (nodes, stop, shared) = (nodes.clone(), shared.shutdown.wait(), shared.clone());
        let apply = move |list: herald_runtime::nodes::NodeList| {
            shared.metrics.node_list(list.generation);
            nodes.set(list);
        };
        tokio::spawn(
            source
                .watch(apply, stop)
                .instrument(info_span!("node_list")),
        )
    });
    // One limit for both client listeners.
    let limit = Arc::new(tokio::sync::Semaphore::new(shared.config.max_connections));
    let tcp_task = tokio::spawn(
        server::accept_loop(tcp, server::Listen::Tcp, shared.clone(), limit.clone())
            .instrument(info_span!("accept", transport = "tcp")),
    );
    let ws_task = tokio::spawn(
        server::accept_loop(ws, server::Listen::Ws, shared.clone(), limit.clone())
            .instrument(info_span!("accept", transport = "ws")),
    );
    let tls_task = wss
        .as_ref()
        .filter(|_| !shared.config.tls_reload.is_zero())
        .map(|(_, _, certificate)| {
            let (certificate, shared) = (certificate.clone(), shared.clone());
            let (period, stop) = (shared.config.tls_reload, shared.shutdown.wait());
            let counted = move |outcome| shared.metrics.tls_reload(outcome);
            tokio::spawn(
                tls::reload_loop(certificate, period, counted, stop)
                    .instrument(info_span!("tls_reload")),
            )
        });
    let wss_task = wss.map(|(listener, acceptor, _)| {
        tokio::spawn(
            server::accept_loop(
                listener,
                server::Listen::Wss(acceptor),
                shared.clone(),
                limit,
            )
            .instrument(info_span!("accept", transport = "wss")),
        )
    });
    let renew_task = tokio::spawn(
        logic::renew_online_loop(shared.clone()).instrument(info_span!("renew_online")),
    );
    let grpc_task = {
        let shared = shared.clone();
        tokio::spawn(
            async move {
                let result = rpc::serve(grpc, shared.clone(), grpc_token).await;
                // Without gRPC, job cannot push here: stop rather than linger.
                if result.is_err() {
                    shared.shutdown.trigger();
                }
                result
            }
            .instrument(info_span!("grpc")),
        )
    };
    let http_task = http.map(|listener| {
        let stop = shared.shutdown.wait();
        tokio::spawn(
            herald_runtime::admin::serve(listener, shared.clone(), stop)
                .instrument(info_span!("http")),
        )
    });

    let probe_task = tokio::spawn(
        logic::reachability_loop(shared.clone()).instrument(info_span!("logic_probe")),
    );
    let sweep_task = tokio::spawn(idle_sweep(shared.clone()).instrument(info_span!("idle_sweep")));

    let token = shared.shutdown.clone();
    let requested = tokio::select! {
        () = shutdown => true,
        () = token.cancelled() => false,
    };
    if requested {
        // A drain already started through the RPC is waited for instead,
        // still bounded by the configured deadline.
        let plan = shutdown_plan(&shared.config, &nodes.get(), ports);
        let (connections, started) = rpc::start_drain(&shared, &plan, true);
        info!(connections, started, deadline = ?plan.deadline, close_rate = plan.close_rate,
              nodes = ?plan.nodes, "comet draining before shutdown");
        let drained = shared.drain_run().done;
        if tokio::time::timeout(plan.deadline, drained.cancelled())
            .await
            .is_err()
        {
            warn!("drain deadline passed: closing the remaining connections");
        }
    }
    info!("comet shutting down");
    shared.shutdown.trigger();
    // Sessions wait on their sockets only; this ends what the drain left.
    for conn in shared.buckets.all() {
        conn.close(conn::CloseReason::Shutdown);
    }
    let _ = probe_task.await;
    let _ = sweep_task.await;
    if let Some(task) = nodes_task {
        let _ = task.await;
    }
    let _ = tcp_task.await;
    let _ = ws_task.await;
    if let Some(task) = wss_task {
        let _ = task.await;
    }
    if let Some(task) = tls_task {
        let _ = task.await;
    }
    let _ = renew_task.await;
    shared.tasks.close();
    shared.tasks.wait().await;
    if let Some(Ok(Err(err))) = match http_task {
        Some(task) => Some(task.await),
        None => None,
    } {
        return Err(Error::Http(err));
    }
    match grpc_task.await {
        Ok(result) => result,
        Err(_) => Ok(()),
    }
}

/// How often idle deadlines are checked: the granularity of the idle
/// timeout, which is minutes in practice.
const IDLE_SWEEP: Duration = Duration::from_millis(500);

/// Closes every connection whose idle deadline passed, each [`IDLE_SWEEP`].
/// One sweep instead of one timer per connection: a timer is ~100 bytes in
/// every session and a timer-wheel update on every heartbeat.
async fn idle_sweep(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(IDLE_SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for conn in shared.buckets.idle(conn::coarse_ms()) {
            conn.close(conn::CloseReason::Idle);
        }
    }
}

/// A listener's port as op 18 carries it; 0 when unknown.
/// The shutdown drain: the node list's `drain` settings when it has them
/// (the operator's, changed without a restart), else the flags; op 18 names
/// `--drain-redirect-nodes`, else the other comets of the node list that
/// are not draining.
fn shutdown_plan(
    config: &Config,
    list: &herald_runtime::nodes::NodeList,
    (tcp_port, ws_port, wss_port): (i32, i32, i32),
) -> rpc::DrainPlan {
    let (deadline, close_rate) = match list.drain {
        Some(drain) => (Duration::from_millis(drain.deadline_ms), drain.close_rate),
        None => (config.drain_deadline, config.drain_close_rate),
    };
    let nodes = if config.drain_redirect_nodes.is_empty() {
        list.redirect_targets(&config.server_id, herald_protocol::nodes::DEFAULT_PICKED)
    } else {
        config.drain_redirect_nodes.clone()
    };
    rpc::DrainPlan {
        deadline,
        close_rate,
        nodes,
        tcp_port,
        ws_port,
        wss_port,
        // As the operator's Drain: the closes are paced already; each
        // redirected client gets this long to connect elsewhere first.
        reconnect_within_ms: RECONNECT_WITHIN_MS,
    }
}

/// How long a redirected client has to connect elsewhere before its
/// draining comet closes the connection (see [`rpc::start_drain`]).
const RECONNECT_WITHIN_MS: u32 = 2000;

fn port(listener: &TcpListener) -> i32 {
    listener
        .local_addr()
        .map_or(0, |addr| i32::from(addr.port()))
}

/// The WSS certificate from the configured PEM files.
fn load_certificate(config: &Config) -> Result<tls::Certificate> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Err(Error::TlsMissing);
    };
    Ok(tls::Certificate::load(tls::Files {
        cert: cert.clone(),
        key: key.clone(),
    })?)
}
