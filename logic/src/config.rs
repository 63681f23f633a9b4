//! `herald logic`'s flags ([`Args`]) and the validated [`Config`] they
//! become. Each default is written once, on its flag; [`Config::new`] starts
//! from those same defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use herald_runtime::contract;
use herald_runtime::{grpc_auth, kafka_security, nodes};

use crate::http::client::ClientAuth;
use crate::{Error, Result, TokenMode, http, queue, service, store, token};

/// `--client-addr`: an address, or `none` (or empty) for no client listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionalAddr(pub Option<SocketAddr>);

impl std::str::FromStr for OptionalAddr {
    type Err = std::net::AddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "" | "none" => Ok(Self(None)),
            addr => addr.parse().map(|a| Self(Some(a))),
        }
    }
}

/// How client tokens are checked: `herald logic`'s flags, also flattened
/// into `herald standalone`'s so both check tokens the same way.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientTokenArgs {
    /// How client tokens are checked.
    #[arg(
        long,
        env = contract::TOKEN_MODE,
        value_enum,
        default_value = "goim"
    )]
    pub token_mode: TokenMode,
    /// HS256 secret for `--token-mode jwt`.
    #[arg(long, env = contract::JWT_SECRET, hide_env_values = true)]
    pub jwt_secret: Option<herald_runtime::Secret>,
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
}

impl ClientTokenArgs {
    /// Sets `config`'s token checking from these flags; [`Config::validate`]
    /// then checks that JWT mode has its key.
    pub fn apply(self, config: &mut Config) {
        // Destructured so a new flag cannot be silently ignored.
        let ClientTokenArgs {
            token_mode,
            jwt_secret,
            jwt_public_key,
            jwt_audience,
            jwt_issuer,
        } = self;
        config.token_mode = token_mode;
        config.jwt_secret = jwt_secret;
        config.jwt_public_key = jwt_public_key;
        config.jwt_checks = token::JwtChecks {
            audience: jwt_audience.filter(|a| !a.is_empty()),
            issuer: jwt_issuer.filter(|i| !i.is_empty()),
        };
    }
}

