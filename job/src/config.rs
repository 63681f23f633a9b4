//! `herald job`'s flags ([`Args`]) and the [`Config`] they become. Each
//! default is written once, on its flag; [`Config::new`] starts from those
//! same defaults.

use std::net::SocketAddr;
use std::time::Duration;

use herald_runtime::{contract, kafka_security, nodes};

use crate::{CallSettings, Error, Result};

/// A comet given on the command line: `NAME=HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticComet {
    /// Server id (as in PUSH records).
    pub name: String,
    /// gRPC `host:port` or URI.
    pub grpc: String,
}

impl std::str::FromStr for StaticComet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((name, grpc)) if !name.is_empty() && !grpc.is_empty() => Ok(StaticComet {
                name: name.to_owned(),
                grpc: grpc.to_owned(),
            }),
            _ => Err(format!("expected NAME=HOST:PORT, got {s:?}")),
        }
    }
}

/// `herald job` command-line arguments, each with an environment fallback.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Kafka bootstrap brokers, comma-separated.
    #[arg(long, env = contract::KAFKA_BROKERS, default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// Kafka push topic.
    #[arg(long, env = contract::KAFKA_TOPIC, default_value = "goim-push-topic")]
    pub kafka_topic: String,
    /// Kafka consumer group.
    #[arg(long, env = contract::JOB_GROUP, default_value = "goim-push-group-job")]
    pub kafka_group: String,
    /// How long the group waits for a silent job (killed, frozen) before
    /// giving its partitions to another, in milliseconds. librdkafka's 45 s
    /// default would stall a restarted job that long.
    #[arg(long, env = "HERALD_JOB_SESSION_TIMEOUT_MS", default_value_t = 10_000)]
    pub kafka_session_timeout_ms: u64,
    /// TLS and SASL to the brokers (the consumer and the dead-letter producer).
    #[command(flatten)]
    pub kafka_security: kafka_security::KafkaSecurityArgs,
    /// Where the node list comes from; every node in it gets pushes.
    #[command(flatten)]
    pub node_list: nodes::SourceArgs,
    /// A comet as `NAME=HOST:PORT` (repeatable), besides the node list.
    #[arg(long = "comet", env = "HERALD_JOB_COMETS", value_delimiter = ',')]
    pub comets: Vec<StaticComet>,
    /// Deadline of one call to a comet, in milliseconds.
    #[arg(long, env = "HERALD_JOB_CALL_TIMEOUT_MS", default_value_t = 3000)]
    pub call_timeout_ms: u64,
    /// Attempts on `Unavailable` before checking the comet is still listed.
    #[arg(long, env = "HERALD_JOB_RETRY_ATTEMPTS", default_value_t = 5)]
    pub retry_attempts: u32,
    /// First retry delay, in milliseconds (doubles, capped at 5 s).
    #[arg(long, env = "HERALD_JOB_RETRY_BACKOFF_MS", default_value_t = 100)]
    pub retry_backoff_ms: u64,
    /// Most frames in one room batch, and most single-key pushes in one
    /// `PushMsgs` batch to a Herald comet.
    #[arg(long, env = "HERALD_JOB_BATCH_FRAMES", default_value_t = 20)]
    pub batch_frames: usize,
    /// Most bytes in one room or push batch.
    #[arg(long, env = "HERALD_JOB_BATCH_BYTES", default_value_t = 64 * 1024)]
    pub batch_bytes: usize,
    /// Most unfinished calls per failing comet; more are dropped and
    /// counted, so an unreachable comet cannot take every in-flight slot.
    #[arg(long, env = "HERALD_JOB_COMET_QUEUE_LIMIT", default_value_t = 500)]
    pub comet_queue_limit: usize,
    /// Most records being delivered at once.
    #[arg(long, env = "HERALD_JOB_MAX_IN_FLIGHT", default_value_t = 1000)]
    pub max_in_flight: usize,
    /// Longest wait for in-flight records at shutdown, in milliseconds.
    #[arg(long, env = "HERALD_JOB_DRAIN_TIMEOUT_MS", default_value_t = 5000)]
    pub drain_timeout_ms: u64,
    /// Admin HTTP address: `/metrics`, `/healthz`, `/readyz`.
    #[arg(long, env = "HERALD_JOB_HTTP_ADDR", default_value = "0.0.0.0:3193")]
    pub http_addr: SocketAddr,
    /// Topic that poison records are copied to (with the reason and their
    /// source in headers); without it they are only skipped and counted.
    #[arg(long, env = "HERALD_JOB_DEAD_LETTER_TOPIC")]
    pub dead_letter_topic: Option<String>,
    /// Records larger than this are poison (`oversized`): comets and
    /// clients refuse frames past 1 MiB anyway.
    #[arg(long, env = "HERALD_JOB_MAX_RECORD_BYTES", default_value_t = MAX_RECORD_BYTES)]
    pub max_record_bytes: usize,
    /// How often each comet's `Rooms` is polled so room pushes skip comets
    /// without members, in milliseconds; 0 sends every room push to every
    /// comet.
    #[arg(long, env = "HERALD_JOB_ROOMS_POLL_MS", default_value_t = 1000)]
    pub rooms_poll_ms: u64,
    /// The shared token sent on every call to a comet.
    #[command(flatten)]
    pub grpc_token: herald_runtime::grpc_auth::TokenArgs,
}

