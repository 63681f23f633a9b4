//! Job: takes goim push records (`goim.logic.PushMsg`, §10)
//! and delivers them to comets over `goim.comet.Comet` gRPC (§8.3).
//!
//! `§N` refers to docs/protocol.md.
//!
//! # Layout
//! In data-flow order:
//! - [`source`]: where records come from — a Kafka consumer group with
//!   at-least-once offsets ([`run`]), or logic's in-process queue for
//!   `herald standalone` ([`run_channel`]);
//! - [`offsets`]: the per-partition "lowest contiguous done" tracking;
//! - [`Job::submit`] (here): decodes one record into comet calls;
//! - [`comets`]: the comet directory (node-list file and static flags), one
//!   worker per comet with retries and adaptive room batching, and a `Rooms`
//!   poller per comet so room pushes skip comets without members;
//! - [`metrics`]: Prometheus counters and the admin HTTP endpoints.
//!
//! # Poison records
//! Undecodable, unknown type, empty keys/room, or oversized: counted by
//! reason, copied to `--dead-letter-topic` when set (the offset moves past
//! them only after that write is acknowledged), else skipped.
//!
//! # Delivery guarantee
//! At least once: a Kafka offset is stored only when every comet call its
//! record needed succeeded (or the comet left the list, or refused the call
//! for good — counted and logged). Clients may see duplicates after a restart.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use herald_logic::nodes::{self, NodeList};
use herald_protocol::Frame;
use herald_protocol::pb::{PushMsg, push_msg};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

pub mod comets;
pub mod metrics;
pub mod offsets;
pub mod source;

pub use comets::{CallSettings, Stats, StatsSnapshot};

/// Why job could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The node list file exists but cannot be used.
    #[error("loading the comet node list")]
    Nodes(#[from] nodes::Error),
    /// librdkafka refused the consumer configuration or subscription.
    #[error("setting up the kafka consumer")]
    Kafka(#[source] rdkafka::error::KafkaError),
    /// The admin HTTP address could not be bound.
    #[error("binding the admin http listener on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The admin HTTP server failed.
    #[error("serving admin http")]
    Http(#[source] std::io::Error),
}

/// Result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

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
    #[arg(long, env = "HERALD_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// Kafka push topic.
    #[arg(long, env = "HERALD_KAFKA_TOPIC", default_value = "goim-push-topic")]
    pub kafka_topic: String,
    /// Kafka consumer group.
    #[arg(long, env = "HERALD_JOB_GROUP", default_value = "goim-push-group-job")]
    pub kafka_group: String,
    /// How long the group waits for a silent job (killed, frozen) before
    /// giving its partitions to another, in milliseconds. librdkafka's 45 s
    /// default would stall a restarted job that long.
    #[arg(long, env = "HERALD_JOB_SESSION_TIMEOUT_MS", default_value_t = 10_000)]
    pub kafka_session_timeout_ms: u64,
    /// Node list JSON file (docs/protocol.md §15.4); every node gets pushes.
    #[arg(
        long,
        env = "HERALD_JOB_NODE_LIST",
        conflicts_with = "node_list_configmap"
    )]
    pub node_list: Option<PathBuf>,
    /// Watch the node list in this ConfigMap (key `nodes.json`) instead of a file.
    #[arg(long, env = "HERALD_NODE_LIST_CONFIGMAP")]
    pub node_list_configmap: Option<String>,
    /// Namespace of `--node-list-configmap` (in a pod: its own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub node_list_namespace: String,
    /// How often the node list file's mtime is checked, in milliseconds.
    #[arg(long, env = "HERALD_JOB_NODE_LIST_POLL_MS", default_value_t = 2000)]
    pub node_list_poll_ms: u64,
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
}

/// What job runs with; built from [`Args`], or directly by tests.
#[derive(Debug, Clone)]
pub struct Config {
    /// Kafka settings (unused by [`run_channel`]).
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
    /// Admin HTTP address (used by [`Listeners::bind`]).
    pub http_addr: SocketAddr,
    /// Where poison records go; `None` skips them.
    pub dead_letter_topic: Option<String>,
    /// Largest record value delivered.
    pub max_record_bytes: usize,
    /// `Rooms` poll interval; `None` sends room pushes to every comet.
    pub rooms_poll: Option<Duration>,
}

