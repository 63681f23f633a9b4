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
//! - [`metrics`]: Prometheus metrics, and what the admin endpoints report.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

pub mod buckets;
pub mod conn;
pub mod logic;
pub mod metrics;
pub mod rpc;
pub mod server;
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
    /// The certificate or key file could not be read or parsed.
    #[error("cannot load TLS file {path:?}")]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// rustls refused the certificate/key pair.
    #[error("TLS configuration rejected")]
    Tls(#[source] rustls::Error),
    /// The admin HTTP server failed.
    #[error("admin HTTP server failed")]
    Http(#[source] std::io::Error),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Command-line flags of `herald comet`, each with an environment fallback.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Raw TCP client listener.
    #[arg(long, env = "HERALD_COMET_TCP_ADDR", default_value = "0.0.0.0:3101")]
    pub tcp_addr: SocketAddr,
    /// WebSocket client listener (`/sub`).
    #[arg(long, env = "HERALD_COMET_WS_ADDR", default_value = "0.0.0.0:3102")]
    pub ws_addr: SocketAddr,
    /// WSS client listener (`/sub` over TLS); off unless given.
    #[arg(long, env = "HERALD_COMET_WSS_ADDR")]
    pub wss_addr: Option<SocketAddr>,
    /// PEM certificate chain for WSS.
    #[arg(long, env = "HERALD_COMET_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for WSS.
    #[arg(long, env = "HERALD_COMET_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// gRPC listener for `goim.comet.Comet` and `herald.admin.v1.CometAdmin`.
    #[arg(long, env = "HERALD_COMET_GRPC_ADDR", default_value = "0.0.0.0:3109")]
    pub grpc_addr: SocketAddr,
    /// Admin HTTP listener: `/metrics`, `/healthz`, `/readyz`.
    #[arg(long, env = "HERALD_COMET_HTTP_ADDR", default_value = "0.0.0.0:3190")]
    pub http_addr: SocketAddr,
    /// Server id sent to logic and stored in Redis routes; defaults to the host name.
    #[arg(long, env = "HERALD_COMET_SERVER_ID")]
    pub server_id: Option<String>,
    /// Logic's gRPC address, `host:port` or a full `http://` URI.
    #[arg(
        long,
        env = "HERALD_COMET_LOGIC_ADDR",
        default_value = "127.0.0.1:3119"
    )]
    pub logic_addr: String,
    /// Deadline for the WebSocket upgrade plus authentication, in milliseconds.
    #[arg(
        long,
        env = "HERALD_COMET_HANDSHAKE_TIMEOUT_MS",
        default_value_t = 5_000
    )]
    pub handshake_timeout_ms: u64,
    /// Deadline of every call to logic, in milliseconds.
    #[arg(long, env = "HERALD_COMET_LOGIC_TIMEOUT_MS", default_value_t = 3_000)]
    pub logic_timeout_ms: u64,
    /// Most calls to logic in flight at once; further calls wait in comet
    /// (their deadline starts when they are sent), so thousands of clients
    /// closing together queue their `Disconnect`s instead of opening
    /// thousands of HTTP/2 streams to logic at once.
    #[arg(long, env = "HERALD_COMET_LOGIC_MAX_IN_FLIGHT", default_value_t = 256)]
    pub logic_max_in_flight: usize,
    /// Most client connections held at once; further ones are closed on accept.
    #[arg(long, env = "HERALD_COMET_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,
    /// Per-connection outbound queue, in bytes; a client that lets it fill is closed.
    #[arg(long, env = "HERALD_COMET_QUEUE_BYTES", default_value_t = 256 * 1024)]
    pub queue_bytes: usize,
    /// Kernel send buffer of each client socket (`SO_SNDBUF`, which Linux
    /// doubles), in bytes; 0 keeps the kernel's autotuning, which lets a
    /// client that stopped reading hold up to `net.ipv4.tcp_wmem`'s maximum
    /// (4 MiB by default) before the outbound queue fills and closes it.
    #[arg(long, env = "HERALD_COMET_SEND_BUFFER_BYTES", default_value_t = 64 * 1024)]
    pub send_buffer_bytes: usize,
    /// Number of connection buckets (shards).
    #[arg(long, env = "HERALD_COMET_BUCKETS", default_value_t = 32)]
    pub buckets: usize,
    /// Seconds between room-count reports to logic (`RenewOnline`).
    #[arg(long, env = "HERALD_COMET_RENEW_ONLINE_SECS", default_value_t = 10)]
    pub renew_online_secs: u64,
    /// Seconds between session refreshes (`Heartbeat` to logic), ±25 % jitter.
    #[arg(long, env = "HERALD_COMET_SESSION_REFRESH_SECS", default_value_t = 300)]
    pub session_refresh_secs: u64,
    /// On SIGTERM (shutdown), close every connection within this many
    /// milliseconds, like the admin `Drain` RPC; any left are then closed at once.
    #[arg(long, env = "HERALD_COMET_DRAIN_DEADLINE_MS", default_value_t = 30_000)]
    pub drain_deadline_ms: u64,
    /// Connections closed per second during the shutdown drain; 0 closes them
    /// as fast as the deadline allows (the `Drain` RPC's meaning of 0).
    #[arg(long, env = "HERALD_COMET_DRAIN_CLOSE_RATE", default_value_t = 0)]
    pub drain_close_rate: u32,
    /// Comma-separated hosts put in the op-18 `nodes` of the shutdown drain.
    /// Empty (the default) still sends op 18 to redirect-capable clients, with
    /// an empty `nodes` list: they then reconnect through logic's node API.
    #[arg(
        long,
        env = "HERALD_COMET_DRAIN_REDIRECT_NODES",
        value_delimiter = ',',
        default_value = ""
    )]
    pub drain_redirect_nodes: Vec<String>,
    /// Refuse client frames whose `pack_len` is shorter than the 16-byte
    /// header (closing the connection) instead of reading them as "no body"
    /// like goim does. Off by default for goim compatibility.
    #[arg(long, env = "HERALD_COMET_STRICT_PACK_LEN")]
    pub strict_pack_len: bool,
    /// Client ops forwarded to logic `Receive`, per connection per second
    /// (token bucket refill rate); 0 = no limit. Ops over the limit are dropped.
    #[arg(long, env = "HERALD_COMET_RECEIVE_RATE", default_value_t = 20)]
    pub receive_rate: u32,
    /// Burst of the `Receive` token bucket: ops a quiet connection may send at once.
    #[arg(long, env = "HERALD_COMET_RECEIVE_BURST", default_value_t = 40)]
    pub receive_burst: u32,
    /// Dropped (rate-limited) ops within one 10-second window that close the
    /// connection as a flood; 0 never closes.
    #[arg(long, env = "HERALD_COMET_RECEIVE_FLOOD_CLOSE", default_value_t = 200)]
    pub receive_flood_close: u32,
}

