//! The admin HTTP server every role runs: `/metrics` (Prometheus text),
//! `/healthz` (the process answers) and `/readyz` (the role should get
//! traffic). A role says what its metrics and readiness are by implementing
//! [`Health`]; the routes, content type and shutdown are the same everywhere.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::http;

/// What a role's admin endpoints report.
pub trait Health: Send + Sync + 'static {
    /// The role's registry in Prometheus text format (see [`encode`]).
    fn metrics(&self) -> String;
    /// `Ok` when the role should get traffic, else why not (answered with 503).
    fn ready(&self) -> impl Future<Output = Result<(), String>> + Send;
    /// Where the admin listener counts the connections its limits refuse
    /// ([`http::Refusals`] in the role's registry). Required, so no role's
    /// admin port refuses uncounted.
    fn http_refusals(&self) -> http::Refusals;
}

/// The content type of `/metrics`.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `registry` in Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// The three routes, for a role that serves them beside its own (logic's
/// HTTP API does: probes and scrapers hold no API key, and these routes show
/// no user data).
pub fn router<H: Health>(health: Arc<H>) -> Router {
    Router::new()
        .route("/metrics", get(metrics::<H>))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready::<H>))
        .with_state(health)
}

/// Serves the three routes on `listener` until `shutdown` completes, within
/// [`http::Limits::admin`].
///
/// # Errors
/// As [`http::serve`].
pub async fn serve<H: Health>(
    listener: TcpListener,
    health: Arc<H>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_within(listener, health, http::Limits::admin(), shutdown).await
}

/// [`serve`] within `limits` (tests shorten the deadlines).
///
/// # Errors
/// As [`http::serve`].
pub async fn serve_within<H: Health>(
    listener: TcpListener,
    health: Arc<H>,
    limits: http::Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let config = http::Listener {
        refusals: Some(health.http_refusals()),
        ..http::Listener::new("admin", limits)
    };
    http::serve(listener, router(health), config, shutdown).await
}

async fn metrics<H: Health>(State(health): State<Arc<H>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, OPENMETRICS)], health.metrics())
}

async fn ready<H: Health>(State(health): State<Arc<H>>) -> impl IntoResponse {
    match health.ready().await {
        Ok(()) => (StatusCode::OK, "ready".to_owned()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use prometheus_client::metrics::counter::Counter;

    use super::*;

    #[derive(Debug)]
    struct Probe {
        registry: Registry,
        ready: AtomicBool,
    }

    impl Health for Probe {
        fn metrics(&self) -> String {
            encode(&self.registry)
        }
        async fn ready(&self) -> Result<(), String> {
            if self.ready.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("not yet".to_owned())
            }
        }
        fn http_refusals(&self) -> http::Refusals {
            http::Refusals::default()
        }
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        (status, out)
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness_until_shutdown() {
        let mut registry = Registry::with_prefix("herald_test");
        let counter = Counter::<u64>::default();
        registry.register("events", "Events", counter.clone());
        counter.inc();
        let probe = Arc::new(Probe {
            registry,
            ready: AtomicBool::new(false),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = crate::Shutdown::new();
        let server = tokio::spawn(serve(listener, probe.clone(), stop.wait()));

        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("herald_test_events_total 1"), "{body}");
        assert!(body.contains(OPENMETRICS), "{body}");
        assert_eq!(get(addr, "/healthz").await.0, 200);
        let (status, body) = get(addr, "/readyz").await;
        assert_eq!(status, 503);
        assert!(body.ends_with("not yet"), "{body}");
        probe.ready.store(true, Ordering::SeqCst);
        assert_eq!(get(addr, "/readyz").await.0, 200);

        stop.trigger();
        server.await.unwrap().unwrap();
    }
}