impl Args {
    /// Checks the arguments and turns them into a [`Config`].
    ///
    /// # Errors
    /// Zero limits or timeouts.
    pub fn into_config(self) -> Result<Config> {
        // Destructured so a new flag cannot be silently ignored.
        let Args {
            kafka_brokers,
            kafka_topic,
            kafka_group,
            kafka_session_timeout_ms,
            node_list,
            node_list_configmap,
            node_list_namespace,
            node_list_poll_ms,
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
        } = self;
        let mut config = Config::new(&kafka_brokers, &kafka_topic, &kafka_group);
        config.kafka.session_timeout = Duration::from_millis(kafka_session_timeout_ms);
        config.node_list = nodes::Source::from_flags(
            node_list,
            node_list_configmap,
            node_list_namespace,
            Duration::from_millis(node_list_poll_ms),
        );
        config.comets = comets;
        config.calls.timeout = Duration::from_millis(call_timeout_ms);
        config.calls.attempts = retry_attempts;
        config.calls.backoff = Duration::from_millis(retry_backoff_ms);
        config.calls.batch_frames = batch_frames;
        config.calls.batch_bytes = batch_bytes;
        config.calls.max_queued = comet_queue_limit;
        config.max_in_flight = max_in_flight;
        config.drain_timeout = Duration::from_millis(drain_timeout_ms);
        config.http_addr = http_addr;
        config.dead_letter_topic = dead_letter_topic.filter(|t| !t.is_empty());
        config.max_record_bytes = max_record_bytes;
        config.rooms_poll = (rooms_poll_ms > 0).then(|| Duration::from_millis(rooms_poll_ms));
        config.validate()?;
        Ok(config)
    }
}

impl Config {
    /// Defaults of every flag with the given Kafka settings and no comets.
    pub fn new(brokers: &str, topic: &str, group: &str) -> Config {
        Config {
            kafka: KafkaConfig {
                brokers: brokers.to_owned(),
                topic: topic.to_owned(),
                group: group.to_owned(),
                session_timeout: Duration::from_secs(10),
            },
            node_list: None,
            comets: Vec::new(),
            calls: CallSettings {
                timeout: Duration::from_secs(3),
                attempts: 5,
                backoff: Duration::from_millis(100),
                backoff_max: Duration::from_secs(5),
                batch_frames: 20,
                batch_bytes: 64 * 1024,
                max_queued: 500,
            },
            max_in_flight: 1000,
            drain_timeout: Duration::from_secs(5),
            http_addr: SocketAddr::from(([0, 0, 0, 0], 3193)),
            dead_letter_topic: None,
            max_record_bytes: MAX_RECORD_BYTES,
            rooms_poll: Some(Duration::from_secs(1)),
        }
    }

    /// Rejects settings that cannot work.
    ///
    /// # Errors
    /// The first problem found.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(m.to_owned()));
        let poll_zero =
            matches!(&self.node_list, Some(nodes::Source::File { poll, .. }) if poll.is_zero());
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
        Ok(())
    }
}

/// What became of one submitted record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every needed comet call finished (succeeded, or dropped and counted).
    Delivered,
    /// Poison: can never be delivered; skipped (or dead-lettered) and counted.
    Skipped(Poison),
    /// Shutdown came first; the record must be delivered again.
    Abandoned,
}

/// Why a record is poison. Each is counted under its [`Poison::reason`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Poison {
    /// Not a protobuf `PushMsg`.
    Undecodable,
    /// A `type` outside PUSH / ROOM / BROADCAST.
    UnknownType,
    /// PUSH with no keys, or ROOM with no room.
    EmptyKeys,
    /// Larger than the configured maximum.
    Oversized,
}

impl Poison {
    /// The metric label and dead-letter header value.
    pub fn reason(self) -> &'static str {
        match self {
            Poison::Undecodable => "undecodable",
            Poison::UnknownType => "unknown_type",
            Poison::EmptyKeys => "empty_keys",
            Poison::Oversized => "oversized",
        }
    }
}

/// The delivery core: turns records into comet calls. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Job {
    directory: comets::Directory,
    stats: Arc<Stats>,
    cancel: CancellationToken,
    max_record_bytes: usize,
    /// The source is connected (Kafka: the group assigned partitions).
    ready: Arc<AtomicBool>,
}

impl Job {
    /// Starts with the static comets and the node list file (watched until
    /// [`Job::stop`]).
    ///
    /// # Errors
    /// An invalid config, or a node list file that exists but is not valid.
    pub fn start(config: &Config) -> Result<Job> {
        config.validate()?;
        let stats = Arc::new(Stats::default());
        let cancel = CancellationToken::new();
        let directory = comets::Directory::new(
            config.calls.clone(),
            config.rooms_poll,
            stats.clone(),
            cancel.clone(),
        );
        let job = Job {
            directory,
            stats,
            cancel,
            max_record_bytes: config.max_record_bytes,
            ready: Arc::default(),
        };
        let initial = match &config.node_list {
            Some(source) => source.initial()?,
            None => NodeList::default(),
        };
        job.directory.set(merge(&config.comets, &initial));
        if let Some(source) = config.node_list.clone() {
            tokio::spawn(
                watch_nodes(job.clone(), config.comets.clone(), source)
                    .instrument(info_span!("node_list")),
            );
        }
        Ok(job)
    }

