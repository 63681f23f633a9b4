//! S4: connection storms. The population connects (and reconnects) at
//! once against the handshake floor, then against comet; comet's
//! authenticated connections per core are compared with the floor plus a
//! plain client's `Connect` call (the call floor).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{CONNECT_CONCURRENCY, Ctx, self_sample, specs, start_comet};
use crate::Result;
use crate::floor::{CallFloor, FloorProc};
use crate::load::{Generator, Transport};
use crate::proc::{self, Sample};
use crate::report::Target;
use crate::stub::Calls;

/// Reconnect storms per S4 run: one storm lasts about a second, where a
/// few milliseconds of stalled core move the figure by several per cent, so
/// the reconnect figure pools the CPU and connections of several storms.
pub(super) const S4_RECONNECTS: usize = 4;

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
pub(super) async fn s4(ctx: &mut Ctx) -> Result<()> {
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