impl Args {
    /// The runtime configuration these flags describe.
    pub fn config(self) -> Config {
        // Destructured so that a new flag cannot be silently ignored.
        let Args {
            tcp_addr: _,
            ws_addr: _,
            wss_addr: _,
            tls_cert,
            tls_key,
            grpc_addr: _,
            http_addr: _,
            server_id,
            logic_addr,
            handshake_timeout_ms,
            logic_timeout_ms,
            logic_max_in_flight,
            max_connections,
            queue_bytes,
            send_buffer_bytes,
            buckets,
            renew_online_secs,
            session_refresh_secs,
            drain_deadline_ms,
            drain_close_rate,
            drain_redirect_nodes,
            strict_pack_len,
            receive_rate,
            receive_burst,
            receive_flood_close,
        } = self;
        Config {
            server_id: server_id.unwrap_or_else(hostname),
            logic_addr,
            handshake_timeout: Duration::from_millis(handshake_timeout_ms),
            logic_timeout: Duration::from_millis(logic_timeout_ms),
            logic_max_in_flight,
            max_connections,
            queue_bytes,
            send_buffer: (send_buffer_bytes > 0).then_some(send_buffer_bytes),
            buckets: buckets.max(1),
            renew_online_interval: Duration::from_secs(renew_online_secs.max(1)),
            session_refresh: Duration::from_secs(session_refresh_secs.max(1)),
            tls_cert,
            tls_key,
            drain_deadline: Duration::from_millis(drain_deadline_ms),
            drain_close_rate,
            drain_redirect_nodes: drain_redirect_nodes
                .into_iter()
                .map(|node| node.trim().to_owned())
                .filter(|node| !node.is_empty())
                .collect(),
            strict_pack_len,
            receive_rate,
            receive_burst,
            receive_flood_close,
        }
    }

