//! The scenarios (S0–S7) and the profiles that chain them.
//!
//! Each scenario starts what it needs (a comet process or the floor process),
//! connects its clients, measures, records its figures and the targets it
//! speaks to, and stops everything it started before the next one begins, so
//! scenarios never share a server or leak sockets into each other's figures.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use herald_protocol::pb::{BroadcastReq, BroadcastRoomReq, CometClient, Proto, PushMsgReq};
use herald_protocol::ws::raw_proto;
use serde_json::json;
use tonic::transport::Channel;

use crate::floor::{CallFloor, FloorProc, FloorRun};
use crate::inject::{self, Call, Order};
use crate::load::{ClientSpec, Clock, Generator, Totals, Transport};
use crate::proc::{self, Machine, PerfCount, Sample};
use crate::report::{self, Percentiles, Report, Target};
use crate::s5::{S5Plan, Services};
use crate::server::Comet;
use crate::stub::{self, Calls};
use crate::wire::{self, BENCH_OP};
use crate::{Args, Error, Result, What};

/// Handshakes in flight while a population connects: half of comet's
/// accept backlog (tokio's 1024), so a briefly descheduled comet does not
/// overflow it (each overflow stalls a client for a 1 s retransmission).
const CONNECT_CONCURRENCY: usize = 512;
/// How long a step waits with no new message before calling delivery done.
const DRAIN_IDLE: Duration = Duration::from_secs(2);

/// What a profile runs and at which sizes.
#[derive(Debug, Clone)]
struct Plan {
    scenarios: Vec<What>,
    clients: usize,
    step: Duration,
    s1_points: Vec<usize>,
    s2_rates_20: Vec<f64>,
    s2_rates_1: Vec<f64>,
    s3_rates: Vec<f64>,
    s3_probes: usize,
    s7_seconds: f64,
    s5: S5Plan,
}

impl Plan {
    fn new(what: What, clients: Option<usize>, seconds: Option<f64>) -> Plan {
        let full = what == What::Full;
        let smoke = what == What::Smoke;
        let scenarios = match what {
            What::Quick | What::Full => vec![
                What::S0,
                What::S1,
                What::S2,
                What::S6,
                What::S2Ws,
                What::S3,
                What::S4,
                What::S7,
                What::S5,
            ],
            What::Smoke => vec![What::S0, What::S2, What::S3, What::S4],
            What::S5Smoke => vec![What::S5],
            // Ratios need the floor of the same run.
            What::S2 => vec![What::S0, What::S2],
            What::S2Ws => vec![What::S0, What::S2Ws],
            What::S6 => vec![What::S2, What::S6],
            other => vec![other],
        };
        let default_clients = if smoke { 50 } else { 19_000 };
        let clients = clients.unwrap_or(default_clients).max(1);
        let step = seconds.unwrap_or(if full {
            10.0
        } else if smoke {
            1.0
        } else {
            3.0
        });
        let mut s1_points: Vec<usize> = [1_000, 5_000, 10_000, 19_000]
            .into_iter()
            .filter(|&p| p < clients)
            .collect();
        s1_points.push(clients);
        Plan {
            scenarios,
            clients,
            step: Duration::from_secs_f64(step.max(0.1)),
            s1_points,
            s2_rates_20: if smoke {
                vec![10.0]
            } else if full {
                vec![
                    1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 80.0, 120.0, 160.0, 200.0,
                ]
            } else {
                vec![2.0, 5.0, 10.0, 20.0, 40.0, 80.0, 120.0, 160.0]
            },
            s2_rates_1: if smoke {
                vec![20.0]
            } else if full {
                vec![
                    10.0, 20.0, 50.0, 100.0, 200.0, 300.0, 400.0, 600.0, 800.0, 1200.0,
                ]
            } else {
                vec![20.0, 50.0, 100.0, 200.0, 400.0, 800.0]
            },
            s3_rates: if smoke {
                vec![200.0]
            } else if full {
                vec![1_000.0, 5_000.0, 10_000.0, 20_000.0]
            } else {
                vec![1_000.0, 10_000.0]
            },
            s3_probes: clients.min(1_000),
            s7_seconds: if full { 40.0 } else { 20.0 },
            s5: if what == What::S5Smoke {
                S5Plan {
                    rooms: 2,
                    members: 5,
                    probe_every: 2,
                    room_rates: vec![5.0],
                    room_min_seconds: 1.0,
                    key_clients: 10,
                    key_rates: vec![50.0],
                    key_callers: vec![4],
                    seconds: seconds.unwrap_or(1.0),
                }
            } else {
                S5Plan {
                    rooms: 10,
                    members: if full { 100 } else { 50 },
                    probe_every: 5,
                    room_rates: vec![1.0, 10.0, 100.0],
                    room_min_seconds: if full { 30.0 } else { 10.0 },
                    key_clients: 200,
                    key_rates: vec![1_000.0, 3_000.0, 10_000.0],
                    // At most one caller per key client (200).
                    key_callers: if full {
                        vec![16, 64, 200]
                    } else {
                        vec![64, 200]
                    },
                    seconds: step.max(if full { 10.0 } else { 5.0 }),
                }
            },
        }
    }
}

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
    kept: Option<(Comet, Generator, CometClient<Channel>, i32)>,
    /// The highest S2 rate (20 frames/push) that comet kept up with.
    s2_sustained_rate: Option<f64>,
    /// Redis and Kafka for S5, when given.
    services: Option<Services>,
    /// Count system calls with `perf stat` as well.
    perf: bool,
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
        server_core,
        gen_core,
        no_pin,
        sweep_ms,
        probe_every,
        redis,
        kafka,
        perf_syscalls,
    } = args;
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
    let mut plan = Plan::new(what, clients, seconds);
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
            _ => Ok(()),
        };
        if let Err(err) = result {
            let msg = format!("{scenario:?} failed: {}", chain(&err));
            eprintln!("herald bench: {msg}");
            ctx.report.notes.push(msg);
            if matches!(what, What::Smoke | What::S5Smoke) {
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
    Ok(())
}

fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        s.push_str(": ");
        s.push_str(&e.to_string());
        source = e.source();
    }
    s
}

