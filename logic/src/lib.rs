//! Logic: goim's HTTP push API and `goim.logic.Logic` gRPC, routing in Redis,
//! push records to Kafka (§6–§12).
//!
//! `§N` refers to docs/protocol.md.
//!
//! # Layout
//! Data-flow order, as in goim's `internal/logic/{http,grpc,dao}`:
//! - [`http`] (push/online/nodes API) and [`grpc`] (comet's calls) decode
//!   requests and call the one [`service::Service`];
//! - [`token`] parses the client's op-7 token (goim JSON or JWT);
//! - [`store`] keeps routes and room counts ([`store::redis`]), [`queue`]
//!   writes push records ([`queue::kafka`]) — both behind traits so
//!   `herald standalone` can swap in in-memory versions;
//! - [`nodes`] holds the comet node list (file or ConfigMap) and the
//!   balancer pick; [`metrics`] the Prometheus registry and probe routes.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::Instrument;

pub mod grpc;
pub mod http;
pub mod metrics;
pub mod nodes;
pub mod queue;
pub mod service;
pub mod store;
pub mod token;

pub use token::TokenMode;

/// Why logic could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The Redis client could not be built.
    #[error("setting up the session store")]
    Store(#[from] store::Error),
    /// The Kafka producer could not be built.
    #[error("setting up the push queue")]
    Queue(#[from] queue::Error),
    /// The node list file could not be read at startup.
    #[error("loading the node list")]
    Nodes(#[from] nodes::Error),
    /// Binding a listener failed.
    #[error("binding {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("http server")]
    Http(#[source] std::io::Error),
    /// The gRPC server failed.
    #[error("grpc server")]
    Grpc(#[source] tonic::transport::Error),
}

/// Result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `herald logic` command-line arguments, each with an environment fallback.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// HTTP push API listen address.
    #[arg(long, env = "HERALD_LOGIC_HTTP_ADDR", default_value = "0.0.0.0:3111")]
    pub http_addr: SocketAddr,
    /// gRPC (`goim.logic.Logic`) listen address.
    #[arg(long, env = "HERALD_LOGIC_GRPC_ADDR", default_value = "0.0.0.0:3119")]
    pub grpc_addr: SocketAddr,
    /// Redis URL for routes and room counts.
    #[arg(
        long,
        env = "HERALD_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// Deadline for one Redis command, in milliseconds.
    #[arg(long, env = "HERALD_REDIS_TIMEOUT_MS", default_value_t = 1000)]
    pub redis_timeout_ms: u64,
    /// Kafka bootstrap brokers, comma-separated.
    #[arg(long, env = "HERALD_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// Kafka push topic.
    #[arg(long, env = "HERALD_KAFKA_TOPIC", default_value = "goim-push-topic")]
    pub kafka_topic: String,
    /// Longest a push waits for Kafka's acknowledgement, in milliseconds.
    #[arg(long, env = "HERALD_KAFKA_MESSAGE_TIMEOUT_MS", default_value_t = 5000)]
    pub kafka_message_timeout_ms: u64,
    /// Microseconds the Kafka producer waits to fill a batch (`linger.ms`);
    /// 0 sends each push at once. Trades latency for CPU when busy.
    #[arg(long, env = "HERALD_KAFKA_LINGER_US", default_value_t = 0)]
    pub kafka_linger_us: u64,
    /// Linger, in microseconds, of a second producer that takes the pushes
    /// while at least `--kafka-busy-in-flight` await Kafka's answer: under
    /// load, batches cost less CPU than the latency they add. Equal to
    /// `--kafka-linger-us`, logic uses one producer.
    #[arg(long, env = "HERALD_KAFKA_BUSY_LINGER_US", default_value_t = 1000)]
    pub kafka_busy_linger_us: u64,
    /// Pushes awaiting Kafka's answer from which logic counts as busy.
    #[arg(long, env = "HERALD_KAFKA_BUSY_IN_FLIGHT", default_value_t = 8)]
    pub kafka_busy_in_flight: usize,
    /// TTL of routing and online keys in Redis, in seconds (§9 `E`).
    #[arg(long, env = "HERALD_LOGIC_ROUTING_TTL_SECS", default_value_t = 1800)]
    pub routing_ttl_secs: u64,
    /// Node list JSON file (docs/protocol.md §15.4 format); none = no nodes.
    #[arg(
        long,
        env = "HERALD_LOGIC_NODE_LIST",
        conflicts_with = "node_list_configmap"
    )]
    pub node_list: Option<PathBuf>,
    /// Watch the node list in this ConfigMap (key `nodes.json`) instead of a file.
    #[arg(long, env = "HERALD_NODE_LIST_CONFIGMAP")]
    pub node_list_configmap: Option<String>,
    /// Namespace of `--node-list-configmap` (in a pod: its own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub node_list_namespace: String,
    /// Kafka topic for client upstream messages (`Receive`); none = logged only.
    #[arg(long, env = "HERALD_LOGIC_RECEIVE_TOPIC")]
    pub receive_topic: Option<String>,
    /// How often the node list file's mtime is checked, in milliseconds.
    #[arg(long, env = "HERALD_LOGIC_NODE_LIST_POLL_MS", default_value_t = 2000)]
    pub node_list_poll_ms: u64,
    /// API key required as `Authorization: Bearer <key>` on the HTTP API.
    #[arg(long, env = "HERALD_LOGIC_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Answer HTTP 200 always (goim behaviour), outcome only in `code`.
    #[arg(long, env = "HERALD_LOGIC_COMPAT_STATUS_200")]
    pub compat_status_200: bool,
    /// How client tokens are checked.
    #[arg(
        long,
        env = "HERALD_LOGIC_TOKEN_MODE",
        value_enum,
        default_value = "goim"
    )]
    pub token_mode: TokenMode,
    /// HS256 secret for `--token-mode jwt`.
    #[arg(long, env = "HERALD_LOGIC_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// RS256 public key (PEM file) for `--token-mode jwt`, instead of a secret.
    #[arg(
        long,
        env = "HERALD_LOGIC_JWT_PUBLIC_KEY",
        conflicts_with = "jwt_secret"
    )]
    pub jwt_public_key: Option<PathBuf>,
    /// `aud` a signed token must carry.
    #[arg(long, env = "HERALD_LOGIC_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// `iss` a signed token must carry.
    #[arg(long, env = "HERALD_LOGIC_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Client heartbeat interval advertised to clients, in seconds.
    #[arg(long, env = "HERALD_LOGIC_HEARTBEAT_SECS", default_value_t = 240)]
    pub heartbeat_secs: u64,
    /// Missed heartbeats before a connection is idle (idle = heartbeat × this).
    #[arg(long, env = "HERALD_LOGIC_HEARTBEAT_MAX", default_value_t = 2)]
    pub heartbeat_max: u32,
    /// Room-count aggregation interval, in milliseconds.
    #[arg(
        long,
        env = "HERALD_LOGIC_ONLINE_INTERVAL_MS",
        default_value_t = 10_000
    )]
    pub online_interval_ms: u64,
    /// Room counts older than this are ignored, in seconds.
    #[arg(long, env = "HERALD_LOGIC_ONLINE_STALE_SECS", default_value_t = 300)]
    pub online_stale_secs: u64,
    /// Largest push body, in bytes.
    #[arg(long, env = "HERALD_LOGIC_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    /// Most keys/mids/rooms in one HTTP request.
    #[arg(long, env = "HERALD_LOGIC_MAX_KEYS", default_value_t = 1000)]
    pub max_keys: usize,
    /// Longest graceful drain after shutdown, in milliseconds.
    #[arg(long, env = "HERALD_LOGIC_DRAIN_TIMEOUT_MS", default_value_t = 10_000)]
    pub drain_timeout_ms: u64,
}

