//! `herald bench`: the benchmark tool that sizes a deployment and tracks
//! Herald's performance targets.
//!
//! It runs a real `herald comet` process (the current executable unless
//! `--server-bin` says otherwise) pinned to one core, against a stub logic,
//! and drives it from a single-threaded load generator pinned to the other
//! core. Every ratio is taken against a *floor* measured in the same run: a
//! raw fan-out server that only writes pre-encoded frames. S5 instead runs
//! the whole distributed path (real logic, job and comet processes against
//! a real Redis and Kafka) and takes Kafka's own latency as its floor.
//! Benchmarks print figures; nothing here is a timed test.
//!
//! # Layout
//! - [`wire`]: pre-encoded client frames and the allocation-free scanner that
//!   counts inbound frames and checks sequence numbers.
//! - [`load`]: the generator: bulk TCP/WebSocket clients, lazy sinks, eager probes;
//!   opening one client (connect, upgrade, authenticate) in `open`.
//! - [`floor`]: the kernel-floor fan-out server (its own process); S4's
//!   handshake and call floors in submodules (`handshake`, `call`).
//! - [`stub`]: the stub `goim.logic.Logic` that accepts every token.
//! - [`server`]: starting and stopping the comet under test.
//! - [`inject`]: open-loop injectors for comet's gRPC and logic's HTTP API
//!   (latency from the scheduled time).
//! - [`s5`]: S5, the end-to-end path through real logic, job, Redis and Kafka;
//!   its setup (`cluster`), steps (`steps`, `keys`), `floors`, `cost` and
//!   table rows (`targets`) in submodules.
//! - [`scenarios`]: S0–S7, the soak, and the `quick`/`full`/`smoke`
//!   profiles; one submodule per scenario (`s0` … `s7`, `soak`), plus the
//!   profiles' sizes (`plan`) and the smoke checks (`smoke`).
//! - [`report`]: the JSON record and the markdown table; the table in
//!   `markdown`, the plots' series in `plots`.
//! - [`plot`]: PNG plots, with labels from a built-in bitmap font.
//! - [`probe`]: `herald probe`, one push through a deployed cluster (what
//!   the chart's `helm test` runs).
//! - [`proc`]: CPU, RSS, pinning and machine facts from `/proc`.
//! - `timer`: the injectors' microsecond-precision sleep (a `timerfd`).

use std::path::PathBuf;

pub mod floor;
pub mod inject;
pub mod load;
pub mod plot;
pub mod probe;
pub mod proc;
pub mod report;
pub mod s5;
pub mod scenarios;
pub mod server;
pub mod stub;
mod timer;
pub mod wire;