/// The smoke profile passes only if every message of every step arrived, in
/// order, at every client, for both the floor and comet, and every storm
/// client authenticated.
fn smoke_check(report: &Report) -> Result<()> {
    let mut problems = Vec::new();
    for (name, key) in [
        ("s0", "runs"),
        ("s2", "steps"),
        ("s3", "steps"),
        ("s3", "floor_steps"),
    ] {
        let Some(steps) = report.scenarios.get(name).and_then(|s| s[key].as_array()) else {
            problems.push(format!("{name} has no {key}"));
            continue;
        };
        if steps.is_empty() {
            problems.push(format!("{name} has no {key}"));
        }
        for step in steps {
            let delivered = step["delivered"].as_u64();
            let expected = step["expected"].as_u64();
            if delivered.is_none() || delivered != expected || expected == Some(0) {
                problems.push(format!("{name}: delivered {delivered:?} of {expected:?}"));
            }
            if step["lost"].as_u64() != Some(0) || step["reordered"].as_u64() != Some(0) {
                problems.push(format!(
                    "{name}: lost {} reordered {}",
                    step["lost"], step["reordered"]
                ));
            }
        }
    }
    // S4: every storm against the floor and against comet authenticated
    // every client it opened, and each began after the server had let go of
    // every client of the one before (for comet: logic got every
    // `Disconnect`).
    let s4 = report.scenarios.get("s4");
    let storms = s4
        .and_then(|s| s["storms"].as_array())
        .map_or(&[][..], Vec::as_slice);
    for server in ["floor", "comet"] {
        let of_server: Vec<_> = storms.iter().filter(|s| s["server"] == server).collect();
        if of_server.len() != 1 + S4_RECONNECTS {
            problems.push(format!("s4: {} {server} storms", of_server.len()));
        }
        for storm in of_server {
            let connect = &storm["connect"];
            if connect["connected"] != connect["requested"] || connect["failed"] != 0 {
                problems.push(format!("s4 {server} storm: {connect}"));
            }
            if storm["previous_closed"] != true {
                problems.push(format!(
                    "s4 {server}: the last storm's closes were not all seen"
                ));
            }
        }
    }
    // And the call floor's `Connect` calls were all answered.
    let run = s4.map(|s| &s["call_floor"]["run"]);
    if !run.is_some_and(|run| {
        run["calls"].as_u64().is_some_and(|n| n > 0) && run["ok"] == run["calls"]
    }) {
        problems.push(format!("s4 call floor: {run:?}"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Smoke(problems.join("; ")))
    }
}

/// The S5 smoke passes only if every push accepted by logic reached every
/// client it was meant for (room members, key owners), through Kafka.
fn s5_smoke_check(report: &Report) -> Result<()> {
    let mut problems = Vec::new();
    let Some(s5) = report.scenarios.get("s5") else {
        return Err(Error::Smoke("s5 has no record".to_owned()));
    };
    let steps = s5["room_steps"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(s5["key_steps"].as_array().into_iter().flatten())
        .chain(s5["capacity_steps"].as_array().into_iter().flatten());
    for step in steps {
        let delivered = step["delivered"].as_u64();
        let expected = step["expected"].as_u64();
        if delivered.is_none() || delivered != expected || expected == Some(0) {
            problems.push(format!("s5: delivered {delivered:?} of {expected:?}"));
        }
    }
    for floor in [&s5["kafka_floor"], &s5["kafka_floor_low_rate"]] {
        if floor["consumed"] != floor["scheduled"] || floor["scheduled"].as_u64() == Some(0) {
            problems.push(format!("s5 kafka floor: {floor}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Smoke(problems.join("; ")))
    }
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

async fn connect_comet(comet: &Comet) -> Result<CometClient<Channel>> {
    let channel = Channel::from_shared(format!("http://{}", comet.grpc))
        .map_err(|_| Error::Smoke(format!("bad gRPC address {}", comet.grpc)))?
        .connect()
        .await
        .map_err(Error::Channel)?;
    Ok(CometClient::new(channel))
}

fn start_comet(ctx: &Ctx, extra: &[String]) -> Result<Comet> {
    Ok(Comet::start(
        &ctx.binary,
        ctx.server_core,
        ctx.stub,
        "bench",
        &ctx.out,
        extra,
    )?)
}

// ------------------------------------------------------------------ S0

async fn s0(ctx: &mut Ctx) -> Result<()> {
    let n = ctx.plan.clients;
    let mut floor = FloorProc::start(&ctx.binary, n, ctx.server_core)?;
    let mut generator = Generator::new(ctx.clock, ctx.sweep);
    let connect = generator
        .connect(
            floor.addr(),
            specs(1, n, "", Transport::Tcp, false, ctx.probe_every),
            CONNECT_CONCURRENCY,
        )
        .await;
    generator.start_sweeping();
    let mut runs = Vec::new();
    let mut seq = 1;
    for fpp in [20, 1] {
        let before = generator.totals();
        let g0 = self_sample();
        floor.run(fpp, ctx.plan.step, seq)?;
        let run = loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if let Some(run) = floor.try_result() {
                break run?;
            }
        };
        let (total, _) = generator
            .wait_delivered(before.messages + run.messages, DRAIN_IDLE)
            .await;
        let g = g0.since(&self_sample());
        let after = generator.totals();
        seq = run.next_seq;
        let mut value = serde_json::to_value(run).unwrap_or_default();
        value["delivered"] = json!(total - before.messages);
        value["expected"] = json!(run.messages);
        value["lost"] = json!(after.lost - before.lost);
        value["reordered"] = json!(after.reordered - before.reordered);
        // The generator's CPU over the floor run and its drain: it must stay
        // well under one core for the floor to be the kernel's, not ours.
        value["generator_cpu_share"] = json!(g.share);
        value["generator_cpu"] = json!(g);
        value["loadavg"] = json!(proc::loadavg());
        eprintln!(
            "  floor {fpp} frames/push: {:.0} writes/s, {:.0} msgs/s, floor cpu {:.0} %, generator cpu {:.0} %",
            run.writes_per_sec,
            run.messages_per_sec,
            run.cpu_share * 100.0,
            g.share * 100.0
        );
        ctx.floor.insert(fpp, run);
        runs.push(value);
    }
    generator.close_all().await;
    drop(floor);
    let gen_share = runs
        .iter()
        .filter_map(|r| r["generator_cpu_share"].as_f64())
        .fold(0.0, f64::max);
    ctx.report.targets.push(Target {
        scenario: "S0",
        target: "generator keeps up with the floor",
        goal: "≤ 70 % of its core".to_owned(),
        figure: format!("{:.0} % of a core", gen_share * 100.0),
        value: Some(gen_share * 100.0),
        floor_ratio: None,
        met: Some(gen_share <= 0.70),
        loadavg: proc::loadavg(),
    });
    ctx.report.scenarios.insert(
        "s0".to_owned(),
        json!({ "connect": connect, "runs": runs, "first_error": generator.first_error() }),
    );
    Ok(())
}

// ------------------------------------------------------------------ S1

async fn s1(ctx: &mut Ctx) -> Result<()> {
    let mut series = Vec::new();
    for transport in [Transport::Tcp, Transport::Ws] {
        let comet = start_comet(ctx, &[])?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut generator = Generator::new(ctx.clock, ctx.sweep);
        let mut points = vec![json!({"connections": 0, "rss_bytes": comet.rss()})];
        let mut xy = Vec::new();
        let mut connected = 0;
        let mut mid = 1_000_000;
        let mut first_error = None;
        for &point in &ctx.plan.s1_points {
            let add = point.saturating_sub(connected);
            let stats = generator
                .connect(
                    match transport {
                        Transport::Tcp => comet.tcp,
                        Transport::Ws => comet.ws,
                    },
                    specs(mid, add, "live://idle", transport, true, usize::MAX),
                    CONNECT_CONCURRENCY,
                )
                .await;
            mid += add as u64;
            connected += stats.connected;
            // Let allocator and session tasks settle before reading RSS.
            tokio::time::sleep(Duration::from_millis(1_000)).await;
            let rss = comet.rss();
            xy.push((connected as f64, rss as f64));
            points
                .push(json!({"connections": connected, "rss_bytes": rss, "failed": stats.failed}));
            if first_error.is_none() {
                first_error = generator.first_error().map(str::to_owned);
            }
        }
        generator.start_sweeping();
        let c0 = comet.sample();
        tokio::time::sleep(ctx.plan.step).await;
        let idle = c0.since(&comet.sample());
        let slope = report::slope(&xy);
        eprintln!(
            "  {transport:?}: {connected} idle connections, {:.0} B/conn, idle cpu {:.2} %",
            slope.unwrap_or(f64::NAN),
            idle.share * 100.0
        );
        if transport == Transport::Tcp {
            ctx.report.targets.push(Target {
                scenario: "S1",
                target: "idle memory per TCP connection (RSS slope)",
                goal: "≤ 2 KiB".to_owned(),
                figure: format!("{:.0} B", slope.unwrap_or(f64::NAN)),
                value: slope,
                floor_ratio: None,
                met: slope.map(|s| s <= 2048.0),
                loadavg: proc::loadavg(),
            });
        } else {
            ctx.report.targets.push(Target {
                scenario: "S1",
                target: "idle memory per WebSocket connection (RSS slope)",
                goal: "(no target; reported)".to_owned(),
                figure: format!("{:.0} B", slope.unwrap_or(f64::NAN)),
                value: slope,
                floor_ratio: None,
                met: None,
                loadavg: proc::loadavg(),
            });
        }
        ctx.report.targets.push(Target {
            scenario: "S1",
            target: match transport {
                Transport::Tcp => "idle CPU, TCP connections",
                Transport::Ws => "idle CPU, WebSocket connections",
            },
            goal: "(no target; reported)".to_owned(),
            figure: format!("{:.2} % of a core at {connected}", idle.share * 100.0),
            value: Some(idle.share * 100.0),
            floor_ratio: None,
            met: None,
            loadavg: proc::loadavg(),
        });
        series.push(json!({
            "transport": transport,
            "points": points,
            "slope_bytes_per_connection": slope,
            "idle_cpu": idle,
            "first_error": first_error,
        }));
        generator.close_all().await;
        drop(comet);
    }
    ctx.report
        .scenarios
        .insert("s1".to_owned(), json!({ "series": series }));
    Ok(())
}

// ------------------------------------------------------------------ S2

/// The BroadcastRoom request for push `i` carrying `fpp` messages from `seq`.
fn room_push(room: &str, fpp: usize, seq: i32, sched_ns: u64) -> BroadcastRoomReq {
    let proto = if fpp == 1 {
        Proto {
            ver: 1,
            op: BENCH_OP,
            seq,
            body: wire::message_body(seq, sched_ns).into(),
        }
    } else {
        let mut batch = Vec::with_capacity(fpp * wire::MSG_LEN);
        for k in 0..fpp {
            wire::put_message(&mut batch, seq + k as i32, sched_ns);
        }
        raw_proto(batch.into())
    };
    BroadcastRoomReq {
        room_id: room.to_owned(),
        proto: Some(proto),
    }
}

/// One measured step: injects, waits for delivery, returns its record.
#[allow(clippy::too_many_arguments)]
async fn room_step(
    generator: &Generator,
    comet: &Comet,
    client: &CometClient<Channel>,
    clock: Clock,
    room: &str,
    members: u64,
    fpp: usize,
    rate: f64,
    step: Duration,
    seq: &mut i32,
    perf_dir: Option<&std::path::Path>,
) -> serde_json::Value {
    let counting = perf_start(perf_dir, comet).await;
    let before = generator.totals();
    let _ = generator.take_latency();
    let c0 = comet.sample();
    let g0 = self_sample();
    let base = *seq;
    let injected = inject::run(client, clock, rate, step, Order::Serial, |i, sched| {
        Call::Room(room_push(
            room,
            fpp,
            base + (i as usize * fpp) as i32,
            sched,
        ))
    })
    .await;
    *seq = base + (injected.scheduled as usize * fpp) as i32;
    let expected = injected.ok * members * fpp as u64;
    let (total, last) = generator
        .wait_delivered(before.messages + expected, DRAIN_IDLE)
        .await;
    let cpu = c0.since(&comet.sample());
    let counted = counting.and_then(PerfCount::stop);
    let g = g0.since(&self_sample());
    let after: Totals = generator.totals();
    let delivered = total - before.messages;
    let started = injected.started.unwrap_or(last);
    let window = last
        .saturating_duration_since(started)
        .as_secs_f64()
        .max(1e-3);
    let comet_cpu_s = cpu.user_s + cpu.system_s;
    let latency = Percentiles::of(&generator.take_latency());
    let rpc = injected
        .rpc_latency
        .as_ref()
        .map(Percentiles::of)
        .unwrap_or_default();
    let ratio = if expected == 0 {
        0.0
    } else {
        delivered as f64 / expected as f64
    };
    eprintln!(
        "  {fpp} frames/push at {rate}/s: {:.0} msgs/s delivered ({ratio:.3} of expected), comet cpu {:.0} %, p99 {:.0} µs",
        delivered as f64 / window,
        comet_cpu_s / window * 100.0,
        latency.p99_us
    );
    json!({
        "frames_per_push": fpp,
        "members": members,
        "offered_pushes_per_sec": rate,
        "injected": injected,
        "expected": expected,
        "delivered": delivered,
        "delivered_ratio": ratio,
        "lost": after.lost - before.lost,
        "reordered": after.reordered - before.reordered,
        "closed": after.active_closed - before.active_closed,
        "window_seconds": window,
        "expected_messages_per_sec": rate * members as f64 * fpp as f64,
        "delivered_messages_per_sec": delivered as f64 / window,
        "delivered_writes_per_sec": delivered as f64 / fpp as f64 / window,
        "comet_cpu": cpu,
        "comet_syscalls_per_message": cpu.syscalls_per(delivered),
        "comet_perf_syscalls_per_message": per(counted, delivered),
        "comet_cpu_share": comet_cpu_s / window,
        "messages_per_comet_cpu_second": if comet_cpu_s > 0.0 { delivered as f64 / comet_cpu_s } else { f64::NAN },
        "generator_cpu_share": g.share,
        "latency": latency,
        "rpc_latency": rpc,
        "comet_rss_bytes": comet.rss(),
        "loadavg": proc::loadavg(),
    })
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

/// Probe p99 past which a fan-out step counts as behind: a second of
/// backlog is where comet's queues (256 KiB at ~115 KB/s per member at the
/// highest rates) start to close members as slow consumers, which would
/// leave the later steps a smaller room.
const BEHIND_P99_US: f64 = 1_000_000.0;

/// A step fell behind: not everything delivered, delivery took clearly
/// longer than the step, or probes waited over [`BEHIND_P99_US`]. A busy core
/// alone is not behind: comet's writer coalesces queued pushes, so a core at
/// 95 % can still take a higher rate (a CPU cut-off made the reported maximum
/// depend on a percent of noise).
fn saturated(step: &serde_json::Value, duration: Duration) -> bool {
    let ratio = step["delivered_ratio"].as_f64().unwrap_or(0.0);
    let window = step["window_seconds"].as_f64().unwrap_or(f64::MAX);
    let p99 = step["latency"]["p99_us"].as_f64().unwrap_or(0.0);
    ratio < 0.999 || window > duration.as_secs_f64() * 1.25 + 0.5 || p99 > BEHIND_P99_US
}

/// S2 over `transport`: TCP rows go to `s2` (and keep the population for
/// S6), WebSocket rows to `s2_ws`.
async fn s2(ctx: &mut Ctx, transport: Transport) -> Result<()> {
    let n = ctx.plan.clients;
    let ws = transport == Transport::Ws;
    let room = "live://bench";
    let comet = start_comet(ctx, &[])?;
    let mut generator = Generator::new(ctx.clock, ctx.sweep);
    let connect = generator
        .connect(
            if ws { comet.ws } else { comet.tcp },
            specs(1, n, room, transport, true, ctx.probe_every),
            CONNECT_CONCURRENCY,
        )
        .await;
    let members = connect.connected as u64;
    let client = connect_comet(&comet).await?;
    generator.start_sweeping();
    let mut steps = Vec::new();
    let mut seq = 1;
    let mut best: HashMap<usize, f64> = HashMap::new();
    // Messages per second of comet CPU at the step with the most load that
    // was fully delivered: the per-core capacity even when not saturated.
    let mut per_cpu: HashMap<usize, f64> = HashMap::new();
    for (fpp, rates) in [
        (20, ctx.plan.s2_rates_20.clone()),
        (1, ctx.plan.s2_rates_1.clone()),
    ] {
        for rate in rates {
            let step = room_step(
                &generator,
                &comet,
                &client,
                ctx.clock,
                room,
                members,
                fpp,
                rate,
                ctx.plan.step,
                &mut seq,
                ctx.perf.then_some(ctx.out.as_path()),
            )
            .await;
            let sat = saturated(&step, ctx.plan.step);
            if fpp == 20 && !sat && !ws {
                ctx.s2_sustained_rate = Some(rate);
            }
            // The figure is the best rate comet kept up with, not one it
            // delivered only with seconds of backlog.
            if !sat {
                let v = step["delivered_messages_per_sec"].as_f64().unwrap_or(0.0);
                let e = best.entry(fpp).or_insert(0.0);
                if v > *e {
                    *e = v;
                    per_cpu.insert(
                        fpp,
                        step["messages_per_comet_cpu_second"]
                            .as_f64()
                            .unwrap_or(f64::NAN),
                    );
                }
            }
            steps.push(step);
            // The first step behind ends the ramp: the next, higher rate
            // would overload comet, whose full queues then close members as
            // slow consumers and leave later steps (and S6) a smaller room.
            if sat {
                break;
            }
        }
    }
    for fpp in [20usize, 1] {
        let figure = best.get(&fpp).copied();
        let floor = ctx.floor.get(&fpp).map(|f| f.messages_per_sec);
        let ratio = figure.zip(floor).map(|(c, f)| c / f);
        let (target, goal, met) = if ws {
            (
                if fpp == 20 {
                    "room fan-out over WebSocket, 20 frames/push, messages/s on one core"
                } else {
                    "room fan-out over WebSocket, 1 frame/push, messages/s on one core"
                },
                "(no target; reported)".to_owned(),
                None,
            )
        } else if fpp == 20 {
            (
                "room fan-out, 20 frames/push, messages/s on one core",
                "≥ 3.4 M/s and ≥ 75 % of floor".to_owned(),
                figure.map(|v| v >= 3.4e6 && ratio.is_none_or(|r| r >= 0.75)),
            )
        } else {
            (
                "room fan-out, 1 frame/push, messages/s on one core",
                "(no target; reported)".to_owned(),
                None,
            )
        };
        ctx.report.targets.push(Target {
            scenario: if ws { "S2 ws" } else { "S2" },
            target,
            goal,
            figure: format!(
                "{:.2} M/s at {members} members ({:.2} M per comet CPU-second)",
                figure.unwrap_or(f64::NAN) / 1e6,
                per_cpu.get(&fpp).copied().unwrap_or(f64::NAN) / 1e6
            ),
            value: figure,
            floor_ratio: ratio,
            met,
            loadavg: proc::loadavg(),
        });
    }
    ctx.report.scenarios.insert(
        if ws { "s2_ws" } else { "s2" }.to_owned(),
        json!({
            "transport": transport,
            "connect": connect,
            "members": members,
            "steps": steps,
            "first_error": generator.first_error(),
        }),
    );
    if !ws && ctx.plan.scenarios.contains(&What::S6) {
        ctx.kept = Some((comet, generator, client, seq));
    } else {
        generator.close_all().await;
    }
    Ok(())
}

// ------------------------------------------------------------------ S5

async fn s5(ctx: &mut Ctx) -> Result<()> {
    let Some(services) = ctx.services.clone() else {
        return Err(crate::s5::Error::NoServices.into());
    };
    let outcome = crate::s5::run(crate::s5::Setup {
        binary: &ctx.binary,
        core: ctx.server_core,
        out: &ctx.out,
        clock: ctx.clock,
        sweep: ctx.sweep,
        services: &services,
        plan: &ctx.plan.s5,
        perf: ctx.perf,
    })
    .await?;
    ctx.report.targets.extend(outcome.targets);
    ctx.report.scenarios.insert("s5".to_owned(), outcome.record);
    Ok(())
}

// ------------------------------------------------------------------ S6

async fn s6(ctx: &mut Ctx) -> Result<()> {
    let Some((comet, mut generator, client, mut seq)) = ctx.kept.take() else {
        return Err(Error::Smoke(
            "S6 runs on S2's population; S2 did not keep one".to_owned(),
        ));
    };
    let members = generator.totals().open;
    let mut runs = Vec::new();
    for speed in [0, (members / 2).max(1) as i32] {
        let before = generator.totals();
        let _ = generator.take_latency();
        let sent = Instant::now();
        let sched_ns = ctx.clock.at(sent);
        let mut client = client.clone();
        let reply = client
            .broadcast(BroadcastReq {
                proto_op: BENCH_OP,
                proto: Some(Proto {
                    ver: 1,
                    op: BENCH_OP,
                    seq,
                    body: wire::message_body(seq, sched_ns).into(),
                }),
                speed,
            })
            .await;
        seq += 1;
        let (total, last) = generator
            .wait_delivered(before.messages + members, DRAIN_IDLE)
            .await;
        let delivered = total - before.messages;
        let completion = last.saturating_duration_since(sent).as_secs_f64();
        let latency = Percentiles::of(&generator.take_latency());
        eprintln!(
            "  broadcast speed {speed}: {delivered}/{members} in {:.3} s",
            completion
        );
        runs.push(json!({
            "speed": speed,
            "members": members,
            "delivered": delivered,
            "error": reply.err().map(|s| s.to_string()),
            "completion_seconds": completion,
            "probe_latency": latency,
            "loadavg": proc::loadavg(),
        }));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Some(first) = runs.first() {
        let secs = first["completion_seconds"].as_f64();
        ctx.report.targets.push(Target {
            scenario: "S6",
            target: "broadcast completion time (speed 0 = unthrottled)",
            goal: "(no target; reported)".to_owned(),
            figure: format!(
                "{:.0} ms to {} connections",
                secs.unwrap_or(f64::NAN) * 1e3,
                members
            ),
            value: secs,
            floor_ratio: None,
            met: None,
            loadavg: proc::loadavg(),
        });
    }
    ctx.report
        .scenarios
        .insert("s6".to_owned(), json!({ "runs": runs }));
    generator.close_all().await;
    drop(comet);
    Ok(())
}

// ------------------------------------------------------------------ S3

async fn s3(ctx: &mut Ctx) -> Result<()> {
    let probes = ctx.plan.s3_probes;
    let comet = start_comet(ctx, &[])?;
    let mut generator = Generator::new(ctx.clock, ctx.sweep);
    let first_mid = 3_000_000;
    let connect = generator
        .connect(
            comet.tcp,
            specs(first_mid, probes, "live://s3", Transport::Tcp, true, 1),
            CONNECT_CONCURRENCY,
        )
        .await;
    let client = connect_comet(&comet).await?;
    generator.start_sweeping();
    let keys: Vec<String> = (0..probes as u64)
        .map(|i| wire::key(first_mid + i))
        .collect();
    let mut seqs = vec![0i32; probes];
    let mut steps = Vec::new();
    for &rate in &ctx.plan.s3_rates {
        let counting = perf_start(ctx.perf.then_some(ctx.out.as_path()), &comet).await;
        let before = generator.totals();
        let _ = generator.take_latency();
        let c0 = comet.sample();
        let injected = inject::run(
            &client,
            ctx.clock,
            rate,
            ctx.plan.step,
            Order::Concurrent,
            |i, sched| {
                let k = (i as usize) % keys.len().max(1);
                seqs[k] += 1;
                let seq = seqs[k];
                Call::Push(PushMsgReq {
                    keys: vec![keys[k].clone()],
                    proto: Some(Proto {
                        ver: 1,
                        op: BENCH_OP,
                        seq,
                        body: wire::message_body(seq, sched).into(),
                    }),
                    proto_op: BENCH_OP,
                })
            },
        )
        .await;
        let mut step = settled(&generator, before, injected.ok, "PushMsg", rate).await;
        let cpu = c0.since(&comet.sample());
        let counted = counting.and_then(PerfCount::stop);
        step["rpc_latency"] = json!(injected.rpc_latency.as_ref().map(Percentiles::of));
        step["comet_cpu"] = json!(cpu);
        step["comet_syscalls_per_push"] = json!(cpu.syscalls_per(injected.ok));
        step["comet_perf_syscalls_per_push"] = json!(per(counted, injected.ok));
        step["comet_cpu_share"] = json!(cpu.share);
        step["injected"] = json!(injected);
        steps.push(step);
    }
    let first_error = generator.first_error().map(str::to_owned);
    generator.close_all().await;
    drop(comet);
    let floor = s3_floor(ctx, probes).await?;
    let p99_at = |steps: &[serde_json::Value], rate: f64| {
        steps
            .iter()
            .find(|s| s["rate"].as_f64() == Some(rate))
            .map(|s| {
                (
                    s["latency"]["p99_us"].as_f64().unwrap_or(f64::NAN),
                    s["delivered"] == s["expected"],
                )
            })
    };
    let at_10k = p99_at(&steps, 10_000.0);
    let floor_at_10k = p99_at(&floor, 10_000.0).map(|(p99, _)| p99);
    ctx.report.targets.push(Target {
        scenario: "S3",
        target: "single-key PushMsg at 10k/s, client-observed p99",
        goal: "≤ 500 µs".to_owned(),
        figure: match (at_10k, floor_at_10k) {
            (Some((p99, _)), Some(floor)) => {
                format!("{p99:.0} µs (floor relay {floor:.0} µs)")
            }
            (Some((p99, _)), None) => format!("{p99:.0} µs"),
            (None, _) => "not run".to_owned(),
        },
        value: at_10k.map(|(p99, _)| p99),
        floor_ratio: at_10k
            .zip(floor_at_10k)
            .map(|((p99, _), floor)| p99 / floor),
        met: at_10k.map(|(p99, all)| p99 <= 500.0 && all),
        loadavg: proc::loadavg(),
    });
    ctx.report.scenarios.insert(
        "s3".to_owned(),
        json!({
            "connect": connect,
            "probes": probes,
            "steps": steps,
            "floor_steps": floor,
            "first_error": first_error,
        }),
    );
    Ok(())
}

/// S3's floor: the same probes, rates and open-loop schedule against
/// `floor-relay` on the server core, which copies each pre-encoded frame
/// from the injector's connection to its client with a blocking read and
/// write. Its latency is what loopback TCP and the scheduling of two
/// processes cost on this machine at that rate, with no server in between;
/// on a virtual machine whose cores stall for milliseconds now and then,
/// those stalls set the tail for any server.
async fn s3_floor(ctx: &Ctx, probes: usize) -> Result<Vec<serde_json::Value>> {
    let floor = FloorProc::start_relay(&ctx.binary, probes, ctx.server_core)?;
    let mut generator = Generator::new(ctx.clock, ctx.sweep);
    let clients = specs(1, probes, "", Transport::Tcp, false, 1)
        .into_iter()
        .map(|spec| ClientSpec {
            probe: true,
            ..spec
        })
        .collect();
    let connect = generator
        .connect(floor.addr(), clients, CONNECT_CONCURRENCY)
        .await;
    if connect.connected < probes {
        return Err(Error::Floor(crate::floor::Error::Command(format!(
            "floor relay: {} of {probes} clients connected: {}",
            connect.connected,
            generator.first_error().unwrap_or("?")
        ))));
    }
    let relay = inject::FloorRelay::connect(floor.addr())
        .await
        .map_err(|source| crate::floor::Error::Io {
            step: "connect to the floor relay",
            source,
        })?;
    let mut seqs = vec![0i32; probes];
    let mut steps = Vec::new();
    for &rate in &ctx.plan.s3_rates {
        let before = generator.totals();
        let _ = generator.take_latency();
        let injected = inject::run(
            &relay,
            ctx.clock,
            rate,
            ctx.plan.step,
            Order::Concurrent,
            |i, sched| {
                let k = (i as usize) % probes.max(1);
                seqs[k] += 1;
                let mut frame = Vec::with_capacity(wire::MSG_LEN);
                wire::put_message(&mut frame, seqs[k], sched);
                inject::RelayCall {
                    index: k as u32,
                    frame,
                }
            },
        )
        .await;
        steps.push(settled(&generator, before, injected.ok, "floor relay", rate).await);
    }
    drop(relay);
    generator.close_all().await;
    drop(floor);
    Ok(steps)
}

/// Waits until the probes have `expected` more messages than at `before`
/// (or went quiet), then returns the step's record: rate, expected and
/// delivered messages, loss, reorders, latency and the load average.
async fn settled(
    generator: &Generator,
    before: Totals,
    expected: u64,
    label: &str,
    rate: f64,
) -> serde_json::Value {
    let (total, _) = generator
        .wait_delivered(before.messages + expected, DRAIN_IDLE)
        .await;
    let after = generator.totals();
    let latency = Percentiles::of(&generator.take_latency());
    eprintln!(
        "  {label} at {rate}/s: p50 {:.0} µs, p99 {:.0} µs, delivered {}/{expected}",
        latency.p50_us,
        latency.p99_us,
        total - before.messages,
    );
    json!({
        "rate": rate,
        "expected": expected,
        "delivered": total - before.messages,
        "lost": after.lost - before.lost,
        "reordered": after.reordered - before.reordered,
        "latency": latency,
        "loadavg": proc::loadavg(),
    })
}

// ------------------------------------------------------------------ S4

/// Reconnect storms per S4 run: one storm lasts about a second, where a
/// few milliseconds of stalled core move the figure by several per cent, so
/// the reconnect figure pools the CPU and connections of several storms.
const S4_RECONNECTS: usize = 4;

/// Storms of one kind added up, for a figure over all of them.
#[derive(Debug, Default, Clone, Copy)]
struct StormPool {
    connections: f64,
    server_cpu_s: f64,
    wall_s: f64,
    /// The busiest the generator was in any of them, as a share of its core.
    generator_share: f64,
    failed: usize,
}

/// Server CPU below which a storm's per-core rate is not computed: five
/// clock ticks, the resolution of `/proc`'s CPU times (a 50-client smoke
/// storm takes a few milliseconds).
const STORM_MIN_CPU_S: f64 = 0.05;

/// `value` times `scale` with `decimals` decimals, or "?" when there is
/// none (a figure too small to measure).
fn shown(value: Option<f64>, scale: f64, decimals: usize) -> String {
    value.map_or_else(|| "?".to_owned(), |v| format!("{:.*}", decimals, v * scale))
}

/// Connections per second of server CPU, when the CPU is measurable.
fn per_core(connections: f64, cpu_s: f64) -> Option<f64> {
    (cpu_s >= STORM_MIN_CPU_S).then(|| connections / cpu_s)
}

impl StormPool {
    /// Connections per second of server CPU.
    fn per_core(&self) -> Option<f64> {
        per_core(self.connections, self.server_cpu_s)
    }

    /// Connections per second of wall time.
    fn rate(&self) -> f64 {
        self.connections / self.wall_s.max(1e-9)
    }
}

/// What S4's storms connect to, and how the benchmark knows every client
/// it closed is gone from it before the next storm.
#[derive(Debug, Clone, Copy)]
enum StormServer<'a> {
    /// Comet: each close ends in a `Disconnect` to the stub logic.
    Comet(&'a Calls),
    /// The handshake floor: its descriptors fall back to `base`.
    Floor { base: usize },
}

impl StormServer<'_> {
    /// Closes the server has reported so far (comet's `Disconnect`s).
    fn closes(self) -> u64 {
        match self {
            StormServer::Comet(calls) => calls.disconnects.load(Ordering::Relaxed),
            StormServer::Floor { .. } => 0,
        }
    }

    /// Waits (at most 30 s) until the `n` clients just closed are gone from
    /// process `pid`, `closes_before` being [`StormServer::closes`] before
    /// they closed; `false` when they were not (for comet: a `Disconnect`
    /// was lost).
    async fn wait_closed(self, pid: u32, n: usize, closes_before: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let gone = match self {
                StormServer::Comet(_) => self.closes() >= closes_before + n as u64,
                StormServer::Floor { base } => proc::open_fds(pid).is_none_or(|fds| fds <= base),
            };
            if gone {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}

/// One connect storm and [`S4_RECONNECTS`] reconnect storms of `ctx`'s
/// client population against `target` (process `pid`); returns the pooled
/// figures (first storm, reconnect storms) and each storm's record.
async fn storms(
    ctx: &Ctx,
    label: &str,
    target: SocketAddr,
    pid: u32,
    server: StormServer<'_>,
) -> ([StormPool; 2], Vec<serde_json::Value>, Option<String>) {
    let n = ctx.plan.clients;
    let mut generator = Generator::new(ctx.clock, ctx.sweep);
    let mut records = Vec::new();
    let mut pooled = [StormPool::default(); 2];
    for round in 0..=S4_RECONNECTS {
        let kind = if round == 0 { "connect" } else { "reconnect" };
        // Whether the server let go of every client of the last storm.
        let mut previous_closed = true;
        if round > 0 {
            let closes = server.closes();
            generator.close_all().await;
            // Every close handled first, so the storm measures connects,
            // not a backlog of disconnects.
            previous_closed = server.wait_closed(pid, n, closes).await;
            if !previous_closed {
                eprintln!("  {label}: not every client of the last storm was let go within 30 s");
            }
        }
        let s0 = Sample::take(pid);
        let g0 = self_sample();
        let stats = generator
            .connect(
                target,
                specs(
                    4_000_000,
                    n,
                    "live://storm",
                    Transport::Tcp,
                    true,
                    usize::MAX,
                ),
                CONNECT_CONCURRENCY,
            )
            .await;
        let cpu = s0.since(&Sample::take(pid));
        let g = g0.since(&self_sample());
        let per_core = per_core(stats.connected as f64, cpu.user_s + cpu.system_s);
        eprintln!(
            "  {label} {kind} storm: {:.0} conns/s, {label} cpu {:.0} % -> {} conns/s per {label} core, generator cpu {:.0} %",
            stats.per_second,
            cpu.share * 100.0,
            shown(per_core, 1.0, 0),
            g.share * 100.0
        );
        let pool = &mut pooled[usize::from(round > 0)];
        pool.connections += stats.connected as f64;
        pool.server_cpu_s += cpu.user_s + cpu.system_s;
        pool.wall_s += stats.seconds;
        pool.generator_share = pool.generator_share.max(g.share);
        pool.failed += stats.failed;
        records.push(json!({
            "server": label,
            "kind": kind,
            "previous_closed": previous_closed,
            "connect": stats,
            "server_cpu": cpu,
            "per_server_core": per_core,
            "generator_cpu": g,
            "loadavg": proc::loadavg(),
        }));
    }
    let first_error = generator.first_error().map(str::to_owned);
    generator.close_all().await;
    (pooled, records, first_error)
}

/// S4: connection storms against comet (with the stub logic answering
/// `Connect` and `Disconnect`), after the same storms against the
/// handshake floor on the same core, whose per-core rate is the most any
/// server could reach on this machine at that moment.
async fn s4(ctx: &mut Ctx) -> Result<()> {
    let floor = FloorProc::start_handshake(&ctx.binary, ctx.server_core)?;
    let base = proc::open_fds(floor.pid()).unwrap_or(0);
    let (floor_pools, mut records, floor_error) = storms(
        ctx,
        "floor",
        floor.addr(),
        floor.pid(),
        StormServer::Floor { base },
    )
    .await;
    drop(floor);
    let calls = call_floor(ctx).await?;
    let comet = start_comet(ctx, &[])?;
    let (pools, comet_records, first_error) = storms(
        ctx,
        "comet",
        comet.tcp,
        comet.pid,
        StormServer::Comet(&ctx.calls),
    )
    .await;
    drop(comet);
    records.extend(comet_records);
    for record in &records {
        if record["previous_closed"] != true {
            ctx.report.notes.push(format!(
                "S4: {} had not let go of every client of the previous storm after 30 s (for comet: logic did not get every Disconnect)",
                record["server"]
            ));
        }
    }
    let k = |rate: Option<f64>| shown(rate, 1e-3, 1);
    // A connection on the handshake floor, then its `Connect` call: the
    // least per connection for a server that asks logic, as comet must.
    let call_s = calls["cpu_per_call_s"].as_f64();
    for (i, (pool, floor_pool)) in pools.into_iter().zip(floor_pools).enumerate() {
        let per_core = pool.per_core();
        let floor_per_core = floor_pool.per_core().filter(|_| floor_pool.failed == 0);
        let with_call = floor_per_core
            .zip(call_s)
            .map(|(floor, call)| 1.0 / (1.0 / floor + call));
        ctx.report.targets.push(Target {
            scenario: "S4",
            target: if i == 0 {
                "connection storm, authenticated conns/s per comet core"
            } else {
                "reconnect storms (pooled), authenticated conns/s per comet core"
            },
            goal: "≥ 25 k/s".to_owned(),
            figure: format!(
                "{} k/s ({:.1} k/s at {:.0} % comet CPU{}; generator up to {:.0} %); handshake floor {} k/s per core, {} k/s with its `Connect` call ({} µs of CPU per call)",
                k(per_core),
                pool.rate() / 1e3,
                100.0 * pool.server_cpu_s / pool.wall_s.max(1e-9),
                if i == 0 {
                    String::new()
                } else {
                    format!(", {S4_RECONNECTS} storms")
                },
                pool.generator_share * 100.0,
                k(floor_per_core),
                k(with_call),
                shown(call_s, 1e6, 1),
            ),
            value: per_core,
            floor_ratio: per_core.zip(with_call).map(|(c, f)| c / f),
            met: per_core.map(|c| c >= 25_000.0 && pool.failed == 0),
            loadavg: proc::loadavg(),
        });
    }
    ctx.report.scenarios.insert(
        "s4".to_owned(),
        json!({
            "storms": records,
            "call_floor": calls,
            "first_error": first_error,
            "floor_first_error": floor_error,
        }),
    );
    Ok(())
}

/// S4's call floor: as many `Connect` calls as the storms make, from a
/// plain tonic client on the server core to the stub logic, with as many
/// in flight as the storms have handshakes; its CPU per call.
async fn call_floor(ctx: &Ctx) -> Result<serde_json::Value> {
    let mut floor = CallFloor::start(&ctx.binary, ctx.server_core)?;
    let calls = (ctx.plan.clients * (1 + S4_RECONNECTS)) as u64;
    // A first small batch opens the connection, which the floor keeps,
    // outside the measurement.
    floor.run(ctx.stub, 100, 100).await?;
    let s0 = Sample::take(floor.pid());
    let run = floor.run(ctx.stub, calls, CONNECT_CONCURRENCY).await?;
    let cpu = s0.since(&Sample::take(floor.pid()));
    let cpu_s = cpu.user_s + cpu.system_s;
    let per_call = (run.ok == run.calls && cpu_s >= STORM_MIN_CPU_S).then(|| cpu_s / run.ok as f64);
    eprintln!(
        "  call floor: {} of {} Connect calls answered in {:.2} s, {} µs of CPU per call",
        run.ok,
        run.calls,
        run.seconds,
        shown(per_call, 1e6, 1),
    );
    Ok(json!({ "run": run, "cpu": cpu, "cpu_per_call_s": per_call }))
}

// ------------------------------------------------------------------ S7

/// Comet's per-connection queue in S7: small enough that a client that
/// stops reading overflows it within the run, so the bound shows.
const S7_QUEUE_BYTES: u64 = 32 * 1024;
/// The slow clients' receive buffer (the kernel doubles it): small, so
/// their bytes back up into comet's queue instead of the kernel's.
const S7_RCVBUF: u32 = 4 * 1024;
/// S7's population: the room gets 20 pushes/s of 20 frames (12.8 KB/s per
/// client, 2 M messages/s in all, well under S2's capacity) and the
/// generator must read everything the others get.
const S7_CLIENTS: usize = 5_000;
const S7_RATE: f64 = 20.0;

async fn s7(ctx: &mut Ctx) -> Result<()> {
    let n = ctx.plan.clients.min(S7_CLIENTS);
    let slow = (n / 100).max(1);
    let room = "live://slow";
    let rate = S7_RATE;
    let comet = start_comet(
        ctx,
        &["--queue-bytes".to_owned(), S7_QUEUE_BYTES.to_string()],
    )?;
    let mut generator = Generator::new(ctx.clock, ctx.sweep);
    let mut connect = generator
        .connect(
            comet.tcp,
            specs(5_000_000, n - slow, room, Transport::Tcp, true, usize::MAX),
            CONNECT_CONCURRENCY,
        )
        .await;
    // The slow clients connect last, so they are the sinks paused below.
    let mut slow_specs = specs(6_000_000, slow, room, Transport::Tcp, true, usize::MAX);
    for spec in &mut slow_specs {
        spec.rcvbuf = Some(S7_RCVBUF);
    }
    let slow_connect = generator
        .connect(comet.tcp, slow_specs, CONNECT_CONCURRENCY)
        .await;
    connect.connected += slow_connect.connected;
    connect.failed += slow_connect.failed;
    let client = connect_comet(&comet).await?;
    generator.start_sweeping();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let paused = generator.pause_last(slow_connect.connected) as u64;
    let members = connect.connected as u64;
    let active = members - paused;
    let rss_before = comet.rss();
    let disconnects = ctx.calls.disconnects.load(Ordering::Relaxed);
    let before = generator.totals();
    let fpp = 20;
    let rss_max = std::rc::Rc::new(std::cell::Cell::new(rss_before));
    let watcher = {
        let rss_max = rss_max.clone();
        let pid = comet.pid;
        tokio::task::spawn_local(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                rss_max.set(rss_max.get().max(proc::rss(pid).unwrap_or(0)));
            }
        })
    };
    let duration = Duration::from_secs_f64(ctx.plan.s7_seconds);
    let injected = inject::run(
        &client,
        ctx.clock,
        rate,
        duration,
        Order::Serial,
        |i, sched| Call::Room(room_push(room, fpp, 1 + (i as usize * fpp) as i32, sched)),
    )
    .await;
    let expected_active = injected.ok * active * fpp as u64;
    // Paused clients keep their unread bytes; wait for the active ones only.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let t = generator.totals();
        if t.active_messages - before.active_messages >= expected_active
            || Instant::now() > deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    watcher.abort();
    let after = generator.totals();
    let rss_after = comet.rss();
    let closed_by_comet = ctx.calls.disconnects.load(Ordering::Relaxed) - disconnects;
    let delivered_active = after.active_messages - before.active_messages;
    let growth = rss_max.get().saturating_sub(rss_before);
    eprintln!(
        "  slow consumers: {paused} paused, {closed_by_comet} closed by comet, active delivered {delivered_active}/{expected_active}, lost {}, RSS +{} KiB",
        after.active_lost - before.active_lost,
        growth / 1024
    );
    let active_closed = after.active_closed - before.active_closed;
    let ok = delivered_active == expected_active
        && after.active_lost == before.active_lost
        && active_closed == 0;
    ctx.report.targets.push(Target {
        scenario: "S7",
        target: "1 % slow consumers: others unaffected, memory bounded",
        goal: "others get everything, none of them closed; slow ones closed; RSS bounded"
            .to_owned(),
        figure: format!(
            "{delivered_active}/{expected_active} delivered to {active} others ({active_closed} of them closed); {closed_by_comet} closed by comet of {paused} slow; RSS peak +{:.1} MiB ({:.0} KiB per slow client)",
            growth as f64 / 1048576.0,
            growth as f64 / 1024.0 / paused.max(1) as f64
        ),
        value: Some(delivered_active as f64 / expected_active.max(1) as f64),
        floor_ratio: None,
        met: Some(ok),
        loadavg: proc::loadavg(),
    });
    ctx.report.scenarios.insert(
        "s7".to_owned(),
        json!({
            "connect": connect,
            "members": members,
            "paused": paused,
            "pushes_per_sec": rate,
            "frames_per_push": fpp,
            "comet_queue_bytes": S7_QUEUE_BYTES,
            "client_rcvbuf": S7_RCVBUF,
            "injected": injected,
            "expected_active": expected_active,
            "delivered_active": delivered_active,
            "active_lost": after.active_lost - before.active_lost,
            "active_closed": active_closed,
            "closed_by_comet": closed_by_comet,
            "rss_before": rss_before,
            "rss_peak": rss_max.get(),
            "rss_after": rss_after,
            "loadavg": proc::loadavg(),
        }),
    );
    generator.close_all().await;
    drop(comet);
    Ok(())
}