    /// Counters of what happened so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Whether the source delivers records yet (what `/readyz` says).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// The metrics in Prometheus text format (what `/metrics` serves).
    pub fn metrics_text(&self) -> String {
        self.stats.metrics.encode()
    }

    /// Stops every comet worker; records still queued are abandoned.
    pub fn stop(&self) {
        self.cancel.cancel();
    }

    /// Decodes a Kafka record value and submits it; undecodable or
    /// oversized → skipped.
    pub fn submit_bytes(&self, value: &[u8]) -> impl Future<Output = Outcome> + Send + 'static {
        use prost::Message;
        let msg = if value.len() > self.max_record_bytes {
            self.record();
            Err(self.poison(Poison::Oversized, value.len()))
        } else {
            match PushMsg::decode(value) {
                Ok(msg) => Ok(msg),
                Err(err) => {
                    self.record();
                    warn!(cause = %err, "undecodable push record");
                    Err(self.poison(Poison::Undecodable, value.len()))
                }
            }
        };
        let submitted = msg.map(|msg| self.submit(msg));
        async move {
            match submitted {
                Ok(fut) => fut.await,
                Err(poison) => Outcome::Skipped(poison),
            }
        }
    }

    fn record(&self) {
        comets::bump(&self.stats.records);
        self.stats.metrics.record();
    }

    /// Counts and logs a poison record; returns it for the outcome.
    fn poison(&self, poison: Poison, len: usize) -> Poison {
        comets::bump(&self.stats.poison);
        self.stats.metrics.poison(poison.reason());
        warn!(reason = poison.reason(), len, "poison push record");
        poison
    }

    /// Queues the comet calls `msg` needs *now* (so records submitted in
    /// order reach each comet in order) and returns a future that resolves
    /// when they are all finished.
    pub fn submit(&self, msg: PushMsg) -> impl Future<Output = Outcome> + Send + 'static {
        self.record();
        let kind = push_msg::Type::try_from(msg.r#type).ok();
        let waits = self.calls(msg);
        let stats = self.stats.clone();
        async move {
            let (waits, kind) = match (waits, kind) {
                (Ok(waits), Some(kind)) => (waits, kind),
                (Err(poison), _) => return Outcome::Skipped(poison),
                (Ok(_), None) => return Outcome::Skipped(Poison::UnknownType),
            };
            for wait in waits {
                if wait.await.is_err() {
                    return Outcome::Abandoned;
                }
            }
            stats.metrics.delivered(match kind {
                push_msg::Type::Push => "push",
                push_msg::Type::Room => "room",
                push_msg::Type::Broadcast => "broadcast",
            });
            Outcome::Delivered
        }
    }

    /// The poison reason, or one receiver per queued call.
    fn calls(&self, msg: PushMsg) -> Result<Vec<tokio::sync::oneshot::Receiver<()>>, Poison> {
        let len = msg.msg.len();
        let Ok(kind) = push_msg::Type::try_from(msg.r#type) else {
            warn!(r#type = msg.r#type, "unknown push type");
            return Err(self.poison(Poison::UnknownType, len));
        };
        let frame = Frame::push(msg.operation, msg.msg.clone()).to_bytes();
        match kind {
            push_msg::Type::Push => {
                if msg.keys.is_empty() || msg.keys.iter().all(String::is_empty) {
                    warn!("PUSH without keys");
                    return Err(self.poison(Poison::EmptyKeys, len));
                }
                let call = comets::Call::Push {
                    keys: msg.keys,
                    op: msg.operation,
                    frame,
                };
                match self.directory.send_to(&msg.server, call) {
                    Some(wait) => Ok(vec![wait]),
                    None => {
                        comets::bump(&self.stats.unknown_comet);
                        self.stats.metrics.unknown_comet();
                        warn!(comet = %msg.server, "PUSH for a comet not in the list; dropped");
                        Ok(Vec::new())
                    }
                }
            }
            push_msg::Type::Room => {
                if msg.room.is_empty() {
                    warn!("ROOM without a room");
                    return Err(self.poison(Poison::EmptyKeys, len));
                }
                let room = msg.room;
                Ok(self.directory.send_to_room(&room, || comets::Call::Room {
                    room: room.clone(),
                    frame: frame.clone(),
                }))
            }
            push_msg::Type::Broadcast => {
                // goim divides by the comet count unguarded; zero comets is
                // simply nothing to do here.
                let n = i32::try_from(self.directory.len())
                    .unwrap_or(i32::MAX)
                    .max(1);
                let speed = msg.speed / n;
                Ok(self.directory.send_to_all(|| comets::Call::Broadcast {
                    op: msg.operation,
                    speed,
                    frame: frame.clone(),
                }))
            }
        }
    }
}

