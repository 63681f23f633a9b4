//! Prometheus metrics, and what comet's admin endpoints (`/metrics`,
//! `/healthz`, `/readyz`, served by `herald_runtime::admin`) report.
//!
//! Labels are fixed, low-cardinality strings (transport, outcome, rpc,
//! reason); never keys, rooms or user ids.

use std::sync::atomic::Ordering;

use herald_runtime::grpc_auth::Refusals;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::Shared;
use crate::server::Transport;

type Labels = [(&'static str, &'static str); 1];
type Counters = Family<Labels, Counter>;

/// The comet's metrics, registered once in [`Metrics::new`].
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    connections: Family<Labels, Gauge>,
    auth: Counters,
    frames_in: Counters,
    frames_out: Counters,
    pushes: Counters,
    drops: Counters,
    push_waits: Counter,
    disconnects: Counters,
    accept_errors: Counters,
    upgrade_refused: Counters,
    receives: Counters,
    refusals: Counters,
    logic_failures: Counters,
    push_write_latency: Histogram,
    node_list_generation: Gauge,
    grpc_auth_refusals: Refusals,
    http_refusals: herald_runtime::http::Refusals,
    tls_reloads: Counters,
}

/// Failed calls to logic, by rpc: handed to the logic client, which sees
/// every call's outcome.
#[derive(Debug, Clone, Default)]
pub(crate) struct LogicFailures(Counters);

