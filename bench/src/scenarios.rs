//! The scenarios (S0–S7, the soak) and the profiles that chain them.
//!
//! Each scenario starts what it needs (a comet process or the floor process),
//! connects its clients, measures, records its figures and the targets it
//! speaks to, and stops everything it started before the next one begins, so
//! scenarios never share a server or leak sockets into each other's figures.
//!
//! This file holds the run ([`run`]) and what scenarios share; each scenario
//! lives in its own module (`s0` … `s7`, `soak`), the profiles' sizes in `plan` and
//! the smoke profiles' checks in `smoke`.

mod plan;
mod s0;
mod s1;
mod s2;
mod s3;
mod s4;
mod s5;
mod s6;
mod s7;
mod smoke;
mod soak;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use herald_protocol::pb::CometClient;
use herald_runtime::grpc_auth::AuthChannel;
use tonic::transport::Channel;

use self::plan::Plan;
use self::s0::s0;
use self::s1::s1;
use self::s2::s2;
use self::s3::s3;
use self::s4::s4;
use self::s5::s5;
use self::s6::s6;
use self::s7::s7;
use self::smoke::{s5_smoke_check, smoke_check};
use self::soak::{soak, soak_check};
use crate::floor::FloorRun;
use crate::load::{ClientSpec, Clock, Generator, Transport};
use crate::proc::{self, Machine, PerfCount, Sample};
use crate::report::{self, Report};
use crate::s5::Services;
use crate::server::Comet;
use crate::stub::{self, Calls};
use crate::{Args, Error, Result, What};

/// Handshakes in flight while a population connects: half of comet's
/// accept backlog (tokio's 1024), so a briefly descheduled comet does not
/// overflow it (each overflow stalls a client for a 1 s retransmission).
const CONNECT_CONCURRENCY: usize = 512;
/// How long a step waits with no new message before calling delivery done.
const DRAIN_IDLE: Duration = Duration::from_secs(2);

/// State shared by the scenarios of one run.
#[derive(Debug)]
struct Ctx {
    binary: PathBuf,
    out: PathBuf,
    server_core: Option<usize>,
    clock: Clock,
    sweep: Duration,
    probe_every: usize,
    stub: SocketAddr,
    calls: Arc<Calls>,
    plan: Plan,
    /// Floor runs by frames per push, for the ratios.
    floor: HashMap<usize, FloorRun>,
    report: Report,
    /// S2's population, kept for S6 when both run.
    kept: Option<(Comet, Generator, CometClient<AuthChannel>, i32)>,
    /// The highest S2 rate (20 frames/push) that comet kept up with.
    s2_sustained_rate: Option<f64>,
    /// Redis and Kafka for S5, when given.
    services: Option<Services>,
    /// Count system calls with `perf stat` as well.
    perf: bool,
    /// The gRPC token of every server started, and of the calls to them.
    grpc: crate::server::GrpcToken,
}

