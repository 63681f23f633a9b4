//! One single-key step ([`KeyRun`]): pushes spread over the key clients,
//! open loop at a rate or closed loop with a number of callers, and its
//! record (delivery, order, latency, cost).

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;

use super::DRAIN_IDLE;
use super::cluster::Cluster;
use super::cost::{per_push, perf_start, perf_stop};
use crate::inject::{self, Order};
use crate::load::{Clock, Generator};
use crate::proc;
use crate::report::Percentiles;
use crate::wire;

/// How a single-key step sends.
#[derive(Debug, Clone, Copy)]
pub(super) enum KeyLoad {
    /// Open loop at this many pushes per second.
    Rate(f64),
    /// Closed loop with this many callers.
    Callers(usize),
}

/// One single-key step: pushes spread over `keys`, each key's pushes
/// numbered on from `key_seq` so order is checked across steps.
pub(super) struct KeyRun<'a> {
    /// How the step's line on stderr starts.
    pub(super) label: &'static str,
    pub(super) cluster: &'a Cluster,
    pub(super) clock: Clock,
    pub(super) load: KeyLoad,
    pub(super) duration: Duration,
    pub(super) keys: &'a [String],
    pub(super) perf: bool,
    pub(super) out: &'a Path,
}

impl KeyRun<'_> {
    pub(super) async fn measure(
        &self,
        generator: &mut Generator,
        key_seq: &mut [i32],
    ) -> serde_json::Value {
        let keys = self.keys;
        let counting = perf_start(self.perf, self.cluster.pids(), self.out).await;
        let before = generator.totals();
        let _ = generator.take_latency();
        let s0 = self.cluster.samples();
        let mut make = |k: usize, sched| {
            key_seq[k] += 1;
            let key = keys.get(k).map(String::as_str).unwrap_or("none");
            super::steps::key_post(key, Bytes::from(wire::message_body(key_seq[k], sched)))
        };
        let http = &self.cluster.http;
        let n_keys = keys.len().max(1);
        let load = match self.load {
            KeyLoad::Callers(n) => KeyLoad::Callers(n.clamp(1, n_keys)),
            rate => rate,
        };
        let injected = match load {
            KeyLoad::Rate(rate) => {
                let each = |i: u64, sched| make(i as usize % n_keys, sched);
                inject::run(
                    http,
                    self.clock,
                    rate,
                    self.duration,
                    Order::Concurrent,
                    each,
                )
                .await
            }
            // Caller c owns keys c, c + n, c + 2n, ...: a key's next push
            // is sent only once its last one was answered, so order holds
            // here as it would for a backend pushing each user from one task.
            KeyLoad::Callers(n) => {
                let each = |c: usize, j: u64, sched| {
                    let owned = (n_keys - c).div_ceil(n);
                    make(c + (j as usize % owned) * n, sched)
                };
                inject::run_closed(http, self.clock, n, self.duration, each).await
            }
        };
        let (rate, callers) = match load {
            KeyLoad::Rate(rate) => (rate, None),
            KeyLoad::Callers(n) => (injected.ok as f64 / injected.seconds.max(1e-9), Some(n)),
        };
        let (total, _) = generator
            .wait_delivered(before.messages + injected.ok, DRAIN_IDLE)
            .await;
        let s1 = self.cluster.samples();
        let counted = perf_stop(counting);
        let after = generator.totals();
        let delivered = total - before.messages;
        let latency = Percentiles::of(&generator.take_latency());
        let cost = per_push(&s0, &s1, counted, delivered);
        eprintln!(
            "  {}{} {rate:.0}/s: delivered {delivered}/{}, p50 {:.0} µs, p99 {:.0} µs, {:.0} µs CPU/push",
            self.label,
            callers.map_or(String::new(), |n| format!(", {n} callers,")),
            injected.ok,
            latency.p50_us,
            latency.p99_us,
            cost["cpu_us_per_push"]
        );
        json!({
            // Offered (open loop) or reached (closed loop).
            "rate": rate,
            "callers": callers,
            "keys": keys.len(),
            "injected": injected,
            "expected": injected.ok,
            "delivered": delivered,
            // As for rooms: accepted and never delivered. A key's pushes
            // overlap in flight (concurrent HTTP requests have no order),
            // so once logic is behind they may be accepted out of order:
            // `reordered` then counts the injector's overlap, not the path's.
            "lost": injected.ok.saturating_sub(delivered),
            "gaps": after.lost - before.lost,
            "reordered": after.reordered - before.reordered,
            "refused": injected.errors,
            "latency": latency,
            "http_latency": injected.rpc_latency.as_ref().map(Percentiles::of),
            "cost": cost,
            "loadavg": proc::loadavg(),
        })
    }
}
