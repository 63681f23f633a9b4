//! S7: slow consumers. One client in a hundred stops reading while its
//! room is pushed to; the others must get everything, the slow ones must be
//! closed by comet, and comet's memory must stay bounded.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;

use super::s2::room_push;
use super::{CONNECT_CONCURRENCY, Ctx, connect_comet, specs, start_comet};
use crate::Result;
use crate::inject::{self, Call, Order};
use crate::load::{Generator, Transport};
use crate::proc;
use crate::report::Target;

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

pub(super) async fn s7(ctx: &mut Ctx) -> Result<()> {
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
    let client = connect_comet(ctx, &comet).await?;
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