/// `herald logic` command-line arguments, each with an environment fallback.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// HTTP push API listen address.
    #[arg(long, env = "HERALD_LOGIC_HTTP_ADDR", default_value = "0.0.0.0:3111")]
    pub http_addr: SocketAddr,
    /// gRPC (`goim.logic.Logic`) listen address.
    #[arg(long, env = "HERALD_LOGIC_GRPC_ADDR", default_value = "0.0.0.0:3119")]
    pub grpc_addr: SocketAddr,
    /// Client-facing HTTP listen address (e.g. `0.0.0.0:3112`, the port the
    /// operator uses): only `GET /goim/nodes/weighted` and
    /// `GET /goim/online/room`, with CORS and never the API key. `none`: no
    /// client listener (a fixed default port would collide wherever several
    /// logic processes share a host).
    #[arg(long, env = "HERALD_LOGIC_CLIENT_ADDR", default_value = "none")]
    pub client_addr: OptionalAddr,
    /// Who may call the client listener: `none` (anyone) or `token` (a
    /// client token as `Authorization: Bearer`, checked like a connect token).
    #[arg(
        long,
        env = "HERALD_LOGIC_CLIENT_AUTH",
        value_enum,
        default_value = "none"
    )]
    pub client_auth: ClientAuth,
    /// Redis URL for routes and room counts: `redis://host:port/db`, or
    /// `rediss://` for TLS; may carry `user:password@`.
    #[arg(
        long,
        env = contract::REDIS_URL,
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// Redis ACL user name (replaces one in the URL).
    #[arg(long, env = contract::REDIS_USERNAME)]
    pub redis_username: Option<String>,
    /// Redis password (replaces one in the URL); best given by its
    /// environment variable, from a Secret.
    #[arg(long, env = contract::REDIS_PASSWORD, hide_env_values = true)]
    pub redis_password: Option<String>,
    /// PEM file of the CA(s) that sign the Redis server's certificate, for a
    /// `rediss://` URL; without it the system's trusted CAs are used.
    #[arg(long, env = contract::REDIS_CA_FILE)]
    pub redis_ca_file: Option<PathBuf>,
    /// Deadline for one Redis command, in milliseconds.
    #[arg(long, env = "HERALD_REDIS_TIMEOUT_MS", default_value_t = 1000)]
    pub redis_timeout_ms: u64,
    /// Kafka bootstrap brokers, comma-separated.
    #[arg(long, env = contract::KAFKA_BROKERS, default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// Kafka push topic.
    #[arg(long, env = contract::KAFKA_TOPIC, default_value = "goim-push-topic")]
    pub kafka_topic: String,
    /// TLS and SASL to the brokers.
    #[command(flatten)]
    pub kafka_security: kafka_security::KafkaSecurityArgs,
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
    /// Where the node list comes from.
    #[command(flatten)]
    pub node_list: nodes::SourceArgs,
    /// Kafka topic for client upstream messages (`Receive`); none = logged only.
    #[arg(long, env = "HERALD_LOGIC_RECEIVE_TOPIC")]
    pub receive_topic: Option<String>,
    /// API key required as `Authorization: Bearer <key>` on the HTTP API.
    #[arg(long, env = contract::API_KEY, hide_env_values = true)]
    pub api_key: Option<herald_runtime::Secret>,
    /// Answer HTTP 200 always (goim behaviour), outcome only in `code`.
    #[arg(long, env = "HERALD_LOGIC_COMPAT_STATUS_200")]
    pub compat_status_200: bool,
    /// How client tokens are checked.
    #[command(flatten)]
    pub tokens: ClientTokenArgs,
    /// Client heartbeat interval advertised to clients, in seconds.
    #[arg(long, env = contract::HEARTBEAT_SECS, default_value_t = 240)]
    pub heartbeat_secs: u64,
    /// Missed heartbeats before a connection is idle (idle = heartbeat × this).
    #[arg(long, env = "HERALD_LOGIC_HEARTBEAT_MAX", default_value_t = 2)]
    pub heartbeat_max: u32,
    /// Host name the node answer gives web clients (`domain` in
    /// `/goim/nodes/weighted`); empty gives none.
    #[arg(long, env = contract::NODE_DOMAIN, default_value = "")]
    pub node_domain: String,
    /// Most addresses one node answer lists.
    #[arg(long, env = contract::NODE_COUNT, default_value_t = herald_protocol::nodes::DEFAULT_PICKED)]
    pub node_count: usize,
    /// Reconnect back-off advertised to clients (`backoff.base_delay`), in seconds.
    #[arg(long, env = contract::NODE_BACKOFF_SECS, default_value_t = 3)]
    pub node_backoff_secs: u32,
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
    /// The shared token comets must send on the gRPC port.
    #[command(flatten)]
    pub grpc_token: grpc_auth::TokenArgs,
    /// Deadlines and connection cap of the HTTP listeners.
    #[command(flatten)]
    pub http_limits: herald_runtime::http::LimitsArgs,
}

/// Validated configuration; [`Args::into_config`] builds it, tests fill it in.
#[derive(Debug, Clone)]
pub struct Config {
    /// HTTP listen address (used by [`Listeners::bind`]).
    pub http_addr: SocketAddr,
    /// gRPC listen address (used by [`Listeners::bind`]).
    pub grpc_addr: SocketAddr,
    /// Client listener address (used by [`Listeners::bind`]); `None` = off.
    pub client_addr: Option<SocketAddr>,
    /// Authentication on the client listener.
    pub client_auth: ClientAuth,
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
    pub jwt_secret: Option<herald_runtime::Secret>,
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
    /// The shared token the gRPC port requires (off: none).
    pub grpc_token: grpc_auth::TokenSource,
    /// Deadlines and connection cap of the HTTP push API (`/metrics` included).
    pub http_limits: herald_runtime::http::Limits,
    /// The same for the client listener (its own cap: `herald standalone`
    /// gives the two listeners different shares of its descriptors).
    pub client_limits: herald_runtime::http::Limits,
}

impl Args {
    /// Checks the arguments and turns them into a [`Config`].
    ///
    /// # Errors
    /// JWT mode without a secret, zero TTL/heartbeat/limits.
    pub fn into_config(self) -> Result<Config> {
        let config = self.convert();
        config.validate()?;
        Ok(config)
    }

