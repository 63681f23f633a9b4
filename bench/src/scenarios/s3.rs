//! S3: single-key pushes. `PushMsg` to one probe at a time at rising rates,
//! client-observed latency; then the same schedule through the floor relay,
//! whose latency is loopback TCP's and the scheduler's alone.

use herald_protocol::pb::{Proto, PushMsgReq};
use serde_json::json;

use super::{
    CONNECT_CONCURRENCY, Ctx, DRAIN_IDLE, connect_comet, per, perf_start, specs, start_comet,
};
use crate::floor::FloorProc;
use crate::inject::{self, Call, Order};
use crate::load::{ClientSpec, Generator, Totals, Transport};
use crate::proc::{self, PerfCount};
use crate::report::{Percentiles, Target};
use crate::wire::{self, BENCH_OP};
use crate::{Error, Result};

pub(super) async fn s3(ctx: &mut Ctx) -> Result<()> {
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
    let client = connect_comet(ctx, &comet).await?;
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