/// Static comets first; a node-list entry with the same name replaces one.
fn merge(statics: &[StaticComet], list: &NodeList) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = statics
        .iter()
        .map(|c| (c.name.clone(), c.grpc.clone()))
        .collect();
    for node in &list.nodes {
        if node.name.is_empty() || node.grpc.is_empty() {
            continue;
        }
        out.retain(|(name, _)| *name != node.name);
        out.push((node.name.clone(), node.grpc.clone()));
    }
    out
}

/// Applies every node-list change (file or ConfigMap) until [`Job::stop`].
async fn watch_nodes(job: Job, statics: Vec<StaticComet>, source: nodes::Source) {
    let directory = job.directory.clone();
    source
        .watch(
            move |list| directory.set(merge(&statics, &list)),
            job.cancel.cancelled_owned(),
        )
        .await;
}

/// What job listens on; bound before [`run`] so tests can use port 0.
#[derive(Debug)]
pub struct Listeners {
    /// Admin HTTP (`/metrics`, `/healthz`, `/readyz`); `None` serves none.
    pub http: Option<TcpListener>,
}

impl Listeners {
    /// Binds the admin HTTP address.
    ///
    /// # Errors
    /// The bind failing.
    pub async fn bind(http: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(http)
            .await
            .map_err(|source| Error::Bind { addr: http, source })?;
        Ok(Listeners {
            http: Some(listener),
        })
    }

    /// No listener (`herald standalone` has its own).
    pub fn none() -> Self {
        Listeners { http: None }
    }
}

/// Consumes the Kafka push topic until `shutdown`, then waits up to
/// `drain_timeout` for in-flight records, stores their offsets and commits.
/// Serves the admin HTTP endpoints meanwhile.
///
/// # Errors
/// Invalid config or node list, librdkafka refusing the consumer, or the
/// admin HTTP server failing.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let job = Job::start(&config)?;
    let http_stop = CancellationToken::new();
    let http = listeners.http.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "admin http listening");
        }
        let health = metrics::Health {
            stats: job.stats.clone(),
            ready: job.ready.clone(),
        };
        tokio::spawn(
            metrics::serve(listener, health, http_stop.clone()).instrument(info_span!("http")),
        )
    });
    let result = source::kafka(&job, &config, shutdown).await;
    job.stop();
    http_stop.cancel();
    if let Some(http) = http {
        match http.await {
            Ok(Err(err)) => return result.and(Err(Error::Http(err))),
            Err(err) => warn!(cause = %err, "admin http task failed"),
            Ok(Ok(())) => {}
        }
    }
    result
}

/// Delivers records from logic's in-process queue
/// (`herald_logic::queue::memory::MemoryQueue`) until `shutdown` or until
/// the queue closes. No offsets: what is in flight at shutdown is lost.
///
/// # Errors
/// Invalid config or node list.
pub async fn run_channel(
    config: Config,
    records: tokio::sync::mpsc::Receiver<(String, PushMsg)>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let job = Job::start(&config)?;
    source::channel(&job, &config, records, shutdown).await;
    job.stop();
    Ok(())
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
        let mut full = vec!["job"];
        full.extend_from_slice(argv);
        Cli::try_parse_from(full).unwrap().args.into_config()
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
        let mut cli = vec!["job", "--comet", "nope"];
        assert!(Cli::try_parse_from(cli.drain(..)).is_err());
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

    #[test]
    fn node_list_entries_override_static_ones() {
        let list: NodeList = serde_json_free_list();
        let merged = merge(
            &[StaticComet {
                name: "a".to_owned(),
                grpc: "old:1".to_owned(),
            }],
            &list,
        );
        assert_eq!(
            merged,
            vec![
                ("a".to_owned(), "new:2".to_owned()),
                ("b".to_owned(), "b:3".to_owned())
            ]
        );
    }

    fn serde_json_free_list() -> NodeList {
        let node = |name: &str, grpc: &str, draining| nodes::Node {
            name: name.to_owned(),
            grpc: grpc.to_owned(),
            draining,
            ..nodes::Node::default()
        };
        NodeList {
            // Draining nodes still get pushes.
            nodes: vec![
                node("a", "new:2", false),
                node("b", "b:3", true),
                node("", "x:1", false),
            ],
            ..NodeList::default()
        }
    }
}
