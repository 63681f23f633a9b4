//! Shared helpers: the real test bed (Redis + Kafka from e2e/services), an
//! in-process logic on 127.0.0.1:0, and small HTTP/gRPC/Kafka clients.
//! Every wait is bounded.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use herald_logic::{Config, Listeners};
use herald_protocol::pb::LogicClient;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::net::TcpListener;
use tonic::transport::Channel;

/// Upper bound for any single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(30);

/// A test-bed variable; panics (never skips) when the test bed is not up.
pub fn testbed(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "{name} is not set: start the test bed first \
             (HERALD_RUN=... bash e2e/services/up.sh redis kafka; source $HERALD_RUN/env)"
        ),
    }
}

pub fn redis_url() -> String {
    testbed("HERALD_REDIS_URL")
}

pub fn kafka_brokers() -> String {
    testbed("HERALD_KAFKA_BROKERS")
}

/// A name no other test or run uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A positive mid no other test or run uses.
pub fn unique_mid() -> i64 {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(1);
    (nanos / 1000).wrapping_mul(16)
        + i64::try_from(N.fetch_add(1, Ordering::Relaxed) % 16).unwrap_or(0)
}

/// Creates a one-partition topic (single partition: records are read back in
/// produce order by one consumer).
pub async fn create_topic(topic: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create()
        .expect("admin client");
    let results = tokio::time::timeout(
        WAIT,
        admin.create_topics(
            &[NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        ),
    )
    .await
    .expect("create_topics timed out")
    .expect("create_topics");
    for r in results {
        r.unwrap_or_else(|(name, code)| panic!("create topic {name}: {code}"));
    }
}

/// A consumer reading partition 0 of `topic` from the beginning.
pub fn consumer(topic: &str) -> StreamConsumer {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", unique("logic-test"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .expect("partition");
    consumer.assign(&tpl).expect("assign");
    consumer
}

/// Reads `n` records as (key, value).
pub async fn consume(consumer: &StreamConsumer, n: usize) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    while out.len() < n {
        let msg = tokio::time::timeout(WAIT, consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} records arrived", out.len()))
            .expect("kafka recv");
        out.push((
            String::from_utf8(msg.key().unwrap_or_default().to_vec()).expect("utf-8 key"),
            msg.payload().unwrap_or_default().to_vec(),
        ));
    }
    out
}

/// Asserts nothing more arrives within `wait`.
pub async fn assert_no_more(consumer: &StreamConsumer, wait: Duration) {
    if let Ok(msg) = tokio::time::timeout(wait, consumer.recv()).await {
        let msg = msg.expect("kafka recv");
        panic!(
            "unexpected record key {:?}",
            msg.key().map(|k| String::from_utf8_lossy(k).into_owned())
        );
    }
}

/// Test config on the test bed with a fresh topic name (not created).
pub fn config(topic: &str) -> Config {
    let mut c = Config::new(&redis_url(), &kafka_brokers(), topic);
    c.redis.ttl = Duration::from_secs(600);
    c.kafka.message_timeout = Duration::from_secs(10);
    c.drain_timeout = Duration::from_secs(5);
    c
}

/// An in-process logic.
pub struct Logic {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    /// The client-facing listener (always bound in tests).
    pub client: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<herald_logic::Result<()>>,
}

impl Logic {
    pub async fn start(config: Config) -> Logic {
        let http = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
        let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
        let client = TcpListener::bind("127.0.0.1:0").await.expect("bind client");
        let (http_addr, grpc_addr, client_addr) = (
            http.local_addr().expect("addr"),
            grpc.local_addr().expect("addr"),
            client.local_addr().expect("addr"),
        );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(herald_logic::run(
            config,
            Listeners {
                http,
                grpc,
                client: Some(client),
            },
            async move {
                let _ = rx.await;
            },
        ));
        Logic {
            http: http_addr,
            grpc: grpc_addr,
            client: client_addr,
            stop: Some(tx),
            handle,
        }
    }

    pub async fn grpc(&self) -> LogicClient<Channel> {
        let channel = tokio::time::timeout(
            WAIT,
            Channel::from_shared(format!("http://{}", self.grpc))
                .expect("uri")
                .timeout(WAIT)
                .connect(),
        )
        .await
        .expect("grpc connect timed out")
        .expect("grpc connect");
        LogicClient::new(channel)
    }

    /// Stops logic and checks `run` returned Ok in bounded time.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(WAIT, &mut self.handle)
            .await
            .expect("logic did not stop")
            .expect("logic panicked")
            .expect("logic failed");
    }
}

/// One HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: serde_json::Value,
}

/// Sends one HTTP/1.1 request; `auth` becomes `Authorization: Bearer <auth>`.
async fn send(
    addr: SocketAddr,
    method: &str,
    path_and_query: &str,
    body: &[u8],
    auth: Option<&str>,
) -> (u16, http::HeaderMap, Bytes) {
    let headers: Vec<(&str, String)> = auth
        .map(|key| ("authorization", format!("Bearer {key}")))
        .into_iter()
        .collect();
    send_with(addr, method, path_and_query, body, &headers).await
}

/// Sends one HTTP/1.1 request with these extra headers; the raw answer.
pub async fn send_with(
    addr: SocketAddr,
    method: &str,
    path_and_query: &str,
    body: &[u8],
    headers: &[(&str, String)],
) -> (u16, http::HeaderMap, Bytes) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path_and_query}"));
    for (name, value) in headers {
        req = req.header(*name, value);
    }
    let req = req
        .body(Full::new(Bytes::copy_from_slice(body)))
        .expect("request");
    let resp = tokio::time::timeout(WAIT, client.request(req))
        .await
        .expect("http request timed out")
        .expect("http request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = tokio::time::timeout(WAIT, resp.into_body().collect())
        .await
        .expect("http body timed out")
        .expect("http body")
        .to_bytes();
    (status, headers, bytes)
}

/// One API request, its answer parsed as the JSON envelope.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path_and_query: &str,
    body: &[u8],
    auth: Option<&str>,
) -> Answer {
    let (status, headers, bytes) = send(addr, method, path_and_query, body, auth).await;
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| panic!("not JSON ({status}): {:?}", String::from_utf8_lossy(&bytes)));
    Answer {
        status,
        headers,
        body,
    }
}

/// A direct Redis connection for assertions.
pub async fn redis() -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(redis_url()).expect("redis url");
    tokio::time::timeout(WAIT, client.get_multiplexed_async_connection())
        .await
        .expect("redis connect timed out")
        .expect("redis connect")
}

/// A 127.0.0.1 port nothing listens on (bound then released).
pub async fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    drop(l);
    port
}

/// Polls `check` every 50 ms until it returns Some, at most `WAIT`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// GET `path` and return the status and the body as text (probes, metrics).
pub async fn get_text(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, bytes) = send(addr, "GET", path, b"", None).await;
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// The value of one sample line of Prometheus text (`name{labels} value`).
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}
