//! S2: room fan-out. `BroadcastRoom` pushes of 20 and 1 frames to one room
//! holding the whole population, at rising rates until comet falls behind;
//! the best rate it kept up with, against S0's floor. The TCP population is
//! kept for S6.

use std::collections::HashMap;
use std::time::Duration;

use herald_protocol::pb::{BroadcastRoomReq, CometClient, Proto};
use herald_protocol::ws::raw_proto;
use herald_runtime::grpc_auth::AuthChannel;
use serde_json::json;

use super::{
    CONNECT_CONCURRENCY, Ctx, DRAIN_IDLE, connect_comet, per, perf_start, self_sample, specs,
    start_comet,
};
use crate::inject::{self, Call, Order};
use crate::load::{Clock, Generator, Totals, Transport};
use crate::proc::{self, PerfCount};
use crate::report::{Percentiles, Target};
use crate::server::Comet;
use crate::wire::{self, BENCH_OP};
use crate::{Result, What};

/// The BroadcastRoom request for push `i` carrying `fpp` messages from `seq`.
pub(super) fn room_push(room: &str, fpp: usize, seq: i32, sched_ns: u64) -> BroadcastRoomReq {
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
    client: &CometClient<AuthChannel>,
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
pub(super) async fn s2(ctx: &mut Ctx, transport: Transport) -> Result<()> {
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
    let client = connect_comet(ctx, &comet).await?;
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