/// Why a benchmark run failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The async runtime could not start.
    #[error("cannot start the runtime")]
    Runtime(#[source] std::io::Error),
    /// The server under test failed.
    #[error(transparent)]
    Server(#[from] server::Error),
    /// The floor server failed.
    #[error(transparent)]
    Floor(#[from] floor::Error),
    /// The stub logic could not listen.
    #[error("stub logic")]
    Stub(#[source] std::io::Error),
    /// The comet gRPC channel could not be set up.
    #[error("gRPC channel to comet")]
    Channel(#[source] tonic::transport::Error),
    /// Writing the report failed.
    #[error(transparent)]
    Report(#[from] report::Error),
    /// S5 could not set up its processes, topics or services.
    #[error(transparent)]
    S5(#[from] s5::Error),
    /// The gRPC token file cannot be read, or holds no usable token.
    #[error("gRPC token")]
    GrpcToken(#[from] herald_runtime::grpc_auth::Error),
    /// The current executable could not be found (for `--server-bin`'s default).
    #[error("cannot find the current executable")]
    CurrentExe(#[source] std::io::Error),
    /// A smoke run saw loss, reordering or a shortfall.
    #[error("smoke check failed: {0}")]
    Smoke(String),
    /// A soak run lost messages it cannot explain.
    #[error("soak failed: {0}")]
    Soak(String),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum What {
    /// S0: floor calibration (raw fan-out server, same N and batch sizes).
    S0,
    /// S1: idle memory per connection (TCP and WebSocket) and idle CPU.
    S1,
    /// S2: room fan-out, 20 and 1 frames per push, rising rates.
    S2,
    /// S2 with WebSocket clients (its own rows).
    S2Ws,
    /// S3: single-key PushMsg latency at fixed rates.
    S3,
    /// S4: connection storm and reconnect storm.
    S4,
    /// S5: room and single-key pushes end to end through logic, Kafka, job
    /// and comet (needs --redis and --kafka).
    S5,
    /// A tiny S5 that fails unless every push arrives (needs --redis and --kafka).
    S5Smoke,
    /// S6: broadcast completion time.
    S6,
    /// S7: slow consumers (1 % stop reading).
    S7,
    /// Soak: `--minutes` of mixed load (idle clients, room and key pushes,
    /// connects and disconnects, slow readers) in `--window-seconds`
    /// windows; through logic, Kafka and job when --redis and --kafka are
    /// given, else against comet alone. Fails on an unexplained loss.
    Soak,
    /// The quick profile: every scenario, small steps (a few minutes).
    Quick,
    /// The full profile: every scenario, longer steps and more rates.
    Full,
    /// A tiny floor + S2 run that fails on any loss (the test suite's check).
    Smoke,
    /// Internal: the floor server process.
    #[value(hide = true)]
    FloorServer,
    /// Internal: S3's floor relay process.
    #[value(hide = true)]
    FloorRelay,
    /// Internal: S5's round-trip floor process.
    #[value(hide = true)]
    FloorEcho,
    /// Internal: S4's handshake floor process.
    #[value(hide = true)]
    FloorHandshake,
    /// Internal: S4's call floor process (`Connect` calls to logic).
    #[value(hide = true)]
    FloorConnect,
}

/// Flags of `herald bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// A scenario (s0..s7, s2-ws, soak), a profile (quick, full) or a smoke
    /// check (smoke, s5-smoke).
    #[arg(value_enum)]
    pub what: What,
    /// The herald binary to benchmark; defaults to the current executable.
    #[arg(long, env = "HERALD_BENCH_SERVER_BIN")]
    pub server_bin: Option<PathBuf>,
    /// Directory for the JSON record, the markdown table and server logs.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// Also write `benchmarks.md` and the PNG plots into this directory.
    #[arg(long)]
    pub docs: Option<PathBuf>,
    /// Client population (default: the profile's, 19,000 for most scenarios).
    #[arg(long)]
    pub clients: Option<usize>,
    /// Seconds per measured step (default: the profile's).
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Soak: minutes of load in all.
    #[arg(long, default_value_t = 30.0)]
    pub minutes: f64,
    /// Soak: seconds per reported window (drift compares the last with the first).
    #[arg(long, default_value_t = 300.0)]
    pub window_seconds: f64,
    /// Core the server (comet or floor) is pinned to.
    #[arg(long, default_value_t = 0)]
    pub server_core: usize,
    /// Core the generator is pinned to.
    #[arg(long, default_value_t = 1)]
    pub gen_core: usize,
    /// Do not pin anything (machines with one core, or without taskset).
    #[arg(long)]
    pub no_pin: bool,
    /// Milliseconds between sweeps of the lazy sink clients (100–500).
    #[arg(long, default_value_t = 200)]
    pub sweep_ms: u64,
    /// One client in this many is an eager latency probe.
    #[arg(long, default_value_t = 100)]
    pub probe_every: usize,
    /// Redis for S5's logic, e.g. `redis://127.0.0.1:6379/`.
    #[arg(long, env = "HERALD_REDIS_URL")]
    pub redis: Option<String>,
    /// Kafka bootstrap brokers for S5 (a fresh topic is made per run).
    #[arg(long, env = "HERALD_KAFKA_BROKERS")]
    pub kafka: Option<String>,
    /// Also count every system call of the servers with `perf stat` (S2,
    /// S3, S5): needs perf with tracepoint access; adds a little to each call.
    #[arg(long)]
    pub perf_syscalls: bool,
    /// The shared gRPC token: given to every comet (and S5's logic and
    /// job) the benchmark starts, and sent on its own gRPC calls to them, so
    /// the figures include the token check. Off by default. The command
    /// line is recorded in the report: pass the token in a file.
    #[command(flatten)]
    pub grpc_token: herald_runtime::grpc_auth::TokenArgs,
}

/// Runs `herald bench`; returns when the report is written.
///
/// # Errors
/// When the server, the floor or the report cannot be set up, or a smoke
/// check fails. Scenario shortfalls are figures in the report, not errors.
pub fn run(args: Args) -> Result<()> {
    if args.what == What::FloorServer {
        return Ok(floor::serve(args.clients.unwrap_or(1))?);
    }
    if args.what == What::FloorRelay {
        return Ok(floor::relay(args.clients.unwrap_or(1))?);
    }
    if args.what == What::FloorEcho {
        return Ok(floor::echo()?);
    }
    if args.what == What::FloorHandshake {
        return Ok(floor::handshake()?);
    }
    if args.what == What::FloorConnect {
        return Ok(floor::connect()?);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, scenarios::run(args))
}