/// Validated configuration; [`Args::into_config`] builds it, tests fill it in.
#[derive(Debug, Clone)]
pub struct Config {
    /// HTTP listen address (used by [`Listeners::bind`]).
    pub http_addr: SocketAddr,
    /// gRPC listen address (used by [`Listeners::bind`]).
    pub grpc_addr: SocketAddr,
    /// Redis settings.
    pub redis: store::redis::RedisConfig,
    /// Kafka settings.
    pub kafka: queue::kafka::KafkaConfig,
    /// Where the node list comes from; `None` = no nodes.
    pub node_list: Option<nodes::Source>,
    /// Kafka topic for client upstream messages (`run` only; `run_with`
    /// callers attach their own [`queue::Upstream`]).
    pub receive_topic: Option<String>,
    /// HTTP settings.
    pub http: http::HttpConfig,
    /// Token checking.
    pub token_mode: TokenMode,
    /// JWT HS256 secret (for [`TokenMode::Jwt`], or the public key below).
    pub jwt_secret: Option<String>,
    /// JWT RS256 public key file (for [`TokenMode::Jwt`]).
    pub jwt_public_key: Option<PathBuf>,
    /// Registered claims a signed token must carry.
    pub jwt_checks: token::JwtChecks,
    /// Client heartbeat, heartbeat max, staleness.
    pub service: service::Settings,
    /// Aggregation interval of room counts.
    pub online_interval: Duration,
    /// Graceful drain deadline.
    pub drain_timeout: Duration,
}

