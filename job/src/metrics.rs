//! Prometheus metrics, and what job's admin endpoints (`/metrics`,
//! `/healthz`, `/readyz`, served by `herald_runtime::admin`) report.
//!
//! Labels are low-cardinality: push type, rpc, reason, and the comet name
//! (bounded by the node list, not by traffic). Names that come from records
//! (an unknown comet in a PUSH record, rooms, keys) are never labels.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use std::collections::BTreeSet;
use std::sync::{Mutex, PoisonError};

use crate::Poison;
use crate::comets::{Stats, StatsSnapshot};

type Label = [(&'static str, &'static str); 1];
type CometLabel = [(&'static str, String); 1];
type CometReason = [(&'static str, String); 2];
type Latency = Family<Label, Histogram, fn() -> Histogram>;

/// Every job metric, registered once in [`Metrics::new`] under `herald_job`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    records: Counter,
    delivered: Family<Label, Counter>,
    call_failures: Family<CometLabel, Counter>,
    retries: Family<CometLabel, Counter>,
    drops: Family<CometReason, Counter>,
    unknown_comet: Counter,
    poison: Family<Label, Counter>,
    dead_lettered: Counter,
    dead_letter_failures: Counter,
    room_skips: Family<CometLabel, Counter>,
    calls_ok: Counter,
    room_batches: Counter,
    room_batch_frames: Counter,
    push_batches: Counter,
    push_batched: Counter,
    call_seconds: Latency,
    in_flight: Gauge,
    lag: Gauge,
    http_refusals: herald_runtime::http::Refusals,
    /// Comet names seen in comet-labelled drops and skips, so the snapshot
    /// can sum those families (bounded by the node list; std Mutex: only
    /// held to insert or copy).
    comets: Mutex<BTreeSet<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~4 s: loopback calls sit at the bottom, timeouts at the top.
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

impl Metrics {
    /// A fresh registry with every job metric in it.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("herald_job");
        let records = Counter::default();
        registry.register(
            "records_consumed",
            "Records taken from the source (poison included)",
            records.clone(),
        );
        let delivered = Family::<Label, Counter>::default();
        registry.register(
            "pushes_delivered",
            "Records whose comet calls all finished, by push type",
            delivered.clone(),
        );
        let call_failures = Family::<CometLabel, Counter>::default();
        registry.register(
            "comet_call_failures",
            "Failed comet gRPC calls (each attempt), by comet",
            call_failures.clone(),
        );
        let retries = Family::<CometLabel, Counter>::default();
        registry.register(
            "comet_call_retries",
            "Comet gRPC calls retried after a transient failure, by comet",
            retries.clone(),
        );
        let drops = Family::<CometReason, Counter>::default();
        registry.register(
            "comet_call_drops",
            "Comet calls given up for good, by comet and reason",
            drops.clone(),
        );
        let unknown_comet = Counter::default();
        registry.register(
            "unknown_comet_drops",
            "PUSH records for a comet not in the list (dropped)",
            unknown_comet.clone(),
        );
        let poison = Family::<Label, Counter>::default();
        registry.register(
            "poison_records",
            "Records that can never be delivered, by reason",
            poison.clone(),
        );
        let dead_lettered = Counter::default();
        registry.register(
            "dead_lettered",
            "Poison records written to the dead-letter topic",
            dead_lettered.clone(),
        );
        let dead_letter_failures = Counter::default();
        registry.register(
            "dead_letter_failures",
            "Failed dead-letter writes (retried; the offset waits)",
            dead_letter_failures.clone(),
        );
        let room_skips = Family::<CometLabel, Counter>::default();
        registry.register(
            "room_sends_skipped",
            "Room pushes not sent to a comet whose fresh Rooms answer lacks the room",
            room_skips.clone(),
        );
        let mut counter = |name: &str, help: &str| {
            let counter = Counter::default();
            registry.register(name, help, counter.clone());
            counter
        };
        let calls_ok = counter("comet_calls_ok", "Comet gRPC calls that succeeded");
        let room_batches = counter(
            "room_batches",
            "BroadcastRoom calls delivered (each one batch of room frames)",
        );
        let room_batch_frames = counter(
            "room_batch_frames",
            "Room frames carried by delivered BroadcastRoom calls",
        );
        let push_batches = counter(
            "push_batches",
            "PushMsgs calls delivered (single-key pushes batched)",
        );
        let push_batched = counter(
            "push_batched",
            "Single-key pushes carried by delivered PushMsgs calls",
        );
        let call_seconds: Latency = Family::new_with_constructor(latency_histogram);
        registry.register(
            "comet_call_seconds",
            "Latency of one comet gRPC attempt, by rpc",
            call_seconds.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "records_in_flight",
            "Records being delivered",
            in_flight.clone(),
        );
        let lag = Gauge::default();
        registry.register(
            "committed_offset_lag",
            "Records between the group's committed offsets and the partition ends \
             (librdkafka statistics, every few seconds)",
            lag.clone(),
        );
        let http_refusals = herald_runtime::http::Refusals::register(&mut registry);
        Metrics {
            registry,
            records,
            delivered,
            call_failures,
            retries,
            drops,
            unknown_comet,
            poison,
            dead_lettered,
            dead_letter_failures,
            room_skips,
            calls_ok,
            room_batches,
            room_batch_frames,
            push_batches,
            push_batched,
            call_seconds,
            in_flight,
            lag,
            http_refusals,
            comets: Mutex::default(),
        }
    }

    pub(crate) fn record(&self) {
        self.records.inc();
    }

    pub(crate) fn delivered(&self, kind: &'static str) {
        self.delivered.get_or_create(&[("type", kind)]).inc();
    }

    pub(crate) fn call_failed(&self, comet: &str) {
        self.call_failures
            .get_or_create(&[("comet", comet.to_owned())])
            .inc();
    }

    pub(crate) fn retry(&self, comet: &str) {
        self.retries
            .get_or_create(&[("comet", comet.to_owned())])
            .inc();
    }

    pub(crate) fn dropped(&self, comet: &str, reason: &'static str) {
        self.seen(comet);
        self.drops
            .get_or_create(&[("comet", comet.to_owned()), ("reason", reason.to_owned())])
            .inc();
    }

    pub(crate) fn unknown_comet(&self) {
        self.unknown_comet.inc();
    }

    pub(crate) fn poison(&self, reason: &'static str) {
        self.poison.get_or_create(&[("reason", reason)]).inc();
    }

    pub(crate) fn dead_lettered(&self) {
        self.dead_lettered.inc();
    }

    pub(crate) fn dead_letter_failed(&self) {
        self.dead_letter_failures.inc();
    }

    pub(crate) fn room_skipped(&self, comet: &str) {
        self.seen(comet);
        self.room_skips
            .get_or_create(&[("comet", comet.to_owned())])
            .inc();
    }

    pub(crate) fn call_ok(&self) {
        self.calls_ok.inc();
    }

    pub(crate) fn room_batch(&self, frames: u64) {
        self.room_batches.inc();
        self.room_batch_frames.inc_by(frames);
    }

    pub(crate) fn push_batch(&self, pushes: u64) {
        self.push_batches.inc();
        self.push_batched.inc_by(pushes);
    }

    fn seen(&self, comet: &str) {
        let mut comets = self.comets.lock().unwrap_or_else(PoisonError::into_inner);
        if !comets.contains(comet) {
            comets.insert(comet.to_owned());
        }
    }

    /// The counts so far, read from the registry's own counters: each event
    /// is counted once, and logs, tests and `/metrics` see the same figure.
    pub fn snapshot(&self) -> StatsSnapshot {
        let comets: Vec<String> = self
            .comets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect();
        let drops = |reason: &str| -> u64 {
            comets
                .iter()
                .filter_map(|c| {
                    let labels = [("comet", c.clone()), ("reason", reason.to_owned())];
                    self.drops.get(&labels).map(|m| m.get())
                })
                .sum()
        };
        let poison = Poison::ALL
            .iter()
            .filter_map(|p| self.poison.get(&[("reason", p.reason())]).map(|m| m.get()))
            .sum();
        let room_skipped = comets
            .iter()
            .filter_map(|c| {
                self.room_skips
                    .get(&[("comet", c.clone())])
                    .map(|m| m.get())
            })
            .sum();
        StatsSnapshot {
            records: self.records.get(),
            poison,
            unknown_comet: self.unknown_comet.get(),
            comet_gone: drops("comet_gone"),
            rejected: drops("rejected"),
            calls: self.calls_ok.get(),
            room_batches: self.room_batches.get(),
            room_frames: self.room_batch_frames.get(),
            push_batches: self.push_batches.get(),
            push_batched: self.push_batched.get(),
            dead_lettered: self.dead_lettered.get(),
            room_skipped,
            queue_full: drops("comet_queue_full"),
        }
    }

    pub(crate) fn call_took(&self, rpc: &'static str, took: Duration) {
        self.call_seconds
            .get_or_create(&[("rpc", rpc)])
            .observe(took.as_secs_f64());
    }

    pub(crate) fn set_in_flight(&self, n: usize) {
        self.in_flight.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub(crate) fn set_lag(&self, lag: i64) {
        self.lag.set(lag);
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        herald_runtime::admin::encode(&self.registry)
    }
}

/// What the admin endpoints read.
#[derive(Debug)]
pub(crate) struct Health {
    pub(crate) stats: Arc<Stats>,
    /// Set once the source can deliver: the Kafka consumer got its first
    /// partition assignment (an empty one counts: the group answered).
    pub(crate) ready: Arc<AtomicBool>,
    /// The brokers' last refusal of the SASL credentials (see `Job`).
    pub(crate) auth_failure: Arc<std::sync::Mutex<Option<String>>>,
}

impl herald_runtime::admin::Health for Health {
    fn metrics(&self) -> String {
        self.stats.metrics.encode()
    }

    fn http_refusals(&self) -> herald_runtime::http::Refusals {
        self.stats.metrics.http_refusals.clone()
    }

    /// Not ready until the consumer is assigned, so a rollout waits for a
    /// job that really consumes before it stops the old one.
    async fn ready(&self) -> Result<(), String> {
        use herald_runtime::contract::unready;
        let auth_failure = match self.auth_failure.lock() {
            Ok(failure) => failure.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        if self.ready.load(Ordering::SeqCst) {
            Ok(())
        } else if let Some(reason) = auth_failure {
            Err(unready::body(
                unready::KAFKA_AUTH_FAILED,
                format!("kafka refused the SASL credentials: {reason}"),
            ))
        } else {
            Err(herald_runtime::contract::unready::body(
                herald_runtime::contract::unready::KAFKA_NOT_ASSIGNED,
                "kafka consumer not assigned yet",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use herald_runtime::http::Refusal;

    /// The admin listener's refusals land in the registry `/metrics` shows.
    #[test]
    fn admin_refusals_are_in_the_registry() {
        let metrics = super::Metrics::new();
        metrics.http_refusals.count("admin", Refusal::Connections);
        let shown = metrics.encode();
        let series = format!(
            r#"herald_{}_http_refused_total{{listener="admin",reason="connections"}} 1"#,
            env!("CARGO_PKG_NAME").trim_start_matches("herald-")
        );
        assert!(shown.contains(&series), "{shown}");
    }
}
