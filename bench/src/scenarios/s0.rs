//! S0: the kernel floor. The fan-out floor process writes pre-encoded
//! frames to the whole population at 20 and 1 frames per push; its rates
//! are what S2's ratios are taken against, and the generator's CPU here
//! shows it keeps up.

use std::time::Duration;

use serde_json::json;

use super::{CONNECT_CONCURRENCY, Ctx, DRAIN_IDLE, self_sample, specs};
use crate::Result;
use crate::floor::FloorProc;
use crate::load::{Generator, Transport};
use crate::proc;
use crate::report::Target;

pub(super) async fn s0(ctx: &mut Ctx) -> Result<()> {
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