impl Args {
    /// Checks the arguments and turns them into a [`Config`].
    ///
    /// # Errors
    /// JWT mode without a secret, zero TTL/heartbeat/limits.
    pub fn into_config(self) -> Result<Config> {
        // Destructured so a new flag cannot be silently ignored.
        let Args {
            http_addr,
            grpc_addr,
            redis_url,
            redis_timeout_ms,
            kafka_brokers,
            kafka_topic,
            kafka_message_timeout_ms,
            kafka_linger_us,
            kafka_busy_linger_us,
            kafka_busy_in_flight,
            routing_ttl_secs,
            node_list,
            node_list_configmap,
            node_list_namespace,
            receive_topic,
            node_list_poll_ms,
            api_key,
            compat_status_200,
            token_mode,
            jwt_secret,
            jwt_public_key,
            jwt_audience,
            jwt_issuer,
            heartbeat_secs,
            heartbeat_max,
            online_interval_ms,
            online_stale_secs,
            max_body_bytes,
            max_keys,
            drain_timeout_ms,
        } = self;
        let config = Config {
            http_addr,
            grpc_addr,
            redis: store::redis::RedisConfig {
                url: redis_url,
                ttl: Duration::from_secs(routing_ttl_secs),
                timeout: Duration::from_millis(redis_timeout_ms),
            },
            kafka: queue::kafka::KafkaConfig {
                brokers: kafka_brokers,
                topic: kafka_topic,
                message_timeout: Duration::from_millis(kafka_message_timeout_ms),
                linger: Duration::from_micros(kafka_linger_us),
                busy_linger: Duration::from_micros(kafka_busy_linger_us),
                busy_in_flight: kafka_busy_in_flight,
            },
            node_list: nodes::Source::from_flags(
                node_list,
                node_list_configmap,
                node_list_namespace,
                Duration::from_millis(node_list_poll_ms),
            ),
            receive_topic: receive_topic.filter(|t| !t.is_empty()),
            http: http::HttpConfig {
                api_key: api_key.filter(|k| !k.is_empty()),
                compat_status_200,
                max_body: max_body_bytes,
                max_keys,
            },
            token_mode,
            jwt_secret,
            jwt_public_key,
            jwt_checks: token::JwtChecks {
                audience: jwt_audience.filter(|a| !a.is_empty()),
                issuer: jwt_issuer.filter(|i| !i.is_empty()),
            },
            service: service::Settings {
                heartbeat: Duration::from_secs(heartbeat_secs),
                heartbeat_max,
                online_stale: Duration::from_secs(online_stale_secs),
            },
            online_interval: Duration::from_millis(online_interval_ms),
            drain_timeout: Duration::from_millis(drain_timeout_ms),
        };
        config.validate()?;
        Ok(config)
    }
}

