//! Job: takes goim push records (`goim.logic.PushMsg`, goim-protocol.md §10)
//! and delivers them to comets over `goim.comet.Comet` gRPC (§8.3).
//!
//! # Layout
//! In data-flow order:
//! - [`source`]: where records come from — a Kafka consumer group with
//!   at-least-once offsets ([`run`]), or logic's in-process queue for
//!   `herald standalone` ([`run_channel`]);
//! - [`offsets`]: the per-partition "lowest contiguous done" tracking;
//! - [`Job::submit`] (here): decodes one record into comet calls;
//! - [`comets`]: the comet directory (node-list file and static flags) and
//!   one worker per comet with retries and adaptive room batching.
//!
//! # Delivery guarantee
//! At least once: a Kafka offset is stored only when every comet call its
//! record needed succeeded (or the comet left the list, or refused the call
//! for good — counted and logged). Clients may see duplicates after a restart.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use herald_logic::nodes::{self, NodeList};
use herald_protocol::Frame;
use herald_protocol::pb::{PushMsg, push_msg};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

pub mod comets;
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
    /// Node list JSON file (herald-extensions.md); every node gets pushes.
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
    /// Most frames in one room batch.
    #[arg(long, env = "HERALD_JOB_BATCH_FRAMES", default_value_t = 20)]
    pub batch_frames: usize,
    /// Most bytes in one room batch.
    #[arg(long, env = "HERALD_JOB_BATCH_BYTES", default_value_t = 64 * 1024)]
    pub batch_bytes: usize,
    /// Most records being delivered at once.
    #[arg(long, env = "HERALD_JOB_MAX_IN_FLIGHT", default_value_t = 1000)]
    pub max_in_flight: usize,
    /// Longest wait for in-flight records at shutdown, in milliseconds.
    #[arg(long, env = "HERALD_JOB_DRAIN_TIMEOUT_MS", default_value_t = 5000)]
    pub drain_timeout_ms: u64,
}

/// Kafka consumer settings.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// Bootstrap brokers.
    pub brokers: String,
    /// Push topic.
    pub topic: String,
    /// Consumer group.
    pub group: String,
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
            max_in_flight,
            drain_timeout_ms,
        } = self;
        let mut config = Config::new(&kafka_brokers, &kafka_topic, &kafka_group);
        config.node_list = match (node_list, node_list_configmap) {
            (Some(path), _) => Some(nodes::Source::File {
                path,
                poll: Duration::from_millis(node_list_poll_ms),
            }),
            (None, Some(name)) => Some(nodes::Source::ConfigMap {
                namespace: node_list_namespace,
                name,
            }),
            (None, None) => None,
        };
        config.comets = comets;
        config.calls.timeout = Duration::from_millis(call_timeout_ms);
        config.calls.attempts = retry_attempts;
        config.calls.backoff = Duration::from_millis(retry_backoff_ms);
        config.calls.batch_frames = batch_frames;
        config.calls.batch_bytes = batch_bytes;
        config.max_in_flight = max_in_flight;
        config.drain_timeout = Duration::from_millis(drain_timeout_ms);
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
            },
            max_in_flight: 1000,
            drain_timeout: Duration::from_secs(5),
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
        if self.calls.timeout.is_zero() || poll_zero {
            return bad("timeouts and intervals must be non-zero");
        }
        if self.calls.attempts == 0 || self.calls.batch_frames == 0 || self.calls.batch_bytes == 0 {
            return bad("retry attempts and batch limits must be non-zero");
        }
        if self.max_in_flight == 0 {
            return bad("max in flight must be non-zero");
        }
        Ok(())
    }
}

/// What became of one submitted record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every needed comet call finished (succeeded, or dropped and counted).
    Delivered,
    /// Poison: undecodable or invalid; skipped and counted.
    Skipped,
    /// Shutdown came first; the record must be delivered again.
    Abandoned,
}

/// The delivery core: turns records into comet calls. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Job {
    directory: comets::Directory,
    stats: Arc<Stats>,
    cancel: CancellationToken,
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
        let directory = comets::Directory::new(config.calls.clone(), stats.clone(), cancel.clone());
        let job = Job {
            directory,
            stats,
            cancel,
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

    /// Stops every comet worker; records still queued are abandoned.
    pub fn stop(&self) {
        self.cancel.cancel();
    }

    /// Decodes a Kafka record value and submits it; undecodable → skipped.
    pub fn submit_bytes(&self, value: &[u8]) -> impl Future<Output = Outcome> + Send + 'static {
        use prost::Message;
        let msg = match PushMsg::decode(value) {
            Ok(msg) => Some(msg),
            Err(err) => {
                comets::bump(&self.stats.records);
                comets::bump(&self.stats.poison);
                warn!(cause = %err, len = value.len(), "undecodable push record; skipped");
                None
            }
        };
        let submitted = msg.map(|msg| self.submit(msg));
        async move {
            match submitted {
                Some(fut) => fut.await,
                None => Outcome::Skipped,
            }
        }
    }

    /// Queues the comet calls `msg` needs *now* (so records submitted in
    /// order reach each comet in order) and returns a future that resolves
    /// when they are all finished.
    pub fn submit(&self, msg: PushMsg) -> impl Future<Output = Outcome> + Send + 'static {
        comets::bump(&self.stats.records);
        let waits = self.calls(msg);
        async move {
            let Some(waits) = waits else {
                return Outcome::Skipped;
            };
            for wait in waits {
                if wait.await.is_err() {
                    return Outcome::Abandoned;
                }
            }
            Outcome::Delivered
        }
    }

    /// `None` for poison; otherwise one receiver per queued call.
    fn calls(&self, msg: PushMsg) -> Option<Vec<tokio::sync::oneshot::Receiver<()>>> {
        let poison = |why: &str| {
            comets::bump(&self.stats.poison);
            warn!(
                why,
                r#type = msg.r#type,
                operation = msg.operation,
                "invalid push record; skipped"
            );
            None
        };
        let Ok(kind) = push_msg::Type::try_from(msg.r#type) else {
            return poison("unknown type");
        };
        let frame = Frame::push(msg.operation, msg.msg.clone()).to_bytes();
        match kind {
            push_msg::Type::Push => {
                if msg.keys.is_empty() {
                    return poison("PUSH without keys");
                }
                let call = comets::Call::Push {
                    keys: msg.keys,
                    op: msg.operation,
                    frame,
                };
                match self.directory.send_to(&msg.server, call) {
                    Some(wait) => Some(vec![wait]),
                    None => {
                        comets::bump(&self.stats.unknown_comet);
                        warn!(comet = %msg.server, "PUSH for a comet not in the list; dropped");
                        Some(Vec::new())
                    }
                }
            }
            push_msg::Type::Room => {
                if msg.room.is_empty() {
                    return poison("ROOM without a room");
                }
                let room = msg.room;
                Some(self.directory.send_to_all(|| comets::Call::Room {
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
                Some(self.directory.send_to_all(|| comets::Call::Broadcast {
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
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let cancel = job.cancel.clone();
    tokio::spawn(async move {
        cancel.cancelled().await;
        let _ = stop_tx.send(true);
    });
    let directory = job.directory.clone();
    source
        .watch(move |list| directory.set(merge(&statics, &list)), stop_rx)
        .await;
}

/// Consumes the Kafka push topic until `shutdown`, then waits up to
/// `drain_timeout` for in-flight records, stores their offsets and commits.
///
/// # Errors
/// Invalid config or node list, or librdkafka refusing the consumer.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
    let job = Job::start(&config)?;
    let result = source::kafka(&job, &config, shutdown).await;
    job.stop();
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
