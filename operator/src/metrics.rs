//! The operator's Prometheus metrics, served on `/metrics` by
//! `herald_runtime::admin`. Labels are low-cardinality: outcomes and error kinds only.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// Counters and gauges of one operator process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    reconcile_ok: Counter,
    reconcile_errors: Family<Labels, Counter>,
    poll_errors: Counter,
    leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("herald_operator");
        let reconciles = Counter::default();
        let reconcile_ok = Counter::default();
        let reconcile_errors = Family::<Labels, Counter>::default();
        let poll_errors = Counter::default();
        let leader = Gauge::default();
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
            "comet_poll_errors",
            "Comet Load calls that failed",
            poll_errors.clone(),
        );
        registry.register(
            "leader",
            "1 while this instance holds the lease",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            reconcile_ok,
            reconcile_errors,
            poll_errors,
            leader,
        }
    }
}

impl Metrics {
    pub(crate) fn reconcile_started(&self) {
        self.reconciles.inc();
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
    pub(crate) fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
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
}
