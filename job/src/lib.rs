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
//!   poller per comet so room pushes skip comets without members; one
//!   submodule per step: the comet set (`directory`), the queued call
//!   (`queue`), the worker (`worker`), batching (`batch`), the call and its
//!   retries (`call`), the rooms view (`rooms`) and the counters (`stats`);
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
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use herald_protocol::Frame;
use herald_protocol::pb::{PushMsg, push_msg};
use herald_protocol::record::{Record, Target};
use herald_runtime::nodes::{self, NodeList};
use herald_runtime::{Shutdown, admin, listen};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

pub mod comets;
mod config;
pub mod metrics;
pub mod offsets;
pub mod source;

pub use comets::{CallSettings, Stats, StatsSnapshot};
pub use config::{Args, Config, KafkaConfig, MAX_RECORD_BYTES, StaticComet};

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
    #[error(transparent)]
    Bind(#[from] listen::BindError),
    /// The admin HTTP server failed.
    #[error("serving admin http")]
    Http(#[source] std::io::Error),
    /// The gRPC token file cannot be read, or holds no usable token.
    #[error("gRPC token")]
    GrpcToken(#[from] herald_runtime::grpc_auth::Error),
}

/// Result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

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

/// Why a record is poison (read by [`herald_protocol::record`]). Each is
/// counted under its [`Poison::reason`].
pub use herald_protocol::record::Poison;

/// The delivery core: turns records into comet calls. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Job {
    directory: comets::Directory,
    stats: Arc<Stats>,
    cancel: CancellationToken,
    max_record_bytes: usize,
    /// The source is connected (Kafka: the group assigned partitions).
    ready: Arc<AtomicBool>,
    /// librdkafka's last authentication failure (a wrong SASL user or
    /// password) while not yet assigned: what `/readyz` names.
    auth_failure: Arc<std::sync::Mutex<Option<String>>>,
}

impl Job {
    /// Starts with the static comets and the node list file (watched until
    /// [`Job::stop`]).
    ///
    /// # Errors
    /// An invalid config, a node list file that exists but is not valid,
    /// or an unusable gRPC token file.
    pub fn start(config: &Config) -> Result<Job> {
        config.validate()?;
        let stats = Arc::new(Stats::default());
        let cancel = CancellationToken::new();
        let directory = comets::Directory::new(
            config.calls.clone(),
            config.grpc_token.start()?,
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
            auth_failure: Arc::default(),
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
        self.stats.metrics.record();
    }

    /// Counts and logs a poison record; returns it for the outcome.
    fn poison(&self, poison: Poison, len: usize) -> Poison {
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
            stats.metrics.delivered(kind.label());
            Outcome::Delivered
        }
    }

    /// The poison reason, or one receiver per queued call.
    fn calls(&self, msg: PushMsg) -> Result<Vec<tokio::sync::oneshot::Receiver<()>>, Poison> {
        let len = msg.msg.len();
        let (r#type, operation) = (msg.r#type, msg.operation);
        let record = match Record::try_from(msg) {
            Ok(record) => record,
            Err(poison) => {
                warn!(
                    r#type,
                    operation,
                    reason = poison.reason(),
                    "undeliverable push record"
                );
                return Err(self.poison(poison, len));
            }
        };
        let frame = Frame::push(record.op, record.msg).to_bytes();
        match record.target {
            Target::Keys { server, keys } => {
                let call = comets::Call::Push {
                    keys,
                    op: record.op,
                    frame,
                };
                match self.directory.send_to(&server, call) {
                    Some(wait) => Ok(vec![wait]),
                    None => {
                        self.stats.metrics.unknown_comet();
                        warn!(comet = %server, "PUSH for a comet not in the list; dropped");
                        Ok(Vec::new())
                    }
                }
            }
            Target::Room(room) => Ok(self.directory.send_to_room(&room, || comets::Call::Room {
                room: room.clone(),
                frame: frame.clone(),
            })),
            Target::All { speed } => {
                // goim divides by the comet count unguarded; zero comets is
                // simply nothing to do here.
                let n = i32::try_from(self.directory.len())
                    .unwrap_or(i32::MAX)
                    .max(1);
                let speed = speed / n;
                Ok(self.directory.send_to_all(|| comets::Call::Broadcast {
                    op: record.op,
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
        Ok(Listeners {
            http: Some(listen::bind(http).await?),
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
    let http_stop = Shutdown::new();
    let http = listeners.http.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "admin http listening");
        }
        let health = Arc::new(metrics::Health {
            stats: job.stats.clone(),
            ready: job.ready.clone(),
            auth_failure: job.auth_failure.clone(),
        });
        tokio::spawn(
            admin::serve(listener, health, http_stop.wait()).instrument(info_span!("http")),
        )
    });
    let result = source::kafka(&job, &config, shutdown).await;
    job.stop();
    http_stop.trigger();
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