impl Config {
    /// Defaults of every flag with the given backends (for tests and embedding).
    pub fn new(redis_url: &str, kafka_brokers: &str, kafka_topic: &str) -> Self {
        let any: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0));
        Config {
            http_addr: any,
            grpc_addr: any,
            redis: store::redis::RedisConfig {
                url: redis_url.to_owned(),
                ttl: Duration::from_secs(1800),
                timeout: Duration::from_secs(1),
            },
            kafka: queue::kafka::KafkaConfig {
                brokers: kafka_brokers.to_owned(),
                topic: kafka_topic.to_owned(),
                message_timeout: Duration::from_secs(5),
                linger: Duration::ZERO,
                busy_linger: Duration::from_millis(1),
                busy_in_flight: 8,
            },
            node_list: None,
            receive_topic: None,
            http: http::HttpConfig {
                api_key: None,
                compat_status_200: false,
                max_body: 64 * 1024,
                max_keys: 1000,
            },
            token_mode: TokenMode::Goim,
            jwt_secret: None,
            jwt_public_key: None,
            jwt_checks: token::JwtChecks::default(),
            service: service::Settings {
                heartbeat: Duration::from_secs(240),
                heartbeat_max: 2,
                online_stale: Duration::from_secs(300),
            },
            online_interval: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
        }
    }

    /// Rejects settings that cannot work.
    ///
    /// # Errors
    /// The first problem found.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(m.to_owned()));
        let has_secret = self.jwt_secret.as_deref().is_some_and(|s| !s.is_empty());
        if self.token_mode == TokenMode::Jwt && has_secret == self.jwt_public_key.is_some() {
            return bad("--token-mode jwt needs exactly one of --jwt-secret and --jwt-public-key");
        }
        if self.redis.ttl.as_secs() == 0 {
            return bad("routing TTL must be at least 1 second");
        }
        if self.service.heartbeat.is_zero() || self.service.heartbeat_max == 0 {
            return bad("heartbeat and heartbeat max must be non-zero");
        }
        if self.http.max_body == 0 || self.http.max_keys == 0 {
            return bad("body and key limits must be non-zero");
        }
        let poll_zero =
            matches!(&self.node_list, Some(nodes::Source::File { poll, .. }) if poll.is_zero());
        if self.online_interval.is_zero() || poll_zero {
            return bad("intervals must be non-zero");
        }
        if self.redis.timeout.is_zero() || self.kafka.message_timeout.is_zero() {
            return bad("timeouts must be non-zero");
        }
        // Past a second the linger is surely a unit mistake (µs given as ms),
        // and it would hold every lone push that long.
        if self.kafka.linger > Duration::from_secs(1) {
            return bad("--kafka-linger-us must be at most 1,000,000 (one second)");
        }
        if self.kafka.busy_linger > Duration::from_secs(1) {
            return bad("--kafka-busy-linger-us must be at most 1,000,000 (one second)");
        }
        if self.kafka.busy_in_flight == 0 {
            return bad("--kafka-busy-in-flight must be at least 1");
        }
        Ok(())
    }
}

/// The bound sockets `run` serves on.
#[derive(Debug)]
pub struct Listeners {
    /// HTTP push API.
    pub http: TcpListener,
    /// gRPC.
    pub grpc: TcpListener,
}

impl Listeners {
    /// Binds both addresses.
    ///
    /// # Errors
    /// Either bind failing.
    pub async fn bind(http: SocketAddr, grpc: SocketAddr) -> Result<Self> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Bind { addr, source })
        };
        Ok(Listeners {
            http: bind(http).await?,
            grpc: bind(grpc).await?,
        })
    }
}