/// Default [`Args::max_record_bytes`]: a frame of this body plus its header
/// is the largest a client reader accepts
/// ([`herald_protocol::frame::DEFAULT_MAX_OUTBOUND_PACK_LEN`]).
pub const MAX_RECORD_BYTES: usize =
    herald_protocol::frame::DEFAULT_MAX_OUTBOUND_PACK_LEN - herald_protocol::frame::HEADER_LEN;

/// Kafka consumer settings.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// Bootstrap brokers.
    pub brokers: String,
    /// Push topic.
    pub topic: String,
    /// Consumer group.
    pub group: String,
    /// Group session timeout.
    pub session_timeout: Duration,
    /// TLS and SASL (shared with logic, `herald_runtime::kafka_security`).
    pub security: kafka_security::KafkaSecurity,
}

/// What job runs with; built from [`Args`], or directly by tests.
#[derive(Debug, Clone)]
pub struct Config {
    /// Kafka settings (unused by [`crate::run_channel`]).
    pub kafka: KafkaConfig,
    /// Where the node list comes from; `None` = static comets only.
    pub node_list: Option<nodes::Source>,
    /// Comets always pushed to, besides the node list.
    pub comets: Vec<StaticComet>,
    /// Comet call settings.
    pub calls: CallSettings,
    /// Most records in flight.
    pub max_in_flight: usize,
    /// Shutdown grace for in-flight records.
    pub drain_timeout: Duration,
    /// Admin HTTP address (used by [`crate::Listeners::bind`]).
    pub http_addr: SocketAddr,
    /// Where poison records go; `None` skips them.
    pub dead_letter_topic: Option<String>,
    /// Largest record value delivered.
    pub max_record_bytes: usize,
    /// `Rooms` poll interval; `None` sends room pushes to every comet.
    pub rooms_poll: Option<Duration>,
    /// The shared token comets' gRPC ports require (off: none sent).
    pub grpc_token: herald_runtime::grpc_auth::TokenSource,
}

impl Args {
    /// Checks the arguments and turns them into a [`Config`].
    ///
    /// # Errors
    /// Zero limits or timeouts.
    pub fn into_config(self) -> Result<Config> {
        let config = self.convert();
        config.validate()?;
        Ok(config)
    }

    /// The configuration these arguments say, unchecked.
    fn convert(self) -> Config {
        // Destructured so a new flag cannot be silently ignored.
        let Args {
            kafka_brokers,
            kafka_topic,
            kafka_group,
            kafka_session_timeout_ms,
            kafka_security,
            node_list,
            comets,
            call_timeout_ms,
            retry_attempts,
            retry_backoff_ms,
            batch_frames,
            batch_bytes,
            comet_queue_limit,
            max_in_flight,
            drain_timeout_ms,
            http_addr,
            dead_letter_topic,
            max_record_bytes,
            rooms_poll_ms,
            grpc_token,
        } = self;
        Config {
            kafka: KafkaConfig {
                brokers: kafka_brokers,
                topic: kafka_topic,
                group: kafka_group,
                session_timeout: Duration::from_millis(kafka_session_timeout_ms),
                security: kafka_security.security(),
            },
            node_list: node_list.source(),
            comets,
            calls: CallSettings {
                timeout: Duration::from_millis(call_timeout_ms),
                attempts: retry_attempts,
                backoff: Duration::from_millis(retry_backoff_ms),
                backoff_max: RETRY_BACKOFF_MAX,
                batch_frames,
                batch_bytes,
                max_queued: comet_queue_limit,
            },
            max_in_flight,
            drain_timeout: Duration::from_millis(drain_timeout_ms),
            http_addr,
            dead_letter_topic: dead_letter_topic.filter(|t| !t.is_empty()),
            max_record_bytes,
            rooms_poll: (rooms_poll_ms > 0).then(|| Duration::from_millis(rooms_poll_ms)),
            grpc_token: grpc_token.source(),
        }
    }
}

