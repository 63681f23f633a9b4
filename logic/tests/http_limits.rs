//! Logic's two HTTP listeners (push API, client port) under hostile clients:
//! a request head that trickles, a push body that stops after one chunk, a
//! flood past the connection cap; each cut or refused, counted in
//! `herald_logic_http_refused_total`, while a healthy caller is served.
//! Logic runs on the test bed's Redis and Kafka, with deadlines of a second.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use herald_runtime::http::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMITS: Limits = Limits {
    header_timeout: Duration::from_secs(1),
    body_timeout: Duration::from_secs(1),
    idle_timeout: Duration::from_secs(2),
    max_connections: 4,
};

/// Reads until the server closes the connection: what it sent, and how
/// long the close took.
async fn until_closed(tcp: &mut TcpStream) -> (String, Duration) {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(WAIT, async {
        loop {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("server closes the connection");
    (String::from_utf8_lossy(&out).into_owned(), start.elapsed())
}

fn refused(metrics: &str, listener: &str, reason: &str) -> f64 {
    let series =
        format!("herald_logic_http_refused_total{{listener=\"{listener}\",reason=\"{reason}\"}}");
    sample(metrics, &series).unwrap_or(0.0)
}

async fn healthy(addr: SocketAddr) {
    let (status, body) = get_text(addr, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok"));
}

#[tokio::test]
async fn the_push_api_cuts_slow_heads_and_stalled_bodies_and_caps_connections() {
    let mut config = config(&unique("http-limits"));
    config.http_limits = LIMITS;
    let logic = Logic::start(config).await;
    healthy(logic.http).await;

    // A head that trickles: cut at the header deadline.
    let mut slow = TcpStream::connect(logic.http).await.unwrap();
    slow.write_all(b"POST /goim/push/mids?operation=1000&mids=1 HTTP/1.1\r\nhost")
        .await
        .unwrap();
    healthy(logic.http).await;
    let (_, lived) = until_closed(&mut slow).await;
    assert!(lived < Duration::from_secs(5), "slow head held {lived:?}");

    // A push body that stops after one chunk: 408 at the body deadline.
    let mut stalled = TcpStream::connect(logic.http).await.unwrap();
    stalled
        .write_all(
            b"POST /goim/push/mids?operation=1000&mids=1 HTTP/1.1\r\nhost: x\r\n\
              transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        .await
        .unwrap();
    healthy(logic.http).await;
    let (answer, lived) = until_closed(&mut stalled).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        lived < Duration::from_secs(5),
        "stalled body held {lived:?}"
    );

    // A flood past the cap: 503 at once, while a kept-alive caller works.
    let mut kept = TcpStream::connect(logic.http).await.unwrap();
    let mut flood = Vec::new();
    for _ in 0..LIMITS.max_connections - 1 {
        flood.push(TcpStream::connect(logic.http).await.unwrap());
    }
    for _ in 0..3 {
        let mut over = TcpStream::connect(logic.http).await.unwrap();
        let (answer, _) = until_closed(&mut over).await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    }
    kept.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let (metrics, _) = until_closed(&mut kept).await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert_eq!(refused(&metrics, "api", "header_timeout"), 1.0, "{metrics}");
    assert_eq!(refused(&metrics, "api", "body_timeout"), 1.0, "{metrics}");
    assert_eq!(refused(&metrics, "api", "connections"), 3.0, "{metrics}");
    // The flood sends nothing: cut at the header deadline, which frees the
    // listener.
    for tcp in &mut flood {
        until_closed(tcp).await;
    }
    healthy(logic.http).await;
    logic.stop().await;
}

#[tokio::test]
async fn the_client_listener_has_its_own_cap() {
    let mut config = config(&unique("http-limits-client"));
    config.client_limits = Limits {
        max_connections: 1,
        header_timeout: Duration::from_secs(30),
        ..LIMITS
    };
    let logic = Logic::start(config).await;
    let _held = TcpStream::connect(logic.client).await.unwrap();
    let mut over = TcpStream::connect(logic.client).await.unwrap();
    let (answer, _) = until_closed(&mut over).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    // The push API is not affected by the client listener's flood.
    let (status, metrics) = get_text(logic.http, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(refused(&metrics, "client", "connections"), 1.0, "{metrics}");
    logic.stop().await;
}
