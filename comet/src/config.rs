//! `herald comet`'s flags ([`Args`]) and the [`Config`] they become. Each
//! default is written once, on its flag; [`Config::new`] starts from those
//! same defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use herald_runtime::{grpc_auth, nodes};
use tokio::net::TcpListener;

use crate::{Listeners, bind_client_listener};

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
    /// How often the WSS certificate and key files are checked for a new
    /// pair (cert-manager renewals, Secret updates), in milliseconds; 0 =
    /// never. A pair that does not load is logged and the one in use kept.
    #[arg(long, env = "HERALD_COMET_TLS_RELOAD_MS", default_value_t = 5000)]
    pub tls_reload_ms: u64,
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
    /// Empty (the default): the other comets of the node list that are not
    /// draining, if there is a node list; else op 18 still goes to
    /// redirect-capable clients with an empty `nodes` list, and they
    /// reconnect through logic's node API.
    #[arg(
        long,
        env = "HERALD_COMET_DRAIN_REDIRECT_NODES",
        value_delimiter = ',',
        default_value = ""
    )]
    pub drain_redirect_nodes: Vec<String>,
    /// The node list (the operator's): where the shutdown drain redirects
    /// clients, and its `drain` settings, which override the two drain flags
    /// above, read live so changing them restarts nothing.
    #[command(flatten)]
    pub node_list: nodes::SourceArgs,
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
    /// The shared token: required on the gRPC port (from job and the
    /// operator) and sent to logic.
    #[command(flatten)]
    pub grpc_token: grpc_auth::TokenArgs,
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
            tls_reload_ms,
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
            node_list,
            strict_pack_len,
            receive_rate,
            receive_burst,
            receive_flood_close,
            grpc_token,
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
            tls_reload: Duration::from_millis(tls_reload_ms),
            drain_deadline: Duration::from_millis(drain_deadline_ms),
            drain_close_rate,
            drain_redirect_nodes: drain_redirect_nodes
                .into_iter()
                .map(|node| node.trim().to_owned())
                .filter(|node| !node.is_empty())
                .collect(),
            node_list: node_list.source(),
            strict_pack_len,
            receive_rate,
            receive_burst,
            receive_flood_close,
            grpc_token: grpc_token.source(),
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
    /// Period of the check for a new WSS certificate; zero = never.
    pub tls_reload: Duration,
    /// Deadline of the drain that shutdown performs.
    pub drain_deadline: Duration,
    /// Close rate (connections per second) of the shutdown drain; 0 = as
    /// fast as the deadline allows.
    pub drain_close_rate: u32,
    /// Op-18 `nodes` of the shutdown drain; empty sends op 18 with no nodes,
    /// so redirect-capable clients reconnect through the node API.
    pub drain_redirect_nodes: Vec<String>,
    /// Where the node list comes from, if anywhere.
    pub node_list: Option<nodes::Source>,
    /// Refuse client frames with `pack_len` < 16 (goim reads them as "no body").
    pub strict_pack_len: bool,
    /// Per-connection `Receive` rate (ops per second); 0 = unlimited.
    pub receive_rate: u32,
    /// Per-connection `Receive` burst.
    pub receive_burst: u32,
    /// Rate-limited ops per 10-second window that close the connection; 0 = never.
    pub receive_flood_close: u32,
    /// The shared gRPC token: checked on the gRPC port, sent to logic.
    pub grpc_token: grpc_auth::TokenSource,
}

impl Config {
    /// Defaults matching the flags, for a given server id and logic address.
    pub fn new(server_id: impl Into<String>, logic_addr: impl Into<String>) -> Config {
        let mut args: Args = herald_runtime::args::defaults();
        args.server_id = Some(server_id.into());
        args.logic_addr = logic_addr.into();
        args.config()
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(flags: &[&str]) -> Args {
        herald_runtime::args::parse(flags).unwrap()
    }

    #[test]
    fn flags_are_consistent() {
        herald_runtime::args::assert_consistent::<Args>();
    }

    #[test]
    fn flags_become_config() {
        let args = parse(&[
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
        assert_eq!(args.tcp_addr.port(), 3101);
        assert_eq!(args.ws_addr.port(), 3102);
        assert_eq!(args.grpc_addr.port(), 3109);
        assert!(args.wss_addr.is_none());
        let config = args.config();
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
    fn config_new_starts_from_the_flag_defaults() {
        let parsed = parse(&["--server-id", "c", "--logic-addr", "l:1"]);
        let new = Config::new("c", "l:1");
        assert_eq!(format!("{new:?}"), format!("{:?}", parsed.config()));
    }

    #[test]
    fn server_id_defaults_to_a_host_name() {
        let config = parse(&[]).config();
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