/// Serves the HTTP API and gRPC on Redis and Kafka until `shutdown`
/// resolves, then drains for at most `config.drain_timeout`.
///
/// Redis and Kafka are connected lazily: logic starts while they are down and
/// answers 503 / `Unavailable` until they are back.
///
/// # Errors
/// Invalid config, unreadable node list, or a server failing.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    config.validate()?;
    let store = Arc::new(store::redis::RedisStore::new(config.redis.clone())?);
    let queue = Arc::new(queue::kafka::KafkaQueue::new(config.kafka.clone())?);
    let upstream = match &config.receive_topic {
        Some(topic) => Some(
            Arc::new(queue::kafka::KafkaQueue::new(queue::kafka::KafkaConfig {
                topic: topic.clone(),
                ..config.kafka.clone()
            })?) as Arc<dyn queue::Upstream>,
        ),
        None => None,
    };
    serve(config, store, queue, upstream, listeners, shutdown).await
}

/// [`run`] on the given backends; `herald standalone` passes
/// [`store::memory::MemoryStore`] and [`queue::memory::MemoryQueue`].
/// `config.redis` and `config.kafka` are ignored except `redis.ttl`, which
/// the caller is expected to have used to build the store.
///
/// # Errors
/// Invalid config, unreadable node list, or a server failing.
pub async fn run_with(
    config: Config,
    store: Arc<dyn store::SessionStore>,
    queue: Arc<dyn queue::PushQueue>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    serve(config, store, queue, None, listeners, shutdown).await
}

