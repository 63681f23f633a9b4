//! S1: idle connections. Comet's RSS as TCP and WebSocket populations
//! grow (the slope is the memory per connection) and its CPU while they
//! sit idle.

use std::time::Duration;

use serde_json::json;

use super::{CONNECT_CONCURRENCY, Ctx, specs, start_comet};
use crate::Result;
use crate::load::{Generator, Transport};
use crate::proc;
use crate::report::{self, Target};

pub(super) async fn s1(ctx: &mut Ctx) -> Result<()> {
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