    /// Binds the four listeners these flags name.
    ///
    /// # Errors
    /// The bind error of the first listener that failed.
    pub async fn bind(&self) -> std::io::Result<Listeners> {
        Ok(Listeners {
            tcp: bind_client_listener(self.tcp_addr)?,
            ws: bind_client_listener(self.ws_addr)?,
            wss: match self.wss_addr {
                Some(addr) => Some(bind_client_listener(addr)?),
                None => None,
            },
            grpc: TcpListener::bind(self.grpc_addr).await?,
            http: Some(TcpListener::bind(self.http_addr).await?),
        })
    }
}

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

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// What the comet runs with; built from [`Args`], or directly by tests.
#[derive(Debug, Clone)]
pub struct Config {
    /// This comet's server id (§1).
    pub server_id: String,
    /// Logic's gRPC address, `host:port` or a URI.
    pub logic_addr: String,
    /// Deadline covering the WebSocket upgrade and authentication (§5.1).
    pub handshake_timeout: Duration,
    /// Deadline of each call to logic (goim sets none; §8).
    pub logic_timeout: Duration,
    /// Most calls to logic in flight at once (0 is taken as 1).
    pub logic_max_in_flight: usize,
    /// Most connections held at once.
    pub max_connections: usize,
    /// Per-connection outbound queue limit, in bytes.
    pub queue_bytes: usize,
    /// `SO_SNDBUF` of client sockets; `None` keeps the kernel's autotuning.
    pub send_buffer: Option<usize>,
    /// Number of buckets connections are sharded into.
    pub buckets: usize,
    /// Period of `RenewOnline`.
    pub renew_online_interval: Duration,
    /// Mean period of the session refresh (`Heartbeat` to logic).
    pub session_refresh: Duration,
    /// PEM certificate chain for the WSS listener.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for the WSS listener.
    pub tls_key: Option<PathBuf>,
    /// Deadline of the drain that shutdown performs.
    pub drain_deadline: Duration,
    /// Close rate (connections per second) of the shutdown drain; 0 = as
    /// fast as the deadline allows.
    pub drain_close_rate: u32,
    /// Op-18 `nodes` of the shutdown drain; empty sends op 18 with no nodes,
    /// so redirect-capable clients reconnect through the node API.
    pub drain_redirect_nodes: Vec<String>,
    /// Refuse client frames with `pack_len` < 16 (goim reads them as "no body").
    pub strict_pack_len: bool,
    /// Per-connection `Receive` rate (ops per second); 0 = unlimited.
    pub receive_rate: u32,
    /// Per-connection `Receive` burst.
    pub receive_burst: u32,
    /// Rate-limited ops per 10-second window that close the connection; 0 = never.
    pub receive_flood_close: u32,
}