/// The longest wait between retries of one comet call, however many failed.
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);

impl Config {
    /// Defaults of every flag with the given Kafka settings and no comets.
    pub fn new(brokers: &str, topic: &str, group: &str) -> Config {
        let mut args: Args = herald_runtime::args::defaults();
        args.kafka_brokers = brokers.to_owned();
        args.kafka_topic = topic.to_owned();
        args.kafka_group = group.to_owned();
        args.convert()
    }

    /// Rejects settings that cannot work.
    ///
    /// # Errors
    /// The first problem found.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(m.to_owned()));
        let poll_zero = self
            .node_list
            .as_ref()
            .is_some_and(nodes::Source::polls_zero);
        if self.calls.timeout.is_zero() || poll_zero || self.kafka.session_timeout.is_zero() {
            return bad("timeouts and intervals must be non-zero");
        }
        if self.calls.attempts == 0
            || self.calls.batch_frames == 0
            || self.calls.batch_bytes == 0
            || self.calls.max_queued == 0
        {
            return bad("retry attempts and batch limits must be non-zero");
        }
        if self.max_in_flight == 0 || self.max_record_bytes == 0 {
            return bad("max in flight and max record bytes must be non-zero");
        }
        if self.rooms_poll.is_some_and(|d| d.is_zero()) {
            return bad("the rooms poll interval must be non-zero (None turns polling off)");
        }
        if self.dead_letter_topic.as_ref() == Some(&self.kafka.topic) {
            return bad("the dead-letter topic must differ from the push topic");
        }
        self.kafka.security.validate().map_err(Error::Config)?;
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
    fn config_new_starts_from_the_flag_defaults() {
        let parsed = parse(&["--kafka-brokers", "k:1", "--kafka-group", "g"]).unwrap();
        let new = Config::new("k:1", "goim-push-topic", "g");
        assert_eq!(format!("{new:?}"), format!("{parsed:?}"));
    }

    #[test]
    fn defaults_follow_the_spec() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.kafka.topic, "goim-push-topic");
        assert_eq!(c.kafka.group, "goim-push-group-job");
        assert_eq!(c.calls.batch_frames, 20);
        assert!(c.comets.is_empty() && c.node_list.is_none());
    }

    #[test]
    fn static_comets_parse_and_bad_ones_fail() {
        let c = parse(&["--comet", "a=127.0.0.1:3109", "--comet", "b=h:1"]).unwrap();
        assert_eq!(c.comets.len(), 2);
        assert_eq!(c.comets[1].grpc, "h:1");
        assert!(herald_runtime::args::parse::<Args>(&["--comet", "nope"]).is_err());
        assert!(parse(&["--batch-frames", "0"]).is_err());
    }

    #[test]
    fn admin_dead_letter_and_rooms_flags() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.http_addr, SocketAddr::from(([0, 0, 0, 0], 3193)));
        assert_eq!(c.rooms_poll, Some(Duration::from_secs(1)));
        assert_eq!(c.dead_letter_topic, None);
        assert_eq!(c.max_record_bytes, (1 << 20) - 16);
        let c = parse(&[
            "--http-addr",
            "127.0.0.1:9",
            "--rooms-poll-ms",
            "0",
            "--dead-letter-topic",
            "dlq",
        ])
        .unwrap();
        assert_eq!(c.http_addr, SocketAddr::from(([127, 0, 0, 1], 9)));
        assert_eq!(c.rooms_poll, None, "0 turns room filtering off");
        assert_eq!(c.dead_letter_topic.as_deref(), Some("dlq"));
        assert!(
            parse(&["--dead-letter-topic", "goim-push-topic"]).is_err(),
            "dead letters into the push topic would loop"
        );
        assert!(parse(&["--max-record-bytes", "0"]).is_err());
    }
}