    /// The configuration these arguments say, unchecked.
    fn convert(self) -> Config {
        // Destructured so a new flag cannot be silently ignored.
        let Args {
            http_addr,
            grpc_addr,
            client_addr,
            client_auth,
            redis_url,
            redis_username,
            redis_password,
            redis_ca_file,
            redis_timeout_ms,
            kafka_brokers,
            kafka_topic,
            kafka_security,
            kafka_message_timeout_ms,
            kafka_linger_us,
            kafka_busy_linger_us,
            kafka_busy_in_flight,
            routing_ttl_secs,
            node_list,
            receive_topic,
            api_key,
            compat_status_200,
            tokens,
            heartbeat_secs,
            heartbeat_max,
            node_domain,
            node_count,
            node_backoff_secs,
            online_interval_ms,
            online_stale_secs,
            max_body_bytes,
            max_keys,
            drain_timeout_ms,
            grpc_token,
            http_limits,
        } = self;
        let mut config = Config {
            http_addr,
            grpc_addr,
            client_addr: client_addr.0,
            client_auth,
            redis: store::redis::RedisConfig {
                url: redis_url,
                username: redis_username.filter(|u| !u.is_empty()),
                password: redis_password.filter(|p| !p.is_empty()),
                ca_file: redis_ca_file.filter(|p| !p.as_os_str().is_empty()),
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
                security: kafka_security.security(),
            },
            node_list: node_list.source(),
            receive_topic: receive_topic.filter(|t| !t.is_empty()),
            http: http::HttpConfig {
                api_key: api_key.filter(|k| !k.is_empty()),
                compat_status_200,
                max_body: max_body_bytes,
                max_keys,
            },
            // Set by `tokens` below.
            token_mode: TokenMode::Goim,
            jwt_secret: None,
            jwt_public_key: None,
            jwt_checks: token::JwtChecks::default(),
            service: service::Settings {
                heartbeat: Duration::from_secs(heartbeat_secs),
                heartbeat_max,
                node_domain,
                node_count,
                node_backoff: Duration::from_secs(u64::from(node_backoff_secs)),
                online_stale: Duration::from_secs(online_stale_secs),
            },
            online_interval: Duration::from_millis(online_interval_ms),
            drain_timeout: Duration::from_millis(drain_timeout_ms),
            grpc_token: grpc_token.source(),
            http_limits: http_limits.limits(),
            client_limits: http_limits.limits(),
        };
        tokens.apply(&mut config);
        config
    }
}

impl Config {
    /// Defaults of every flag with the given backends (for tests and embedding).
    pub fn new(redis_url: &str, kafka_brokers: &str, kafka_topic: &str) -> Self {
        let mut args: Args = herald_runtime::args::defaults();
        args.redis_url = redis_url.to_owned();
        args.kafka_brokers = kafka_brokers.to_owned();
        args.kafka_topic = kafka_topic.to_owned();
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        (args.http_addr, args.grpc_addr) = (loopback, loopback);
        args.convert()
    }

    /// Rejects settings that cannot work.
    ///
    /// # Errors
    /// The first problem found.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(m.to_owned()));
        let has_secret = self.jwt_secret.as_ref().is_some_and(|s| !s.is_empty());
        if self.token_mode == TokenMode::Jwt && has_secret == self.jwt_public_key.is_some() {
            return bad("--token-mode jwt needs exactly one of --jwt-secret and --jwt-public-key");
        }
        if self.redis.ttl.as_secs() == 0 {
            return bad("routing TTL must be at least 1 second");
        }
        if self.service.heartbeat.is_zero() || self.service.heartbeat_max == 0 {
            return bad("heartbeat and heartbeat max must be non-zero");
        }
        if self.service.node_count == 0 {
            return bad("--node-count must be at least 1");
        }
        if self.http.max_body == 0 || self.http.max_keys == 0 {
            return bad("body and key limits must be non-zero");
        }
        self.http_limits.validate().map_err(Error::Config)?;
        self.client_limits.validate().map_err(Error::Config)?;
        let poll_zero = self
            .node_list
            .as_ref()
            .is_some_and(nodes::Source::polls_zero);
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
        self.kafka.security.validate().map_err(Error::Config)?;
        if self.redis.ca_file.is_some() && !self.redis.url.starts_with("rediss://") {
            return bad("--redis-ca-file needs a rediss:// (TLS) --redis-url");
        }
        // The client listener must never be the privileged API's socket.
        let shared = |other: SocketAddr| {
            self.client_addr
                .is_some_and(|c| c.port() != 0 && c.port() == other.port() && c.ip() == other.ip())
        };
        if shared(self.http_addr) || shared(self.grpc_addr) {
            return bad("--client-addr must differ from --http-addr and --grpc-addr");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<Config> {
        herald_runtime::args::parse::<Args>(argv)
            .unwrap()
            .into_config()
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
        assert_eq!(c.client_addr, None);
        assert_eq!(c.client_auth, ClientAuth::None);
        let limits = herald_runtime::http::Limits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
        };
        assert_eq!((c.http_limits, c.client_limits), (limits, limits));
    }

