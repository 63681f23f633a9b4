//! S6: broadcast. One `Broadcast` to S2's population, unthrottled and at a
//! speed limit; the time until the last client has it.

use std::time::{Duration, Instant};

use herald_protocol::pb::{BroadcastReq, Proto};
use serde_json::json;

use super::{Ctx, DRAIN_IDLE};
use crate::report::{Percentiles, Target};
use crate::wire::{self, BENCH_OP};
use crate::{Error, Result, proc};

pub(super) async fn s6(ctx: &mut Ctx) -> Result<()> {
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
