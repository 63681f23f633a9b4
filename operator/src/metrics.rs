//! The operator's Prometheus metrics, served on `/metrics` by
//! `herald_runtime::admin`. Labels are low-cardinality: outcomes, error
//! kinds, and `namespace`/`pushcluster` on the per-PushCluster gauges (one
//! series per PushCluster the operator manages, so bounded by their number).
//! Not `cluster`: multi-cluster Prometheus setups use that label for the
//! Kubernetes cluster. `namespace` is the PushCluster's, as kube-state-metrics
//! does it: scrape with `honor_labels` (the chart's monitors set it), else it
//! arrives as `exported_namespace`.
//!
//! What an SRE alerts on (docs/operator.md lists every metric):
//! `herald_operator_reconcile_errors_total` by failed step,
//! `herald_operator_reconcile_duration_seconds`,
//! `herald_operator_cluster_degraded`, `herald_operator_cluster_connections`
//! and `herald_operator_cluster_draining_comets`.

use std::time::Instant;

use kube::ResourceExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::crd::PushCluster;

type Labels = Vec<(String, String)>;

/// Counters and gauges of one operator process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    reconcile_ok: Counter,
    reconcile_errors: Family<Labels, Counter>,
    reconcile_duration: Histogram,
    poll_errors: Counter,
    leader: Gauge,
    connections: Family<Labels, Gauge>,
    draining: Family<Labels, Gauge>,
    degraded: Family<Labels, Gauge>,
    http_refusals: herald_runtime::http::Refusals,
    /// `(namespace, name)` of every cluster with series, so those of a
    /// cluster that is gone can be found and dropped.
    observed: std::sync::Mutex<std::collections::BTreeSet<(String, String)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("herald_operator");
        let reconciles = Counter::default();
        let reconcile_ok = Counter::default();
        let reconcile_errors = Family::<Labels, Counter>::default();
        // 1 ms .. ~16 s: a pass is a handful of apiserver calls plus one Load
        // call per comet (2 s timeout each), so slow comets show at the top.
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let poll_errors = Counter::default();
        let leader = Gauge::default();
        let connections = Family::<Labels, Gauge>::default();
        let draining = Family::<Labels, Gauge>::default();
        let degraded = Family::<Labels, Gauge>::default();
        registry.register("reconciles", "Reconcile passes started", reconciles.clone());
        registry.register(
            "reconcile_ok",
            "Reconcile passes that finished",
            reconcile_ok.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconcile passes that failed, by failed step",
            reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile pass took, failed passes included",
            reconcile_duration.clone(),
        );
        registry.register(
            "comet_poll_errors",
            "Comet Load calls that failed",
            poll_errors.clone(),
        );
        registry.register(
            "leader",
            "1 while this instance holds the lease",
            leader.clone(),
        );
        registry.register(
            "cluster_connections",
            "Client connections of a PushCluster's comets, as its status last reported",
            connections.clone(),
        );
        registry.register(
            "cluster_draining_comets",
            "Comets of a PushCluster being drained, as its status last reported",
            draining.clone(),
        );
        registry.register(
            "cluster_degraded",
            "1 while a PushCluster's Degraded condition is True",
            degraded.clone(),
        );
        let http_refusals = herald_runtime::http::Refusals::register(&mut registry);
        Self {
            registry,
            reconciles,
            reconcile_ok,
            reconcile_errors,
            reconcile_duration,
            poll_errors,
            leader,
            connections,
            draining,
            degraded,
            http_refusals,
            observed: std::sync::Mutex::default(),
        }
    }
}

/// One reconcile pass in progress: records its duration when dropped, so a
/// pass that returns early with an error is timed too.
#[must_use = "the pass is timed until this is dropped"]
#[derive(Debug)]
pub struct Pass<'a> {
    metrics: &'a Metrics,
    started: Instant,
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.metrics
            .reconcile_duration
            .observe(self.started.elapsed().as_secs_f64());
    }
}

fn cluster_labels(namespace: &str, name: &str) -> Labels {
    vec![
        ("namespace".to_owned(), namespace.to_owned()),
        ("pushcluster".to_owned(), name.to_owned()),
    ]
}