async fn serve(
    config: Config,
    store: Arc<dyn store::SessionStore>,
    queue: Arc<dyn queue::PushQueue>,
    upstream: Option<Arc<dyn queue::Upstream>>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    config.validate()?;
    let Config {
        http_addr: _,
        grpc_addr: _,
        redis: _,
        kafka: _,
        node_list,
        receive_topic: _,
        http: http_config,
        token_mode,
        jwt_secret,
        jwt_public_key,
        jwt_checks,
        service: settings,
        online_interval,
        drain_timeout,
    } = config;

    let nodes = match &node_list {
        Some(source) => nodes::Nodes::new(source.initial()?),
        None => nodes::Nodes::default(),
    };
    let verifier = match token_mode {
        TokenMode::Goim => token::Verifier::goim(),
        TokenMode::Jwt => match &jwt_public_key {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    Error::Config(format!("reading --jwt-public-key {}: {e}", path.display()))
                })?;
                token::Verifier::rs256(&pem, &jwt_checks).map_err(|e| {
                    Error::Config(format!("--jwt-public-key {}: {e}", path.display()))
                })?
            }
            None => token::Verifier::hs256(jwt_secret.unwrap_or_default().as_bytes(), &jwt_checks),
        },
    };
    if http_config.api_key.is_none() {
        tracing::warn!(
            "HTTP push API has NO authentication: anyone who can reach it can push to every client; set --api-key"
        );
    }
    let mut service = service::Service::new(store, queue, nodes.clone(), verifier, settings);
    if let Some(upstream) = upstream {
        service = service.with_upstream(upstream);
    }
    let service = Arc::new(service);
    let initial = nodes.get();
    service
        .metrics()
        .node_list(initial.generation, initial.nodes.len());

    // One shutdown signal fanned out to every task.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut background = Vec::new();
    background.push(tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    }));
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    background.push(tokio::spawn(
        service::aggregate_online(service.clone(), online_interval, stop_rx.clone())
            .instrument(tracing::info_span!("online_aggregation")),
    ));
    if let Some(source) = node_list {
        let service = service.clone();
        let apply = move |list: nodes::NodeList| {
            service
                .metrics()
                .node_list(list.generation, list.nodes.len());
            nodes.set(list);
        };
        background.push(tokio::spawn(
            source
                .watch(apply, stopped(stop_rx.clone()))
                .instrument(tracing::info_span!("node_list")),
        ));
    }

    let http_addr = listeners.http.local_addr().ok();
    let grpc_addr = listeners.grpc.local_addr().ok();
    tracing::info!(?http_addr, ?grpc_addr, "logic listening");

    let app = http::router(service.clone(), http_config);
    // Without TCP_NODELAY a response split over two writes waits for the
    // client's delayed ACK; pushes are latency-bound, never bulk.
    let http_listener = axum::serve::ListenerExt::tap_io(listeners.http, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let http_server =
        axum::serve(http_listener, app).with_graceful_shutdown(stopped(stop_rx.clone()));
    let http_server = async move { http_server.await.map_err(Error::Http) }
        .instrument(tracing::info_span!("http"));
    let grpc_server = tonic::transport::Server::builder()
        .add_service(grpc::LogicGrpc::server(service))
        .serve_with_incoming_shutdown(
            tokio_stream::StreamExt::map(
                tokio_stream::wrappers::TcpListenerStream::new(listeners.grpc),
                |stream| {
                    stream.inspect(|tcp| {
                        let _ = tcp.set_nodelay(true);
                    })
                },
            ),
            stopped(stop_rx.clone()),
        );
    let grpc_server = async move { grpc_server.await.map_err(Error::Grpc) }
        .instrument(tracing::info_span!("grpc"));

    let servers = async { tokio::try_join!(http_server, grpc_server).map(|_| ()) };
    let deadline = async {
        stopped(stop_rx.clone()).await;
        tokio::time::sleep(drain_timeout).await;
    };
    let result = tokio::select! {
        res = servers => res,
        () = deadline => {
            tracing::warn!(?drain_timeout, "drain deadline passed; closing remaining connections");
            Ok(())
        }
    };
    // Also when a server failed without a shutdown: nothing outlives `run`.
    for task in background {
        task.abort();
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(argv: &[&str]) -> Result<Config> {
        let mut full = vec!["logic"];
        full.extend_from_slice(argv);
        Cli::try_parse_from(full).unwrap().args.into_config()
    }

    #[test]
    fn defaults_follow_the_spec() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.http_addr.port(), 3111);
        assert_eq!(c.grpc_addr.port(), 3119);
        assert_eq!(c.kafka.topic, "goim-push-topic");
        assert_eq!(c.redis.ttl, Duration::from_secs(1800));
        assert_eq!(
            c.service.heartbeat * c.service.heartbeat_max,
            Duration::from_secs(480)
        );
        assert_eq!(c.online_interval, Duration::from_secs(10));
        assert_eq!(c.http.max_body, 64 * 1024);
        assert_eq!(c.token_mode, TokenMode::Goim);
        assert_eq!(c.kafka.linger, Duration::ZERO);
        assert_eq!(c.kafka.busy_linger, Duration::from_millis(1));
        assert_eq!(c.kafka.busy_in_flight, 8);
        assert!(c.http.api_key.is_none() && !c.http.compat_status_200);
    }

    #[test]
    fn invalid_combinations_are_rejected() {
        assert!(matches!(
            parse(&["--token-mode", "jwt"]),
            Err(Error::Config(_))
        ));
        assert!(parse(&["--token-mode", "jwt", "--jwt-secret", "s"]).is_ok());
        assert!(parse(&["--token-mode", "jwt", "--jwt-public-key", "/k.pem"]).is_ok());
        assert!(parse(&["--routing-ttl-secs", "0"]).is_err());
        assert!(parse(&["--max-keys", "0"]).is_err());
        assert!(parse(&["--kafka-linger-us", "1000001"]).is_err());
        let c = parse(&["--kafka-linger-us", "500"]).unwrap();
        assert_eq!(c.kafka.linger, Duration::from_micros(500));
        assert!(parse(&["--kafka-busy-linger-us", "1000001"]).is_err());
        assert!(parse(&["--kafka-busy-in-flight", "0"]).is_err());
        let c = parse(&["--kafka-busy-linger-us", "0", "--kafka-busy-in-flight", "3"]).unwrap();
        assert_eq!(c.kafka.busy_linger, Duration::ZERO);
        assert_eq!(c.kafka.busy_in_flight, 3);
        let c = parse(&["--api-key", "", "--compat-status-200"]).unwrap();
        assert!(c.http.api_key.is_none() && c.http.compat_status_200);
    }
}