/// Runs `args.what` and writes its report.
pub(crate) async fn run(args: Args) -> Result<()> {
    let Args {
        what,
        server_bin,
        out,
        docs,
        clients,
        seconds,
        minutes,
        window_seconds,
        server_core,
        gen_core,
        no_pin,
        sweep_ms,
        probe_every,
        redis,
        kafka,
        perf_syscalls,
        grpc_token,
    } = args;
    let grpc = crate::server::GrpcToken::start(&grpc_token.source())?;
    let services = redis
        .zip(kafka)
        .map(|(redis, kafka)| Services { redis, kafka });
    if matches!(what, What::S5 | What::S5Smoke) && services.is_none() {
        return Err(crate::s5::Error::NoServices.into());
    }
    let binary = match server_bin {
        Some(bin) => bin,
        None => std::env::current_exe().map_err(Error::CurrentExe)?,
    };
    let mut notes = Vec::new();
    // Described before pinning: afterwards this process sees one core.
    let machine = Machine::describe();
    let pinned = if no_pin {
        None
    } else {
        match proc::pin_process(gen_core) {
            Ok(()) => Some((server_core, gen_core)),
            Err(err) => {
                notes.push(format!("not pinned: {err}"));
                None
            }
        }
    };
    std::fs::create_dir_all(&out).map_err(|source| {
        Error::Report(report::Error::Write {
            path: out.clone(),
            source,
        })
    })?;
    let (stub_addr, calls) = stub::start().await.map_err(Error::Stub)?;
    // The program's file name only: reports are committed, machine paths are not.
    let command = std::env::args()
        .enumerate()
        .map(|(i, arg)| match i {
            0 => std::path::Path::new(&arg)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or(arg),
            _ => arg,
        })
        .collect::<Vec<_>>()
        .join(" ");
    let mut plan = Plan::new(what, clients, seconds, minutes, window_seconds);
    if services.is_none() && plan.scenarios.contains(&What::S5) {
        plan.scenarios.retain(|s| *s != What::S5);
        notes.push(
            "S5 not run: no Redis/Kafka (pass --redis and --kafka, or use ./scripts/bench.sh)"
                .to_owned(),
        );
    }
    let mut ctx = Ctx {
        binary,
        out: out.clone(),
        server_core: pinned.map(|(s, _)| s),
        clock: Clock::new(),
        sweep: Duration::from_millis(sweep_ms.clamp(10, 1_000)),
        probe_every: probe_every.max(1),
        stub: stub_addr,
        calls,
        plan: plan.clone(),
        floor: HashMap::new(),
        report: Report {
            what,
            started_utc: report::now_utc(),
            command,
            machine,
            pinned,
            loadavg_start: proc::loadavg(),
            loadavg_end: f64::NAN,
            speed_start: proc::Speed::probe(pinned),
            speed_end: None,
            targets: Vec::new(),
            scenarios: Default::default(),
            notes,
        },
        kept: None,
        s2_sustained_rate: None,
        services,
        perf: perf_syscalls,
        grpc,
    };
    ctx.report.notes.push(
        "figures from a shared machine are noisy: compare the load average column before comparing runs"
            .to_owned(),
    );
    for scenario in &plan.scenarios {
        eprintln!("herald bench: running {scenario:?}");
        let result = match scenario {
            What::S0 => s0(&mut ctx).await,
            What::S1 => s1(&mut ctx).await,
            What::S2 => s2(&mut ctx, Transport::Tcp).await,
            What::S2Ws => s2(&mut ctx, Transport::Ws).await,
            What::S3 => s3(&mut ctx).await,
            What::S4 => s4(&mut ctx).await,
            What::S5 => s5(&mut ctx).await,
            What::S6 => s6(&mut ctx).await,
            What::S7 => s7(&mut ctx).await,
            What::Soak => soak(&mut ctx).await,
            _ => Ok(()),
        };
        if let Err(err) = result {
            let msg = format!("{scenario:?} failed: {}", herald_runtime::error_chain(&err));
            eprintln!("herald bench: {msg}");
            ctx.report.notes.push(msg);
            if matches!(what, What::Smoke | What::S5Smoke | What::Soak) {
                return Err(err);
            }
        }
    }
    if let Some((comet, mut generator, _, _)) = ctx.kept.take() {
        generator.close_all().await;
        drop(comet);
    }
    ctx.report.loadavg_end = proc::loadavg();
    ctx.report.speed_end = Some(proc::Speed::probe(ctx.report.pinned));
    let md = ctx.report.write(&out)?;
    let _ = report::plots(&ctx.report, &out);
    if let Some(docs) = docs {
        crate::report::write_docs(&ctx.report, &docs)?;
    }
    println!("{md}");
    if what == What::Smoke {
        smoke_check(&ctx.report)?;
    }
    if what == What::S5Smoke {
        s5_smoke_check(&ctx.report)?;
    }
    if what == What::Soak {
        soak_check(&ctx.report)?;
    }
    Ok(())
}

fn specs(
    first_mid: u64,
    n: usize,
    room: &str,
    transport: Transport,
    auth: bool,
    probe_every: usize,
) -> Vec<ClientSpec> {
    (0..n)
        .map(|i| ClientSpec {
            mid: first_mid + i as u64,
            room: room.to_owned(),
            transport,
            auth,
            probe: auth && i % probe_every == probe_every - 1,
            rcvbuf: None,
            body_seq: false,
        })
        .collect()
}

fn self_sample() -> Sample {
    Sample::take(std::process::id())
}

/// A client of `comet`'s gRPC services whose calls carry the token.
async fn connect_comet(ctx: &Ctx, comet: &Comet) -> Result<CometClient<AuthChannel>> {
    let channel = Channel::from_shared(format!("http://{}", comet.grpc))
        .map_err(|_| Error::Smoke(format!("bad gRPC address {}", comet.grpc)))?
        .connect()
        .await
        .map_err(Error::Channel)?;
    Ok(CometClient::new(ctx.grpc.token.channel(channel)))
}

/// A comet with `extra` flags and the gRPC token, if any.
fn start_comet(ctx: &Ctx, extra: &[String]) -> Result<Comet> {
    let flags: Vec<String> = extra.iter().chain(&ctx.grpc.flags).cloned().collect();
    Ok(Comet::start(
        &ctx.binary,
        ctx.server_core,
        ctx.stub,
        "bench",
        &ctx.out,
        &flags,
    )?)
}

/// Starts `perf stat` on comet when asked (`--perf-syscalls`), then gives it
/// time to attach before the step begins.
async fn perf_start(dir: Option<&std::path::Path>, comet: &Comet) -> Option<PerfCount> {
    let counting = PerfCount::start(comet.pid, dir?, "comet");
    tokio::time::sleep(Duration::from_millis(300)).await;
    counting
}

/// `n` per `of`, when counted.
fn per(n: Option<u64>, of: u64) -> Option<f64> {
    n.filter(|_| of > 0).map(|n| n as f64 / of as f64)
}