impl Metrics {
    /// A pass over `cluster` starts: counts it, reports the cluster's state
    /// from its status (what the last pass wrote; a status write triggers the
    /// next pass, so this lags by one watch event), and times the pass until
    /// the returned [`Pass`] is dropped.
    pub fn reconcile_started(&self, cluster: &PushCluster) -> Pass<'_> {
        self.reconciles.inc();
        self.observe_cluster(cluster);
        Pass {
            metrics: self,
            started: Instant::now(),
        }
    }
    pub(crate) fn reconcile_ok(&self) {
        self.reconcile_ok.inc();
    }
    pub(crate) fn reconcile_error(&self, kind: &'static str) {
        self.reconcile_errors
            .get_or_create(&vec![("step".to_owned(), kind.to_owned())])
            .inc();
    }
    pub(crate) fn poll_error(&self) {
        self.poll_errors.inc();
    }
    /// Whether this instance leads. Losing the lease also drops the
    /// per-cluster series: a standby must not report stale state.
    pub(crate) fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
        if !leader {
            self.connections.clear();
            self.draining.clear();
            self.degraded.clear();
            self.observed().clear();
        }
    }

    /// Sets the per-cluster gauges from `cluster`'s status (zero when it has
    /// none yet).
    pub fn observe_cluster(&self, cluster: &PushCluster) {
        let namespace = cluster.namespace().unwrap_or_default();
        let labels = cluster_labels(&namespace, &cluster.name_any());
        self.observed().insert((namespace, cluster.name_any()));
        let status = cluster.status.clone().unwrap_or_default();
        let degraded = status
            .conditions
            .iter()
            .any(|c| c.type_ == "Degraded" && c.status == "True");
        self.connections
            .get_or_create(&labels)
            .set(status.total_connections);
        self.draining
            .get_or_create(&labels)
            .set(i64::from(status.draining_comets));
        self.degraded
            .get_or_create(&labels)
            .set(i64::from(degraded));
    }

    /// Drops the series of a PushCluster that is gone (for its deletion
    /// path), so the gauges stay bounded by the clusters that exist.
    pub fn forget_cluster(&self, namespace: &str, name: &str) {
        self.observed()
            .remove(&(namespace.to_owned(), name.to_owned()));
        let labels = cluster_labels(namespace, name);
        self.connections.remove(&labels);
        self.draining.remove(&labels);
        self.degraded.remove(&labels);
    }

    /// Drops the series of every cluster `exists` says is gone: a cluster
    /// deleted without passing through the operator's finalizer (removed by
    /// hand, or deleted before the finalizer was added) gets no teardown
    /// pass that would forget it.
    pub fn retain_clusters(&self, exists: impl Fn(&str, &str) -> bool) {
        let gone: Vec<(String, String)> = self
            .observed()
            .iter()
            .filter(|(namespace, name)| !exists(namespace, name))
            .cloned()
            .collect();
        for (namespace, name) in gone {
            self.forget_cluster(&namespace, &name);
        }
    }

    fn observed(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<(String, String)>> {
        self.observed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reconcile passes started by this process: what tests use to see which
    /// of two instances acts.
    pub fn reconciles(&self) -> u64 {
        self.reconciles.get()
    }
    /// Whether this process holds the lease now.
    pub fn is_leader(&self) -> bool {
        self.leader.get() == 1
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        herald_runtime::admin::encode(&self.registry)
    }
}

/// What the operator's admin endpoints report. Ready as soon as it serves:
/// a standby replica is healthy too, and leadership is a metric
/// (`herald_operator_leader`), not a reason to take the pod out of service.
impl herald_runtime::admin::Health for Metrics {
    fn metrics(&self) -> String {
        self.encode()
    }

    async fn ready(&self) -> Result<(), String> {
        Ok(())
    }

    fn http_refusals(&self) -> herald_runtime::http::Refusals {
        self.http_refusals.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(connections: i64, draining: i32, degraded: bool) -> PushCluster {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "herald.dev/v1alpha1", "kind": "PushCluster",
            "metadata": {"name": "chat", "namespace": "team"},
            "spec": {"image": "herald:1", "redis": {"addr": "r:6379"},
                     "kafka": {"brokers": ["k:9092"]}},
            "status": {"totalConnections": connections, "drainingComets": draining,
                       "conditions": [{"type": "Degraded",
                                       "status": if degraded { "True" } else { "False" },
                                       "reason": "R", "message": "", "lastTransitionTime": ""}]}
        }))
        .expect("a PushCluster")
    }

    fn sample<'a>(text: &'a str, name: &str) -> Option<&'a str> {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
    }

    /// The admin listener's refusals land in the registry `/metrics` shows.
    #[test]
    fn admin_refusals_are_in_the_registry() {
        use herald_runtime::admin::Health;
        let metrics = Metrics::default();
        metrics
            .http_refusals()
            .count("admin", herald_runtime::http::Refusal::Connections);
        let text = metrics.encode();
        assert_eq!(
            sample(
                &text,
                r#"herald_operator_http_refused_total{listener="admin",reason="connections"}"#
            ),
            Some("1"),
            "{text}"
        );
    }

    #[test]
    fn a_pass_reports_its_cluster_and_its_duration() {
        let metrics = Metrics::default();
        drop(metrics.reconcile_started(&cluster(33, 1, true)));
        let text = metrics.encode();
        let series = r#"{namespace="team",pushcluster="chat"}"#;
        assert_eq!(
            sample(
                &text,
                &format!("herald_operator_cluster_connections{series}")
            ),
            Some("33"),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                &format!("herald_operator_cluster_draining_comets{series}")
            ),
            Some("1")
        );
        assert_eq!(
            sample(&text, &format!("herald_operator_cluster_degraded{series}")),
            Some("1")
        );
        assert_eq!(
            sample(&text, "herald_operator_reconcile_duration_seconds_count"),
            Some("1")
        );
        drop(metrics.reconcile_started(&cluster(40, 0, false)));
        let text = metrics.encode();
        assert_eq!(
            sample(&text, &format!("herald_operator_cluster_degraded{series}")),
            Some("0")
        );
        assert_eq!(
            sample(
                &text,
                &format!("herald_operator_cluster_connections{series}")
            ),
            Some("40")
        );
        metrics.forget_cluster("team", "chat");
        assert!(!metrics.encode().contains(series));
        // Gone without a teardown pass: dropped once the cache lacks it.
        drop(metrics.reconcile_started(&cluster(2, 0, false)));
        metrics.retain_clusters(|namespace, name| (namespace, name) == ("team", "chat"));
        assert!(metrics.encode().contains(series), "still there: kept");
        metrics.retain_clusters(|_, _| false);
        assert!(!metrics.encode().contains(series));
        drop(metrics.reconcile_started(&cluster(1, 0, false)));
        metrics.set_leader(false);
        assert!(
            !metrics.encode().contains(series),
            "a standby reports no cluster"
        );
    }
}
