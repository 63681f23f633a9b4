//! `herald_runtime::http::serve` against hostile clients on real sockets: a
//! request head sent a byte at a time, a chunked body that stops, an idle
//! keep-alive connection, a flood past the connection cap; and the admin
//! listener (`/metrics` of comet, job, operator) under the same limits. Each
//! test shows a healthy client still served while the hostile one is held.
//!
//! Deadlines are shortened to a second or so; the bounds asserted are
//! generous (several times the deadline), never performance figures.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::routing::{get, post};
use herald_runtime::http::{Limits, Listener, Refusals, serve};
use herald_runtime::{Shutdown, admin};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bound on anything a test waits for.
const WAIT: Duration = Duration::from_secs(10);

const SHORT: Limits = Limits {
    header_timeout: Duration::from_secs(1),
    body_timeout: Duration::from_secs(1),
    idle_timeout: Duration::from_secs(3),
    max_connections: 64,
};

struct Server {
    addr: SocketAddr,
    registry: Arc<Registry>,
    stop: Shutdown,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(limits: Limits) -> Server {
        let mut registry = Registry::with_prefix("herald_test");
        let refusals = Refusals::register(&mut registry);
        let registry = Arc::new(registry);
        let metrics = registry.clone();
        let router = Router::new()
            .route("/ok", get(|| async { "ok" }))
            .route("/echo", post(|body: Bytes| async move { body }))
            .route(
                "/metrics",
                get(move || async move { admin::encode(&metrics) }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let stop = Shutdown::new();
        let config = Listener {
            refusals: Some(refusals),
            nodelay: true,
            ..Listener::new("api", limits)
        };
        let task = tokio::spawn(serve(listener, router, config, stop.wait()));
        Server {
            addr,
            registry,
            stop,
            task,
        }
    }

    fn refused(&self, reason: &str) -> u64 {
        counter(&admin::encode(&self.registry), "api", reason)
    }

    /// A fresh client is answered at once: the server is not held up.
    async fn healthy(&self) {
        healthy(self.addr, "/ok").await;
    }

    async fn stop(self) {
        self.stop.trigger();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("server stops")
            .expect("server task")
            .expect("server");
    }
}

/// `herald_test_http_refused_total{listener,reason}` in `text` (0 if absent).
fn counter(text: &str, listener: &str, reason: &str) -> u64 {
    let prefix =
        format!("herald_test_http_refused_total{{listener=\"{listener}\",reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(0, |n| n.trim().parse().expect("a count"))
}

async fn healthy(addr: SocketAddr, path: &str) {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.expect("send");
    let (status, _) = tokio::time::timeout(WAIT, response(&mut tcp))
        .await
        .expect("healthy client answered")
        .expect("an answer");
    assert_eq!(status, 200, "healthy client on {addr}{path}");
}

/// Reads one answer with a `content-length` (what axum sends here).
async fn response(tcp: &mut TcpStream) -> std::io::Result<(u16, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |n| n.trim().parse().expect("content-length"));
            if buf.len() >= end + 4 + length {
                let status = head[9..12].parse().expect("status");
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + length]).into_owned();
                return Ok((status, body));
            }
        }
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Waits until the server closes `tcp` (EOF or reset); how long that took.
async fn closed(tcp: &mut TcpStream) -> Duration {
    let start = Instant::now();
    let mut chunk = [0u8; 1024];
    tokio::time::timeout(WAIT, async {
        loop {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("server closes the connection");
    start.elapsed()
}

#[tokio::test]
async fn a_request_head_sent_a_byte_at_a_time_is_cut_at_the_header_deadline() {
    let server = Server::start(SHORT).await;
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    let start = Instant::now();
    let head = b"GET /ok HTTP/1.1\r\nhost: x\r\nx-slow: aaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    // One byte every 200 ms: the head would take ~11 s; the deadline is 1 s.
    let mut cut = false;
    for byte in head {
        if slow.write_all(&[*byte]).await.is_err() {
            cut = true;
            break;
        }
        server.healthy().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut probe = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(1), slow.read(&mut probe)).await
        {
            cut = true;
            break;
        }
    }
    let lived = start.elapsed();
    assert!(cut, "slow head never cut ({lived:?})");
    assert!(lived < Duration::from_secs(5), "cut after {lived:?}");
    eprintln!("slow head cut after {lived:?} (header deadline 1 s)");
    assert_eq!(server.refused("header_timeout"), 1);
    server.healthy().await;
    server.stop().await;
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_cut_at_the_header_deadline() {
    let server = Server::start(SHORT).await;
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    server.healthy().await;
    let lived = closed(&mut silent).await;
    assert!(lived < Duration::from_secs(5), "{lived:?}");
    assert_eq!(server.refused("header_timeout"), 1);
    server.stop().await;
}

#[tokio::test]
async fn a_chunked_body_that_stops_is_answered_408_at_the_body_deadline() {
    let server = Server::start(SHORT).await;
    let mut stalled = TcpStream::connect(server.addr).await.unwrap();
    let start = Instant::now();
    stalled
        .write_all(
            b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        .await
        .unwrap();
    server.healthy().await;
    let (status, body) = tokio::time::timeout(WAIT, response(&mut stalled))
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(status, 408, "{body}");
    let lived = start.elapsed() + closed(&mut stalled).await;
    assert!(lived < Duration::from_secs(5), "{lived:?}");
    eprintln!("stalled body cut after {lived:?} (body deadline 1 s)");
    assert_eq!(server.refused("body_timeout"), 1);
    server.healthy().await;

    // A body that trickles (a chunk every 300 ms, never ending) is cut
    // too: the deadline is for the whole body, not between chunks.
    let mut trickle = TcpStream::connect(server.addr).await.unwrap();
    trickle
        .write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    let mut answered = None;
    while start.elapsed() < WAIT {
        if trickle.write_all(b"1\r\na\r\n").await.is_err() {
            break;
        }
        let read = tokio::time::timeout(Duration::from_millis(300), response(&mut trickle)).await;
        if let Ok(result) = read {
            answered = Some(result.map(|(status, _)| status).unwrap_or(0));
            break;
        }
    }
    assert_eq!(
        answered,
        Some(408),
        "trickling body after {:?}",
        start.elapsed()
    );
    assert_eq!(server.refused("body_timeout"), 2);

    // A body that arrives in time is served.
    let mut fine = TcpStream::connect(server.addr).await.unwrap();
    fine.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello")
        .await
        .unwrap();
    assert_eq!(
        response(&mut fine).await.unwrap(),
        (200, "hello".to_owned())
    );
    server.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_at_the_idle_deadline_not_before() {
    let server = Server::start(SHORT).await;
    let mut kept = TcpStream::connect(server.addr).await.unwrap();
    let request = b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n";
    kept.write_all(request).await.unwrap();
    assert_eq!(response(&mut kept).await.unwrap().0, 200);
    // Idle past the header deadline (1 s) but within the idle one (3 s):
    // still open, and serves the next request.
    tokio::time::sleep(Duration::from_millis(1_800)).await;
    kept.write_all(request).await.unwrap();
    assert_eq!(response(&mut kept).await.unwrap().0, 200);
    let lived = closed(&mut kept).await;
    assert!(
        lived >= Duration::from_secs(2) && lived < Duration::from_secs(8),
        "{lived:?}"
    );
    eprintln!("idle keep-alive connection closed after {lived:?} (idle deadline 3 s)");
    // Idle closes are no refusal.
    assert_eq!(server.refused("header_timeout"), 0);
    server.healthy().await;
    server.stop().await;
}

#[tokio::test]
async fn past_the_cap_new_connections_get_503_while_held_ones_are_served() {
    let server = Server::start(Limits {
        header_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(60),
        max_connections: 3,
        ..SHORT
    })
    .await;
    // A client with a kept-alive connection, then a flood that fills the cap.
    let mut kept = TcpStream::connect(server.addr).await.unwrap();
    kept.write_all(b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(response(&mut kept).await.unwrap().0, 200);
    let mut flood = Vec::new();
    for _ in 0..2 {
        flood.push(TcpStream::connect(server.addr).await.unwrap());
    }
    for _ in 0..5 {
        let mut refused = TcpStream::connect(server.addr).await.unwrap();
        let (status, _) = tokio::time::timeout(WAIT, response(&mut refused))
            .await
            .expect("answered at once")
            .unwrap();
        assert_eq!(status, 503);
        closed(&mut refused).await;
    }
    kept.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (status, metrics) = response(&mut kept).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(counter(&metrics, "api", "connections"), 5, "{metrics}");
    // A freed slot is taken again.
    drop(flood.pop());
    let start = Instant::now();
    loop {
        let mut again = TcpStream::connect(server.addr).await.unwrap();
        again
            .write_all(b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        if response(&mut again).await.unwrap().0 == 200 {
            break;
        }
        assert!(start.elapsed() < WAIT, "slot never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn shutdown_lets_the_request_in_flight_finish() {
    let server = Server::start(SHORT).await;
    let mut busy = TcpStream::connect(server.addr).await.unwrap();
    busy.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhel")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.stop.trigger();
    tokio::time::sleep(Duration::from_millis(100)).await;
    busy.write_all(b"lo").await.unwrap();
    assert_eq!(
        response(&mut busy).await.unwrap(),
        (200, "hello".to_owned())
    );
    tokio::time::timeout(WAIT, server.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// What a role's admin listener reports; its refusals are counted.
struct Probe {
    registry: Registry,
    refusals: Refusals,
}

impl admin::Health for Probe {
    fn metrics(&self) -> String {
        admin::encode(&self.registry)
    }
    async fn ready(&self) -> Result<(), String> {
        Ok(())
    }
    fn http_refusals(&self) -> Refusals {
        self.refusals.clone()
    }
}

#[tokio::test]
async fn the_admin_listener_has_the_same_limits() {
    let mut registry = Registry::with_prefix("herald_test");
    let refusals = Refusals::register(&mut registry);
    let probe = Arc::new(Probe { registry, refusals });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = Shutdown::new();
    let limits = Limits {
        max_connections: 4,
        ..SHORT
    };
    let task = tokio::spawn(admin::serve_within(
        listener,
        probe.clone(),
        limits,
        stop.wait(),
    ));

    // A slow head is cut while probes are answered.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /met").await.unwrap();
    healthy(addr, "/healthz").await;
    let lived = closed(&mut slow).await;
    assert!(lived < Duration::from_secs(5), "{lived:?}");
    // A full listener answers 503 while a held scrape connection is served.
    let mut scraper = TcpStream::connect(addr).await.unwrap();
    let mut flood = Vec::new();
    for _ in 0..3 {
        flood.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut refused = TcpStream::connect(addr).await.unwrap();
    assert_eq!(response(&mut refused).await.unwrap().0, 503);
    scraper
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (status, metrics) = response(&mut scraper).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(counter(&metrics, "admin", "header_timeout"), 1, "{metrics}");
    assert_eq!(counter(&metrics, "admin", "connections"), 1, "{metrics}");
    // The flood sends nothing: cut at the header deadline, which frees the
    // listener for everyone.
    for tcp in &mut flood {
        closed(tcp).await;
    }
    healthy(addr, "/readyz").await;

    stop.trigger();
    tokio::time::timeout(WAIT, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