    #[test]
    fn http_limit_flags() {
        let c = parse(&[
            "--http-header-timeout-ms",
            "1500",
            "--http-body-timeout-ms",
            "2500",
            "--http-idle-timeout-ms",
            "3500",
            "--http-max-connections",
            "7",
        ])
        .unwrap();
        assert_eq!(c.http_limits.header_timeout, Duration::from_millis(1500));
        assert_eq!(c.http_limits.body_timeout, Duration::from_millis(2500));
        assert_eq!(c.http_limits.idle_timeout, Duration::from_millis(3500));
        assert_eq!(c.client_limits.max_connections, 7);
        for zero in [
            "--http-header-timeout-ms",
            "--http-body-timeout-ms",
            "--http-idle-timeout-ms",
            "--http-max-connections",
        ] {
            assert!(parse(&[zero, "0"]).is_err(), "{zero} 0");
        }
    }

    #[test]
    fn client_listener_flags() {
        let c = parse(&["--client-addr", "127.0.0.1:4112", "--client-auth", "token"]).unwrap();
        assert_eq!(
            c.client_addr,
            Some(SocketAddr::from(([127, 0, 0, 1], 4112)))
        );
        assert_eq!(c.client_auth, ClientAuth::Token);
        let c = parse(&["--client-addr", "0.0.0.0:3112"]).unwrap();
        assert_eq!(c.client_addr, Some(SocketAddr::from(([0, 0, 0, 0], 3112))));
        for off in ["none", ""] {
            assert_eq!(parse(&["--client-addr", off]).unwrap().client_addr, None);
        }
        assert!(herald_runtime::args::parse::<Args>(&["--client-addr", "nowhere"]).is_err());
        assert!(parse(&["--client-addr", "0.0.0.0:3111"]).is_err());
        assert!(herald_runtime::args::parse::<Args>(&["--client-auth", "apikey"]).is_err());
    }

    #[test]
    fn config_new_starts_from_the_flag_defaults() {
        let mut parsed = parse(&["--redis-url", "redis://r", "--kafka-brokers", "k:1"]).unwrap();
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        (parsed.http_addr, parsed.grpc_addr) = (loopback, loopback);
        let new = Config::new("redis://r", "k:1", "goim-push-topic");
        assert_eq!(format!("{new:?}"), format!("{parsed:?}"));
    }

    #[test]
    fn node_answer_settings_are_flags() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.service.node_domain, "");
        assert_eq!(c.service.node_count, 5);
        assert_eq!(c.service.node_backoff, Duration::from_secs(3));
        let c = parse(&[
            "--node-domain",
            "push.example.com",
            "--node-count",
            "2",
            "--node-backoff-secs",
            "7",
        ])
        .unwrap();
        assert_eq!(c.service.node_domain, "push.example.com");
        assert_eq!(c.service.node_count, 2);
        assert_eq!(c.service.node_backoff, Duration::from_secs(7));
        assert!(parse(&["--node-count", "0"]).is_err());
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
        assert!(parse(&["--redis-ca-file", "/ca.pem"]).is_err());
        let c = parse(&[
            "--redis-url",
            "rediss://r:6380/",
            "--redis-ca-file",
            "/ca.pem",
            "--redis-username",
            "u",
            "--redis-password",
            "secret-pw",
        ])
        .unwrap();
        assert_eq!(c.redis.username.as_deref(), Some("u"));
        assert!(!format!("{c:?}").contains("secret-pw"), "password in Debug");
        assert!(parse(&["--kafka-security-protocol", "SASL_SSL"]).is_err());
        let c = parse(&["--api-key", "", "--compat-status-200"]).unwrap();
        assert!(c.http.api_key.is_none() && c.http.compat_status_200);
    }
}