impl Config {
    /// Defaults matching the flags, for a given server id and logic address.
    pub fn new(server_id: impl Into<String>, logic_addr: impl Into<String>) -> Config {
        Config {
            server_id: server_id.into(),
            logic_addr: logic_addr.into(),
            handshake_timeout: Duration::from_secs(5),
            logic_timeout: Duration::from_secs(3),
            logic_max_in_flight: 256,
            max_connections: 100_000,
            queue_bytes: 256 * 1024,
            send_buffer: Some(64 * 1024),
            buckets: 32,
            renew_online_interval: Duration::from_secs(10),
            session_refresh: Duration::from_secs(300),
            tls_cert: None,
            tls_key: None,
            drain_deadline: Duration::from_secs(30),
            drain_close_rate: 0,
            drain_redirect_nodes: Vec::new(),
            strict_pack_len: false,
            receive_rate: 20,
            receive_burst: 40,
            receive_flood_close: 200,
        }
    }
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
    /// Set once a drain starts: accept loops then refuse new connections.
    pub(crate) draining: std::sync::atomic::AtomicBool,
    /// Cancelled when the drain task (RPC or shutdown) has closed its last
    /// connection or given up.
    pub(crate) drained: CancellationToken,
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
        Some(listener) => Some((listener, tls_acceptor(&config)?)),
        None => None,
    };
    let metrics = metrics::Metrics::new();
    let logic = logic::Logic::new(
        &config.logic_addr,
        config.logic_timeout,
        config.logic_max_in_flight,
        metrics.logic_failures(),
    )?;
    let shared = Arc::new(Shared {
        buckets: buckets::Buckets::new(config.buckets),
        logic,
        metrics,
        draining: std::sync::atomic::AtomicBool::new(false),
        drained: CancellationToken::new(),
        shutdown: herald_runtime::Shutdown::new(),
        tasks: TaskTracker::new(),
        config,
    });
    info!(
        server = %shared.config.server_id,
        tcp = ?tcp.local_addr().ok(),
        ws = ?ws.local_addr().ok(),
        grpc = ?grpc.local_addr().ok(),
        "comet listening"
    );

    let plan = rpc::DrainPlan {
        deadline: shared.config.drain_deadline,
        close_rate: shared.config.drain_close_rate,
        nodes: shared.config.drain_redirect_nodes.clone(),
        tcp_port: port(&tcp),
        ws_port: port(&ws),
        wss_port: wss.as_ref().map_or(0, |(listener, _)| port(listener)),
        reconnect_within_ms: u32::try_from(shared.config.drain_deadline.as_millis())
            .unwrap_or(u32::MAX),
    };
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
    let wss_task = wss.map(|(listener, acceptor)| {
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
                let result = rpc::serve(grpc, shared.clone()).await;
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
        match rpc::start_drain(&shared, &plan) {
            Ok((connections, started)) => {
                info!(connections, started, "comet draining before shutdown");
            }
            Err(err) => warn!(cause = %err, "shutdown drain failed to start"),
        }
        if tokio::time::timeout(shared.config.drain_deadline, shared.drained.cancelled())
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
    let _ = tcp_task.await;
    let _ = ws_task.await;
    if let Some(task) = wss_task {
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
fn port(listener: &TcpListener) -> i32 {
    listener
        .local_addr()
        .map_or(0, |addr| i32::from(addr.port()))
}

/// The TLS acceptor for WSS, from the configured PEM files.
fn tls_acceptor(config: &Config) -> Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Err(Error::TlsMissing);
    };
    let file_error = |path: &PathBuf| {
        let path = path.clone();
        move |source| Error::TlsFile { path, source }
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(file_error(cert))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(file_error(key))?;
    // An explicit provider: the process may not have installed a default one.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(Error::Tls)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(Error::Tls)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn flags_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_become_config() {
        let cli = Cli::parse_from([
            "comet",
            "--server-id",
            "comet-7",
            "--queue-bytes",
            "1024",
            "--handshake-timeout-ms",
            "8000",
            "--buckets",
            "0",
            "--drain-deadline-ms",
            "5000",
            "--drain-close-rate",
            "50",
            "--drain-redirect-nodes",
            "comet-b.example.com, comet-c.example.com",
            "--strict-pack-len",
            "--receive-rate",
            "5",
            "--receive-burst",
            "7",
            "--receive-flood-close",
            "0",
        ]);
        assert_eq!(cli.args.tcp_addr.port(), 3101);
        assert_eq!(cli.args.ws_addr.port(), 3102);
        assert_eq!(cli.args.grpc_addr.port(), 3109);
        assert!(cli.args.wss_addr.is_none());
        let config = cli.args.config();
        assert_eq!(config.server_id, "comet-7");
        assert_eq!(config.queue_bytes, 1024);
        assert_eq!(config.handshake_timeout, Duration::from_secs(8));
        assert_eq!(config.buckets, 1, "at least one bucket");
        assert_eq!(config.drain_deadline, Duration::from_secs(5));
        assert_eq!(config.drain_close_rate, 50);
        assert_eq!(
            config.drain_redirect_nodes,
            ["comet-b.example.com", "comet-c.example.com"]
        );
        assert!(config.strict_pack_len);
        assert_eq!(
            (
                config.receive_rate,
                config.receive_burst,
                config.receive_flood_close
            ),
            (5, 7, 0)
        );
    }

    #[test]
    fn server_id_defaults_to_a_host_name() {
        let config = Cli::parse_from(["comet"]).args.config();
        assert!(!config.server_id.is_empty());
        assert_eq!(config.drain_deadline, Duration::from_secs(30));
        assert_eq!(config.drain_close_rate, 0);
        assert!(config.drain_redirect_nodes.is_empty());
        assert!(!config.strict_pack_len, "goim-compatible by default");
        assert_eq!(
            (
                config.receive_rate,
                config.receive_burst,
                config.receive_flood_close
            ),
            (20, 40, 200)
        );
    }
}
