//! Logic's Prometheus metrics, and what its probe routes (`/metrics`,
//! `/healthz`, `/readyz`, served beside the push API) report.
//!
//! Labels are fixed, low-cardinality strings (route template, status,
//! method, outcome); never keys, mids or rooms.

use herald_runtime::contract::unready;
use std::time::Duration;

use axum::http::StatusCode;
use herald_runtime::grpc_auth::Refusals;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::service::Service;

type Labels = Vec<(&'static str, String)>;
type Counters = Family<Labels, Counter>;

/// Logic's metrics, registered once in [`Metrics::new`].
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    http: Counters,
    grpc: Counters,
    records: Counters,
    produce: Histogram,
    upstream: Counters,
    node_list_generation: Gauge,
    node_list_nodes: Gauge,
    grpc_auth_refusals: Refusals,
    http_refusals: herald_runtime::http::Refusals,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh registry with every logic metric, prefixed `herald_logic`.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("herald_logic");
        let mut counter = |name: &str, help: &str| {
            let family = Counters::default();
            registry.register(name, help, family.clone());
            family
        };
        let http = counter("http_requests", "HTTP API requests, by route and status");
        let grpc = counter(
            "grpc_calls",
            "goim.logic.Logic calls, by method and outcome",
        );
        let records = counter(
            "push_records",
            "Push records written to the queue, by type and outcome",
        );
        let upstream = counter(
            "upstream_messages",
            "Client upstream messages (Receive), by outcome",
        );
        // 100 µs .. ~3.3 s: an in-process queue answers in microseconds,
        // Kafka with acks=all in milliseconds, a failing broker in seconds.
        let produce = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "produce_seconds",
            "Time from handing a record to the queue to its acknowledgement",
            produce.clone(),
        );
        let node_list_generation = Gauge::default();
        registry.register(
            "node_list_generation",
            "Generation of the node list in use",
            node_list_generation.clone(),
        );
        let node_list_nodes = Gauge::default();
        registry.register(
            "node_list_nodes",
            "Comets in the node list in use, draining included",
            node_list_nodes.clone(),
        );
        let grpc_auth_refusals = Refusals::register(&mut registry);
        let http_refusals = herald_runtime::http::Refusals::register(&mut registry);
        Metrics {
            registry,
            http,
            grpc,
            records,
            produce,
            upstream,
            node_list_generation,
            node_list_nodes,
            grpc_auth_refusals,
            http_refusals,
        }
    }

    pub(crate) fn http(&self, route: &str, status: StatusCode) {
        self.http
            .get_or_create(&vec![
                ("route", route.to_owned()),
                ("status", status.as_u16().to_string()),
            ])
            .inc();
    }

    pub(crate) fn grpc(&self, method: &'static str, ok: bool) {
        self.grpc
            .get_or_create(&vec![
                ("method", method.to_owned()),
                ("outcome", outcome(ok)),
            ])
            .inc();
    }

    /// The HTTP listeners' refusals (`http_refused_total{listener,reason}`).
    pub(crate) fn http_refusals(&self) -> herald_runtime::http::Refusals {
        self.http_refusals.clone()
    }

    /// The gRPC port's token refusals, for its token check.
    pub(crate) fn grpc_auth_refusals(&self) -> Refusals {
        self.grpc_auth_refusals.clone()
    }

    pub(crate) fn record(&self, kind: &'static str, ok: bool, took: Duration) {
        self.records
            .get_or_create(&vec![("type", kind.to_owned()), ("outcome", outcome(ok))])
            .inc();
        if ok {
            self.produce.observe(took.as_secs_f64());
        }
    }

    pub(crate) fn upstream(&self, outcome: &'static str) {
        self.upstream
            .get_or_create(&vec![("outcome", outcome.to_owned())])
            .inc();
    }

    /// Records the node list now in use.
    pub fn node_list(&self, generation: i64, nodes: usize) {
        self.node_list_generation.set(generation);
        self.node_list_nodes
            .set(i64::try_from(nodes).unwrap_or(i64::MAX));
    }

    /// The registry in OpenMetrics text format.
    pub fn encode(&self) -> String {
        herald_runtime::admin::encode(&self.registry)
    }
}

fn outcome(ok: bool) -> String {
    if ok { "ok" } else { "error" }.to_owned()
}

/// What logic's `/metrics` and `/readyz` report (served by
/// [`herald_runtime::admin::router`] beside the push API, outside the API
/// key: probes and scrapers hold none, and these routes show no user data).
impl herald_runtime::admin::Health for Service {
    fn metrics(&self) -> String {
        Service::metrics(self).encode()
    }

    fn http_refusals(&self) -> herald_runtime::http::Refusals {
        Service::metrics(self).http_refusals()
    }

    /// Ready when the session store and the push queue both answer: a logic
    /// that would refuse every push with 503 should not get traffic. The
    /// answer names the cause for the operator (`contract::unready`).
    async fn ready(&self) -> Result<(), String> {
        Service::ready(self)
            .await
            .map_err(|err| unready::body(unready_reason(&err), herald_runtime::error_chain(&err)))
    }
}

/// Which dependency a readiness failure is about.
fn unready_reason(err: &crate::service::Error) -> &'static str {
    use crate::service::Error;
    use crate::{queue, store};
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode;
    match err {
        Error::Store(store::Error::Redis(e))
            if e.kind() == redis::ErrorKind::AuthenticationFailed
                || e.code().is_some_and(|c| c == "NOAUTH" || c == "WRONGPASS") =>
        {
            unready::REDIS_AUTH_FAILED
        }
        Error::Store(_) => unready::REDIS_UNREACHABLE,
        Error::Queue(queue::Error::Produce(KafkaError::MetadataFetch(
            RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic,
        ))) => unready::KAFKA_TOPIC_MISSING,
        Error::Queue(queue::Error::Auth(_)) => unready::KAFKA_AUTH_FAILED,
        Error::Queue(_) | Error::Token(_) | Error::BadRequest(_) => unready::KAFKA_UNREACHABLE,
    }
}
