//! S5: pushes end to end through the distributed path. The tool starts real
//! `herald logic`, `herald job` and `herald comet` processes against a real
//! Redis and Kafka, connects clients to comet (authenticated by the real
//! logic), and POSTs pushes to logic's HTTP API on an open-loop schedule:
//! HTTP → logic → Kafka → job → comet gRPC → client socket.
//!
//! Kafka's own produce→consume latency, measured in the same run on a topic
//! of its own with the producer settings logic uses, is the floor the
//! single-key figure is compared with: Herald adds an HTTP hop, a Redis
//! lookup, job and comet on top of it.
//!
//! CPU per push has a floor of its own: a single-key push at the latency
//! step's rate finds every process asleep, and each of the
//! [`ROUND_TRIPS_PER_PUSH`] request/answer pairs the servers must handle for
//! it costs at least what an echo server pinned to the same core spends on
//! one round trip at that rate, measured in the same run
//! ([`round_trip_floor`](floors::round_trip_floor)).
//!
//! This file holds S5's settings, errors and [`run`]; the steps are in
//! `steps` (in order) and `keys` (one single-key step), the processes and
//! topics in `cluster`, the floors in `floors`, the CPU per push in `cost`
//! and the table rows in `targets`.

pub(crate) mod cluster;
mod cost;
mod floors;
mod keys;
mod steps;
mod targets;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub(crate) use self::cluster::{create_topics, delete_topics};
use self::steps::measure;
pub(crate) use self::steps::{key_post, room_post};
use crate::load::Clock;
use crate::report::Target;

/// Partitions of the push topic and of the floor topic (as the test bed's
/// full-path tests use).
pub(crate) const PARTITIONS: i32 = 3;
/// How long a step waits with no new message before calling delivery done.
const DRAIN_IDLE: Duration = Duration::from_secs(3);
/// Request/answer pairs logic, job and comet handle per single-key push,
/// counted from their side (each is one wake-up, one read and one send):
/// logic 3 (the HTTP request and its answer, the Redis route lookup, the
/// Kafka produce and its acknowledgement), job 2 (the fetch answer carrying
/// the record and the next fetch, the comet call and its answer), comet 1.5
/// (the call and its answer, and a send to the client with no answer).
const ROUND_TRIPS_PER_PUSH: f64 = 6.5;
/// Every wait for a process or a topic is bounded by this.
const WAIT: Duration = Duration::from_secs(30);

/// Why S5 could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--redis` / `--kafka` missing.
    #[error(
        "S5 needs Redis and Kafka: pass --redis <url> and --kafka <brokers> (or set HERALD_REDIS_URL and HERALD_KAFKA_BROKERS)"
    )]
    NoServices,
    /// A Kafka admin or client call failed.
    #[error("kafka: {0}")]
    Kafka(String),
    /// A server process could not be started or did not come up.
    #[error("{0}")]
    Process(String),
    /// The comet under test.
    #[error(transparent)]
    Comet(#[from] crate::server::Error),
    /// The round-trip floor's echo process.
    #[error("round-trip floor: {0}")]
    Floor(#[from] crate::floor::Error),
    /// A file could not be written.
    #[error("cannot write {path:?}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Result with this module's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where the services are.
#[derive(Debug, Clone)]
pub(crate) struct Services {
    pub(crate) redis: String,
    pub(crate) kafka: String,
}

/// S5's sizes.
#[derive(Debug, Clone)]
pub(crate) struct S5Plan {
    /// Rooms pushed to, each with `members` clients.
    pub(crate) rooms: usize,
    pub(crate) members: usize,
    /// One member in this many is a probe (latency); the rest are sinks.
    pub(crate) probe_every: usize,
    /// Pushes per second per room, one step each.
    pub(crate) room_rates: Vec<f64>,
    /// Shortest step for a room rate: 1 push/s needs many seconds for a p99.
    pub(crate) room_min_seconds: f64,
    /// Clients (all probes) whose keys get single-key pushes.
    pub(crate) key_clients: usize,
    /// Single-key pushes per second, one step each. The first is the
    /// latency step (and the Kafka floor's rate); the later, faster ones
    /// show what a push costs once the processes are busy enough to batch.
    pub(crate) key_rates: Vec<f64>,
    /// Closed-loop single-key steps, one per entry: that many callers, each
    /// sending its next push when logic has answered the last. The
    /// throughput they reach is the three processes' capacity on their
    /// core, and the CPU per push there the cost of a push under load.
    pub(crate) key_callers: Vec<usize>,
    pub(crate) seconds: f64,
}

/// What S5 measured: the scenario's JSON record and its targets.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) record: serde_json::Value,
    pub(crate) targets: Vec<Target>,
}

/// Settings of one S5 run that come from the tool's flags.
#[derive(Debug)]
pub(crate) struct Setup<'a> {
    pub(crate) binary: &'a Path,
    pub(crate) core: Option<usize>,
    pub(crate) out: &'a Path,
    pub(crate) clock: Clock,
    pub(crate) sweep: Duration,
    pub(crate) services: &'a Services,
    pub(crate) plan: &'a S5Plan,
    /// Count every system call with `perf stat` too.
    pub(crate) perf: bool,
    /// Flags handing the gRPC token to logic, comet and job, if any.
    pub(crate) grpc_flags: &'a [String],
}

/// Runs S5: Kafka floor, room pushes at each rate, single-key pushes.
pub(crate) async fn run(setup: Setup<'_>) -> Result<Outcome> {
    let services = setup.services;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let run_id = format!("{}-{stamp}", std::process::id());
    let topic = format!("herald-bench-s5-{run_id}");
    // One floor topic per floor rate: each floor reads its topic from the start.
    let floor_topics = [
        format!("herald-bench-s5-floor-{run_id}"),
        format!("herald-bench-s5-floor-low-{run_id}"),
    ];
    let all = [
        topic.as_str(),
        floor_topics[0].as_str(),
        floor_topics[1].as_str(),
    ];
    create_topics(&services.kafka, &all).await?;
    let result = measure(&setup, &run_id, &topic, &floor_topics).await;
    delete_topics(&services.kafka, &all).await;
    result
}