impl LogicFailures {
    pub(crate) fn failed(&self, rpc: &'static str) {
        self.0.get_or_create(&[("rpc", rpc)]).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh registry with every comet metric in it, prefixed `herald_comet`.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("herald_comet");
        let connections = Family::<Labels, Gauge>::default();
        registry.register(
            "connections",
            "Authenticated connections, by transport",
            connections.clone(),
        );
        let mut counter = |name: &str, help: &str| {
            let family = Counters::default();
            registry.register(name, help, family.clone());
            family
        };
        let auth = counter("auth", "Handshake outcomes");
        let frames_in = counter("frames_in", "Client frames received, by transport");
        let frames_out = counter("frames_out", "Messages queued to clients, by transport");
        let pushes = counter("pushes", "Push RPCs served, by rpc");
        let drops = counter("push_drops", "Pushes not queued, by reason");
        let disconnects = counter("disconnects", "Closed authenticated connections, by reason");
        let accept_errors = counter(
            "accept_errors",
            "Failed accepts on client listeners, by reason (emfile, enfile, enobufs, enomem, aborted, other)",
        );
        let upgrade_refused = counter(
            "ws_upgrade_refused",
            "WebSocket upgrade requests refused with an HTTP error, by reason",
        );
        let receives = counter(
            "receives",
            "Client ops bound for logic Receive, by outcome (forwarded, rate_limited)",
        );
        let refusals = counter(
            "refusals",
            "Client requests and pushes refused by a protocol limit, by reason (client_reserved_op, push_reserved_op, push_malformed, accepted_ops_limit, room_id_too_long)",
        );
        let logic_failures = counter(
            "logic_call_failures",
            "Calls to logic that failed or timed out, by rpc (connect, disconnect, heartbeat, renew_online, receive)",
        );
        let tls_reloads = counter(
            "tls_reloads",
            "WSS certificate files that changed, by result: ok (now served) or error (unreadable or invalid; the previous pair kept)",
        );
        let push_waits = Counter::default();
        registry.register(
            "push_waits",
            "Pushes that waited for room in a full queue whose client keeps reading (comet behind, not the client)",
            push_waits.clone(),
        );
        // 100 µs to ~3.3 s: a loopback write is well under a millisecond, a
        // slow client or a loaded comet shows up in the upper buckets.
        let push_write_latency = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "push_write_latency_seconds",
            "Time from a push RPC queueing a frame to the socket write containing it completing",
            push_write_latency.clone(),
        );
        let node_list_generation = Gauge::default();
        registry.register(
            "node_list_generation",
            "Generation of the node list in use (where the shutdown drain redirects, and its settings); 0 without one",
            node_list_generation.clone(),
        );
        let grpc_auth_refusals = Refusals::register(&mut registry);
        let http_refusals = herald_runtime::http::Refusals::register(&mut registry);
        Metrics {
            registry,
            connections,
            auth,
            frames_in,
            frames_out,
            pushes,
            drops,
            push_waits,
            disconnects,
            accept_errors,
            upgrade_refused,
            receives,
            refusals,
            logic_failures,
            push_write_latency,
            node_list_generation,
            grpc_auth_refusals,
            http_refusals,
            tls_reloads,
        }
    }

    pub(crate) fn node_list(&self, generation: i64) {
        self.node_list_generation.set(generation);
    }

    pub(crate) fn tls_reload(&self, outcome: crate::tls::Reload) {
        let result = match outcome {
            crate::tls::Reload::Unchanged => return,
            crate::tls::Reload::Ok => "ok",
            crate::tls::Reload::Error => "error",
        };
        self.tls_reloads.get_or_create(&[("result", result)]).inc();
    }

    fn transport(transport: Transport) -> Labels {
        [(
            "transport",
            match transport {
                Transport::Tcp => "tcp",
                Transport::Ws => "ws",
                Transport::Wss => "wss",
            },
        )]
    }

    pub(crate) fn connection_opened(&self, transport: Transport) {
        self.connections
            .get_or_create(&Self::transport(transport))
            .inc();
    }

    pub(crate) fn connection_closed(&self, transport: Transport, reason: &'static str) {
        self.connections
            .get_or_create(&Self::transport(transport))
            .dec();
        self.disconnects.get_or_create(&[("reason", reason)]).inc();
    }

    pub(crate) fn auth(&self, outcome: &'static str) {
        self.auth.get_or_create(&[("outcome", outcome)]).inc();
    }

    pub(crate) fn frame_in(&self, transport: Transport) {
        self.frames_in
            .get_or_create(&Self::transport(transport))
            .inc();
    }

    pub(crate) fn frames_out(&self, transport: Transport, n: usize) {
        self.frames_out
            .get_or_create(&Self::transport(transport))
            .inc_by(n as u64);
    }

    pub(crate) fn push(&self, rpc: &'static str) {
        self.pushes.get_or_create(&[("rpc", rpc)]).inc();
    }

    pub(crate) fn push_waited(&self, n: usize) {
        self.push_waits.inc_by(n as u64);
    }

    pub(crate) fn drop_push(&self, reason: &'static str) {
        self.drops.get_or_create(&[("reason", reason)]).inc();
    }

    pub(crate) fn accept_error(&self, reason: &'static str) {
        self.accept_errors
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    pub(crate) fn upgrade_refused(&self, reason: &'static str) {
        self.upgrade_refused
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    pub(crate) fn receive(&self, outcome: &'static str) {
        self.receives.get_or_create(&[("outcome", outcome)]).inc();
    }

    /// A client request or push refused by a protocol limit.
    pub(crate) fn refused(&self, reason: &'static str) {
        self.refusals.get_or_create(&[("reason", reason)]).inc();
    }

    pub(crate) fn logic_failures(&self) -> LogicFailures {
        LogicFailures(self.logic_failures.clone())
    }

    /// The gRPC port's token refusals, for its token check.
    pub(crate) fn grpc_auth_refusals(&self) -> Refusals {
        self.grpc_auth_refusals.clone()
    }

    pub(crate) fn push_written(&self, latency: std::time::Duration) {
        self.push_write_latency.observe(latency.as_secs_f64());
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        herald_runtime::admin::encode(&self.registry)
    }
}

impl herald_runtime::admin::Health for Shared {
    fn metrics(&self) -> String {
        self.metrics.encode()
    }

    fn http_refusals(&self) -> herald_runtime::http::Refusals {
        self.metrics.http_refusals.clone()
    }

    /// Ready once logic has been reached and while accepting connections; a
    /// comet that cannot authenticate yet, or is draining, is not ready, so
    /// load balancers do not send it clients.
    async fn ready(&self) -> Result<(), String> {
        use herald_runtime::contract::unready;
        if self.draining.load(Ordering::SeqCst) {
            Err(unready::body(unready::DRAINING, "no new clients"))
        } else if !self.logic.reachable() || self.logic.token_refused() {
            let detail = if self.logic.token_refused() {
                format!(
                    "logic {} refuses this comet's gRPC token",
                    self.config.logic_addr
                )
            } else {
                format!("logic {} not reached yet", self.config.logic_addr)
            };
            Err(unready::body(unready::LOGIC_UNREACHABLE, detail))
        } else {
            Ok(())
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
