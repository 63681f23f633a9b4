//! Job against the test bed's real Kafka and real comets (`herald_comet::run`
//! on 127.0.0.1:0 with a stub logic), asserting the bytes TCP clients receive.
//!
//! Needs `HERALD_KAFKA_BROKERS` (source `$HERALD_RUN/env` after
//! `e2e/services/up.sh kafka`); panics without it rather than skipping.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use herald_client::{Client, Token};
use herald_job::{Config, Job, StaticComet, StatsSnapshot, source};
use herald_logic::queue::PushQueue;
use herald_logic::queue::memory::MemoryQueue;
use herald_protocol::pb::{PushMsg, push_msg};
use herald_testkit::{expect_silence, http};
use prost::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

mod common;

use common::LocalComet as Comet;

type Result<T = (), E = anyhow::Error> = std::result::Result<T, E>;

const WAIT: Duration = Duration::from_secs(20);

fn hex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
        .collect()
}

const T5: &str = "00 00 00 15 00 10 00 01 00 00 03 e8 00 00 00 00 68 65 6c 6c 6f";
const T7: &str = "00 00 00 1a 00 10 00 01 00 00 03 e8 00 00 00 00 7b 22 74 65 73 74 22 3a 31 7d
00 00 00 1a 00 10 00 01 00 00 03 e8 00 00 00 00 7b 22 74 65 73 74 22 3a 32 7d";

// ------------------------------------------------------------------ kafka

fn brokers() -> String {
    std::env::var("HERALD_KAFKA_BROKERS").unwrap_or_else(|_| {
        panic!(
            "HERALD_KAFKA_BROKERS is not set: start the test bed \
             (bash e2e/services/up.sh kafka; source $HERALD_RUN/env)"
        )
    })
}

fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{nanos}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

async fn create_topic(topic: &str, partitions: i32) -> Result {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()?;
    let results = timeout(
        WAIT,
        admin.create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        ),
    )
    .await??;
    for r in results {
        r.map_err(|(name, code)| anyhow::anyhow!("create topic {name}: {code}"))?;
    }
    Ok(())
}

struct Producer {
    producer: FutureProducer,
    topic: String,
}

impl Producer {
    fn new(topic: &str) -> Result<Producer> {
        Ok(Producer {
            producer: ClientConfig::new()
                .set("bootstrap.servers", brokers())
                .set("acks", "all")
                .set("enable.idempotence", "true")
                .set("linger.ms", "0")
                .create()?,
            topic: topic.to_owned(),
        })
    }

    async fn send_raw(&self, key: &str, value: &[u8]) -> Result {
        self.producer
            .send(
                FutureRecord::to(&self.topic).key(key).payload(value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(err, _)| anyhow::anyhow!("produce: {err}"))?;
        Ok(())
    }

    async fn send(&self, key: &str, msg: &PushMsg) -> Result {
        self.send_raw(key, &msg.encode_to_vec()).await
    }

    /// Enqueues all, then waits for every acknowledgement (idempotent
    /// producer: per-partition order is kept).
    async fn send_all(&self, records: &[(String, PushMsg)]) -> Result {
        let values: Vec<Vec<u8>> = records.iter().map(|(_, m)| m.encode_to_vec()).collect();
        let mut acks = Vec::new();
        for ((key, _), value) in records.iter().zip(&values) {
            let ack = self
                .producer
                .send_result(FutureRecord::to(&self.topic).key(key).payload(value))
                .map_err(|(err, _)| anyhow::anyhow!("enqueue: {err}"))?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await?
                .map_err(|(err, _)| anyhow::anyhow!("produce: {err}"))?;
        }
        Ok(())
    }
}

/// The group's committed offset of partition 0.
fn committed(topic: &str, group: &str) -> Result<Offset> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let got = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    got.find_partition(topic, 0)
        .map(|p| p.offset())
        .context("partition 0 missing")
}

fn push(server: &str, keys: &[&str], body: &[u8]) -> PushMsg {
    PushMsg {
        r#type: push_msg::Type::Push as i32,
        operation: 1000,
        server: server.to_owned(),
        keys: keys.iter().map(|k| (*k).to_owned()).collect(),
        msg: Bytes::copy_from_slice(body),
        ..Default::default()
    }
}

fn room(room: &str, body: &[u8]) -> PushMsg {
    PushMsg {
        r#type: push_msg::Type::Room as i32,
        operation: 1000,
        room: room.to_owned(),
        msg: Bytes::copy_from_slice(body),
        ..Default::default()
    }
}

fn broadcast(body: &[u8], speed: i32) -> PushMsg {
    PushMsg {
        r#type: push_msg::Type::Broadcast as i32,
        operation: 1000,
        speed,
        msg: Bytes::copy_from_slice(body),
        ..Default::default()
    }
}

// ------------------------------------------------------------------ comet

impl Comet {
    fn as_static(&self) -> StaticComet {
        StaticComet {
            name: self.name.clone(),
            grpc: self.grpc.to_string(),
        }
    }

    /// A TCP client of this comet, authenticated with `key` in `room`.
    async fn client(&self, key: &str, room: &str) -> Result<Client> {
        let mut client = Client::connect_tcp(self.tcp).await?.with_timeout(WAIT);
        client
            .auth(&Token::new(1, key).room(room).accepts([1000]))
            .await?;
        Ok(client)
    }
}

// -------------------------------------------------------------------- job

struct RunningJob {
    job: Job,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<herald_job::Result<()>>,
}

impl RunningJob {
    fn start(config: Config) -> Result<RunningJob> {
        let job = Job::start(&config)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let runner = job.clone();
        let task = tokio::spawn(async move {
            let result = source::kafka(&runner, &config, async {
                let _ = stopped.await;
            })
            .await;
            runner.stop();
            result
        });
        Ok(RunningJob {
            job,
            stop: Some(stop),
            task,
        })
    }

    fn stats(&self) -> StatsSnapshot {
        self.job.stats()
    }

    async fn wait_stats(&self, what: &str, pred: impl Fn(&StatsSnapshot) -> bool) -> Result {
        timeout(WAIT, async {
            while !pred(&self.stats()) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .with_context(|| format!("job never reached {what}: {:?}", self.stats()))
    }

    async fn stop(mut self) -> Result {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        timeout(WAIT, &mut self.task)
            .await
            .context("job did not stop")???;
        Ok(())
    }
}

impl Drop for RunningJob {
    fn drop(&mut self) {
        self.job.stop();
        self.task.abort();
    }
}

fn job_config(topic: &str, group: &str, comets: &[&Comet]) -> Config {
    let mut config = Config::new(&brokers(), topic, group);
    config.comets = comets.iter().map(|c| c.as_static()).collect();
    config.drain_timeout = Duration::from_secs(5);
    config
}

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn push_room_and_broadcast_reach_clients_with_exact_bytes() -> Result {
    let topic = unique("job-basic");
    create_topic(&topic, 2).await?;
    let comet = Comet::start("comet-a").await?;
    // The comet comes from a node list file (draining still gets pushes).
    let dir = std::env::temp_dir().join(unique("job-nodes"));
    std::fs::create_dir_all(&dir)?;
    let list = dir.join("nodes.json");
    std::fs::write(
        &list,
        serde_json::json!({"generation": 1, "updated": "2026-11-27T10:00:00Z",
            "nodes": [{"name": "comet-a", "grpc": comet.grpc.to_string(), "draining": true}]})
        .to_string(),
    )?;
    let mut config = job_config(&topic, &unique("job-basic-group"), &[]);
    config.node_list = Some(herald_runtime::nodes::Source::File {
        path: list,
        poll: Duration::from_secs(2),
    });
    let job = RunningJob::start(config)?;
    let mut client = comet.client("ka", "live://1000").await?;
    let producer = Producer::new(&topic)?;

    producer
        .send("ka", &push("comet-a", &["ka"], b"hello"))
        .await?;
    assert_eq!(
        client.next_message().await?.to_bytes().to_vec(),
        hex(T5),
        "T5 on TCP"
    );

    producer
        .send("live://1000", &room("live://1000", br#"{"test":1}"#))
        .await?;
    producer
        .send("live://1000", &room("live://1000", br#"{"test":2}"#))
        .await?;
    let mut t7 = client.next_message().await?.to_bytes().to_vec();
    t7.extend_from_slice(&client.next_message().await?.to_bytes());
    assert_eq!(t7, hex(T7), "T7 on TCP");

    producer.send("1000", &broadcast(b"all", 100)).await?;
    let frame = client.next_frame().await?;
    assert_eq!((frame.op, &frame.body[..]), (1000, &b"all"[..]));

    // A PUSH for a comet nobody lists is dropped and counted; later ones flow.
    producer
        .send("kx", &push("ghost", &["kx"], b"lost"))
        .await?;
    producer
        .send("ka", &push("comet-a", &["ka"], b"after"))
        .await?;
    let frame = client.next_frame().await?;
    assert_eq!(&frame.body[..], b"after");
    job.wait_stats("one unknown comet", |s| s.unknown_comet == 1)
        .await?;
    let stats = job.stats();
    assert_eq!((stats.records, stats.poison), (6, 0), "{stats:?}");
    job.stop().await?;
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

#[tokio::test]
async fn poison_records_are_skipped_and_committed_past() -> Result {
    let topic = unique("job-poison");
    let group = unique("job-poison-group");
    create_topic(&topic, 1).await?;
    let comet = Comet::start("comet-p").await?;
    let job = RunningJob::start(job_config(&topic, &group, &[&comet]))?;
    let mut client = comet.client("kp", "").await?;
    let producer = Producer::new(&topic)?;

    producer.send_raw("x", b"\xff\xff\xff\xff").await?; // not protobuf
    let mut unknown_type = push("comet-p", &["kp"], b"bad");
    unknown_type.r#type = 7;
    producer.send("x", &unknown_type).await?;
    producer
        .send("x", &push("comet-p", &[], b"no keys"))
        .await?;
    producer.send("x", &room("", b"no room")).await?;
    producer
        .send("x", &push("comet-p", &["kp"], b"good"))
        .await?;

    let frame = client.next_frame().await?;
    assert_eq!(&frame.body[..], b"good");
    job.wait_stats("4 poison, 5 records", |s| s.poison == 4 && s.records == 5)
        .await?;
    job.stop().await?;
    assert_eq!(committed(&topic, &group)?, Offset::Offset(5));
    expect_silence(&mut client, Duration::from_millis(200)).await?;
    Ok(())
}

#[tokio::test]
async fn broadcast_with_zero_comets_does_nothing_and_commits() -> Result {
    let topic = unique("job-empty");
    let group = unique("job-empty-group");
    create_topic(&topic, 1).await?;
    let job = RunningJob::start(job_config(&topic, &group, &[]))?;
    let producer = Producer::new(&topic)?;
    producer.send("1000", &broadcast(b"nobody", 1000)).await?;
    producer
        .send("live://1", &room("live://1", b"nobody"))
        .await?;
    job.wait_stats("2 records", |s| s.records == 2).await?;
    assert_eq!(job.stats().calls, 0);
    job.stop().await?;
    assert_eq!(committed(&topic, &group)?, Offset::Offset(2));
    Ok(())
}

/// A TCP listener that accepts and never answers: calls to it time out.
async fn black_hole() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    Ok(addr)
}

#[tokio::test]
async fn every_record_is_delivered_at_least_once_across_a_restart() -> Result {
    const N: usize = 120;
    let topic = unique("job-alo");
    let group = unique("job-alo-group");
    create_topic(&topic, 3).await?;
    let fast = Comet::start("comet-r").await?;
    let slow = Comet::start("comet-s").await?;
    let mut fast_client = fast.client("kr", "").await?;
    let mut slow_client = slow.client("ks", "").await?;
    let producer = Producer::new(&topic)?;
    // Every tenth record goes to comet-s; record keys spread the records
    // over the three partitions.
    let is_slow = |i: usize| i % 10 == 5;
    let records: Vec<(String, PushMsg)> = (0..N)
        .map(|i| {
            let msg = if is_slow(i) {
                push("comet-s", &["ks"], format!("s{i:04}").as_bytes())
            } else {
                push("comet-r", &["kr"], format!("m{i:04}").as_bytes())
            };
            (format!("part-{}", i % 7), msg)
        })
        .collect();
    producer.send_all(&records).await?;
    let want = |prefix: &str, slow: bool| -> BTreeSet<Bytes> {
        (0..N)
            .filter(|&i| is_slow(i) == slow)
            .map(|i| Bytes::from(format!("{prefix}{i:04}")))
            .collect()
    };

    // Run 1: comet-s is listed at an address that never answers, so its
    // records stay in flight and pin their partitions' offsets, while
    // comet-r's records (before and after them) are delivered.
    let mut config = job_config(&topic, &group, &[&fast]);
    config.comets.push(StaticComet {
        name: "comet-s".to_owned(),
        grpc: black_hole().await?.to_string(),
    });
    config.calls.timeout = Duration::from_millis(300);
    config.drain_timeout = Duration::from_millis(300);
    let first = RunningJob::start(config)?;
    let mut fast_seen = BTreeSet::new();
    while fast_seen.len() < want("m", false).len() {
        fast_seen.insert(fast_client.next_frame().await?.body);
    }
    first.stop().await?;

    // Run 2, same group, comet-s reachable: it resumes from the stored
    // offsets, so the slow records arrive and some fast ones come again.
    let second = RunningJob::start(job_config(&topic, &group, &[&fast, &slow]))?;
    let mut slow_seen = BTreeSet::new();
    timeout(WAIT, async {
        while slow_seen.len() < want("s", true).len() {
            slow_seen.insert(slow_client.next_frame().await?.body);
        }
        anyhow::Ok(())
    })
    .await
    .with_context(|| format!("only {} slow records arrived", slow_seen.len()))??;
    assert_eq!(slow_seen, want("s", true));
    assert_eq!(fast_seen, want("m", false));
    let again = fast_client.next_frame().await?;
    assert!(
        want("m", false).contains(&again.body),
        "a redelivered fast record: {again:?}"
    );
    second.stop().await?;
    Ok(())
}

#[tokio::test]
async fn calls_to_a_comet_that_leaves_the_node_list_are_dropped() -> Result {
    let topic = unique("job-gone");
    let group = unique("job-gone-group");
    create_topic(&topic, 1).await?;
    let comet = Comet::start("comet-n").await?;
    let mut client = comet.client("kn", "live://n").await?;
    let dir = std::env::temp_dir().join(unique("job-gone-nodes"));
    std::fs::create_dir_all(&dir)?;
    let list = dir.join("nodes.json");
    let write_list = |nodes: serde_json::Value| {
        // Written aside and renamed, as a ConfigMap update is: never half a file.
        let tmp = dir.join("nodes.json.tmp");
        std::fs::write(
            &tmp,
            serde_json::json!({"generation": 1, "nodes": nodes}).to_string(),
        )?;
        std::fs::rename(&tmp, &list)
    };
    let dead = black_hole().await?;
    write_list(serde_json::json!([
        {"name": "comet-n", "grpc": comet.grpc.to_string()},
        {"name": "comet-dead", "grpc": dead.to_string()},
    ]))?;
    let mut config = job_config(&topic, &group, &[]);
    config.node_list = Some(herald_runtime::nodes::Source::File {
        path: list.clone(),
        poll: Duration::from_millis(50),
    });
    config.calls.timeout = Duration::from_millis(200);
    config.calls.attempts = 2;
    config.calls.backoff = Duration::from_millis(20);
    let job = RunningJob::start(config)?;
    let producer = Producer::new(&topic)?;
    producer
        .send("kd", &push("comet-dead", &["kd"], b"never"))
        .await?;
    producer
        .send("live://n", &room("live://n", b"room for both"))
        .await?;
    // The room record reaches the live comet while the dead one retries.
    assert_eq!(&client.next_frame().await?.body[..], b"room for both");
    // Still listed: retried, not dropped.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(job.stats().comet_gone, 0, "{:?}", job.stats());

    write_list(serde_json::json!([{"name": "comet-n", "grpc": comet.grpc.to_string()}]))?;
    job.wait_stats("both dead calls dropped", |s| s.comet_gone == 2)
        .await?;
    producer
        .send("kd", &push("comet-dead", &["kd"], b"unknown now"))
        .await?;
    producer
        .send("kn", &push("comet-n", &["kn"], b"still flowing"))
        .await?;
    assert_eq!(&client.next_frame().await?.body[..], b"still flowing");
    job.wait_stats("one unknown comet", |s| s.unknown_comet == 1)
        .await?;
    job.stop().await?;
    assert_eq!(committed(&topic, &group)?, Offset::Offset(4));
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

#[tokio::test]
async fn room_pushes_arrive_in_order_in_batches() -> Result {
    const N: usize = 300;
    let topic = unique("job-order");
    create_topic(&topic, 1).await?;
    let comet = Comet::start("comet-o").await?;
    let mut member = comet.client("ko", "live://order").await?;
    let producer = Producer::new(&topic)?;
    let records: Vec<(String, PushMsg)> = (0..N)
        .map(|i| {
            (
                "live://order".to_owned(),
                room("live://order", format!("r{i:04}").as_bytes()),
            )
        })
        .collect();
    // Produced before job starts, so records arrive while calls are in flight.
    producer.send_all(&records).await?;
    let job = RunningJob::start(job_config(&topic, &unique("job-order-group"), &[&comet]))?;
    for i in 0..N {
        let frame = member.next_frame().await?;
        assert_eq!(frame.op, 1000);
        assert_eq!(
            frame.body,
            Bytes::from(format!("r{i:04}")),
            "frame {i} out of order"
        );
    }
    job.wait_stats("all room frames", |s| s.room_frames == N as u64)
        .await?;
    let stats = job.stats();
    assert!(
        stats.room_batches < N as u64 && stats.room_batches >= (N / 20) as u64,
        "frames were batched (≤ 20 per call): {stats:?}"
    );
    job.stop().await?;
    Ok(())
}

#[tokio::test]
async fn memory_queue_feeds_job_without_kafka() -> Result {
    let comet = Comet::start("comet-m").await?;
    let mut client = comet.client("km", "live://m").await?;
    let (queue, records) = MemoryQueue::new(16);
    // Brokers are never contacted by the channel driver.
    let mut config = Config::new("unused:1", "unused", "unused");
    config.comets = vec![comet.as_static()];
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(herald_job::run_channel(config, records, async {
        let _ = stopped.await;
    }));
    queue
        .push("km", &push("comet-m", &["km"], b"hello"))
        .await?;
    assert_eq!(client.next_message().await?.to_bytes().to_vec(), hex(T5));
    queue.push("live://m", &room("live://m", b"room")).await?;
    assert_eq!(&client.next_frame().await?.body[..], b"room");
    let _ = stop.send(());
    timeout(WAIT, task).await???;
    Ok(())
}

// ------------------------------------------------- admin http, dead letter

/// `GET path` on a plain HTTP/1.1 server: (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let response = http::get(addr, path).await?;
    Ok((response.status, response.body))
}

/// The value of one sample line (`name{labels} value`) in a metrics text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// `herald_job::run` with its admin listener on 127.0.0.1:0.
struct Served {
    http: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<herald_job::Result<()>>,
}

impl Served {
    async fn start(config: Config) -> Result<Served> {
        let listeners = herald_job::Listeners::bind("127.0.0.1:0".parse()?).await?;
        let http = listeners
            .http
            .as_ref()
            .context("bound listener")?
            .local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(herald_job::run(config, listeners, async {
            let _ = stopped.await;
        }));
        Ok(Served {
            http,
            stop: Some(stop),
            task,
        })
    }

    async fn wait_metric(&self, series: &str, pred: impl Fn(f64) -> bool) -> Result<String> {
        let mut last = String::new();
        let waited = timeout(WAIT, async {
            loop {
                let (status, text) = http_get(self.http, "/metrics").await?;
                anyhow::ensure!(status == 200, "/metrics answered {status}");
                if sample(&text, series).is_some_and(&pred) {
                    return anyhow::Ok(text);
                }
                last = text;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        match waited {
            Ok(text) => text,
            Err(_) => bail!("{series} never matched; last /metrics:\n{last}"),
        }
    }

    async fn stop(mut self) -> Result {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        timeout(WAIT, &mut self.task)
            .await
            .context("job did not stop")???;
        Ok(())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn readyz_waits_for_the_kafka_assignment() -> Result {
    // Nothing listens on the brokers' address: never assigned, never ready.
    let dead = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let mut config = Config::new(&dead.to_string(), "t", &unique("job-unready"));
    config.drain_timeout = Duration::from_millis(100);
    let job = Served::start(config).await?;
    assert_eq!(http_get(job.http, "/healthz").await?.0, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, body) = http_get(job.http, "/readyz").await?;
    assert_eq!(
        (status, body.as_str()),
        (503, "kafka consumer not assigned yet")
    );
    job.stop().await?;

    // The real broker: ready once the group assigned the partition.
    let topic = unique("job-ready");
    create_topic(&topic, 1).await?;
    let job = Served::start(job_config(&topic, &unique("job-ready-group"), &[])).await?;
    timeout(WAIT, async {
        while http_get(job.http, "/readyz").await?.0 != 200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::Ok(())
    })
    .await
    .context("/readyz never said 200")??;
    job.stop().await?;
    Ok(())
}

#[tokio::test]
async fn metrics_count_records_deliveries_poison_and_comet_failures() -> Result {
    let topic = unique("job-metrics");
    create_topic(&topic, 1).await?;
    let comet = Comet::start("comet-x").await?;
    let mut client = comet.client("kx", "live://x").await?;
    // A comet whose port refuses connections: every call fails and retries.
    let refused = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let mut config = job_config(&topic, &unique("job-metrics-group"), &[&comet]);
    config.comets.push(StaticComet {
        name: "comet-refused".to_owned(),
        grpc: refused.to_string(),
    });
    config.calls.backoff = Duration::from_millis(10);
    config.calls.backoff_max = Duration::from_millis(10);
    config.drain_timeout = Duration::from_millis(200);
    let job = Served::start(config).await?;
    let producer = Producer::new(&topic)?;
    producer
        .send("kx", &push("comet-x", &["kx"], b"p1"))
        .await?;
    producer
        .send("kx", &push("comet-x", &["kx"], b"p2"))
        .await?;
    producer
        .send("kx", &push("comet-x", &["kx"], b"p3"))
        .await?;
    producer.send_raw("x", b"\xff\xff\xff").await?;
    producer
        .send("kr", &push("comet-refused", &["kr"], b"never"))
        .await?;
    for want in [&b"p1"[..], b"p2", b"p3"] {
        assert_eq!(&client.next_frame().await?.body[..], want);
    }
    job.wait_metric("herald_job_pushes_delivered_total{type=\"push\"}", |v| {
        v == 3.0
    })
    .await?;
    job.wait_metric(
        "herald_job_comet_call_retries_total{comet=\"comet-refused\"}",
        |v| v >= 2.0,
    )
    .await?;
    let text = job
        .wait_metric("herald_job_records_consumed_total", |v| v == 5.0)
        .await?;
    let get = |series: &str| sample(&text, series);
    assert_eq!(
        get("herald_job_pushes_delivered_total{type=\"push\"}"),
        Some(3.0)
    );
    assert_eq!(
        get("herald_job_poison_records_total{reason=\"undecodable\"}"),
        Some(1.0)
    );
    assert!(
        get("herald_job_comet_call_failures_total{comet=\"comet-refused\"}")
            .is_some_and(|v| v >= 2.0),
        "{text}"
    );
    assert_eq!(
        get("herald_job_comet_call_failures_total{comet=\"comet-x\"}"),
        None,
        "the healthy comet never failed"
    );
    // Three successful calls to comet-x, plus failed attempts to the other.
    assert!(
        get("herald_job_comet_call_seconds_count{rpc=\"PushMsg\"}").is_some_and(|v| v >= 3.0),
        "{text}"
    );
    // Only the record for the refused comet is still being delivered.
    job.wait_metric("herald_job_records_in_flight", |v| v == 1.0)
        .await?;
    // It pins its partition: the group's commit stays one record behind
    // the end (seen through librdkafka statistics, every 5 s).
    job.wait_metric("herald_job_committed_offset_lag", |v| v == 1.0)
        .await?;
    job.stop().await?;
    Ok(())
}

/// A record read back: key, value, headers.
type Record = (Option<Vec<u8>>, Vec<u8>, BTreeMap<String, String>);

/// Up to `n` records of `topic` partition 0 from the start, with headers.
fn read_all(topic: &str, n: usize) -> Result<Vec<Record>> {
    use rdkafka::Message;
    use rdkafka::message::Headers;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("dlq-reader"))
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while out.len() < n && std::time::Instant::now() < deadline {
        let Some(record) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let record = record?;
        let headers = record
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        let value = String::from_utf8_lossy(h.value.unwrap_or_default());
                        (h.key.to_owned(), value.into_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push((
            record.key().map(<[u8]>::to_vec),
            record.payload().unwrap_or_default().to_vec(),
            headers,
        ));
    }
    Ok(out)
}

#[tokio::test]
async fn poison_records_go_to_the_dead_letter_topic_before_their_offset_moves() -> Result {
    let topic = unique("job-dl-src");
    let dead = unique("job-dl");
    let group = unique("job-dl-group");
    create_topic(&topic, 1).await?;
    let comet = Comet::start("comet-d").await?;
    let mut client = comet.client("kd", "").await?;
    let producer = Producer::new(&topic)?;
    let mut unknown_type = push("comet-d", &["kd"], b"bad");
    unknown_type.r#type = 9;
    let big = push("comet-d", &["kd"], &[b'x'; 300]);
    let poison: Vec<(&str, Vec<u8>, &str)> = vec![
        ("k0", b"\xff\xff\xff\xff".to_vec(), "undecodable"),
        ("k1", unknown_type.encode_to_vec(), "unknown_type"),
        (
            "k2",
            push("comet-d", &[], b"no keys").encode_to_vec(),
            "empty_keys",
        ),
        ("k3", room("", b"no room").encode_to_vec(), "empty_keys"),
        ("k4", big.encode_to_vec(), "oversized"),
    ];
    for (key, value, _) in &poison {
        producer.send_raw(key, value).await?;
    }
    producer
        .send("kd", &push("comet-d", &["kd"], b"good"))
        .await?;
    let config = || {
        let mut config = job_config(&topic, &group, &[&comet]);
        config.dead_letter_topic = Some(dead.clone());
        config.max_record_bytes = 256;
        config.drain_timeout = Duration::from_millis(500);
        config
    };

    // Run 1: the dead-letter topic does not exist yet (the broker does not
    // create topics), so no write is acknowledged: the good record is
    // delivered, but the offset stays before the first poison record.
    let first = RunningJob::start(config())?;
    assert_eq!(&client.next_frame().await?.body[..], b"good");
    first
        .wait_stats("5 poison", |s| s.poison == 5 && s.records == 6)
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(first.stats().dead_lettered, 0);
    first.stop().await?;
    assert_eq!(
        committed(&topic, &group)?,
        Offset::Invalid,
        "nothing committed"
    );

    // Run 2, with the topic: every poison record is copied, then committed past.
    create_topic(&dead, 1).await?;
    let second = RunningJob::start(config())?;
    second
        .wait_stats("5 dead-lettered", |s| s.dead_lettered == 5)
        .await?;
    assert_eq!(&client.next_frame().await?.body[..], b"good", "redelivered");
    second.stop().await?;
    assert_eq!(committed(&topic, &group)?, Offset::Offset(6));

    let copies = read_all(&dead, 5)?;
    assert_eq!(copies.len(), 5, "dead-letter records");
    // Written in completion order, which may differ: compare sorted by key.
    let mut copies = copies;
    copies.sort_by(|a, b| a.0.cmp(&b.0));
    for (offset, ((key, value, reason), (got_key, got_value, headers))) in
        poison.iter().zip(&copies).enumerate()
    {
        assert_eq!(got_key.as_deref(), Some(key.as_bytes()));
        assert_eq!(got_value, value, "original bytes of {key}");
        assert_eq!(headers["herald-poison-reason"], *reason);
        assert_eq!(headers["herald-source-topic"], topic);
        assert_eq!(headers["herald-source-partition"], "0");
        assert_eq!(headers["herald-source-offset"], offset.to_string());
    }
    Ok(())
}

// ------------------------------------------------------- rooms filtering

/// A comet whose `Rooms` always fails; it counts the `BroadcastRoom` calls
/// it gets.
#[derive(Debug, Clone, Default)]
struct NoRooms {
    room_calls: std::sync::Arc<AtomicU64>,
}

#[tonic::async_trait]
impl herald_protocol::pb::Comet for NoRooms {
    async fn push_msg(
        &self,
        _req: Request<herald_protocol::pb::PushMsgReq>,
    ) -> Result<Response<herald_protocol::pb::goim::comet::PushMsgReply>, Status> {
        Ok(Response::new(Default::default()))
    }

    async fn broadcast(
        &self,
        _req: Request<herald_protocol::pb::BroadcastReq>,
    ) -> Result<Response<herald_protocol::pb::goim::comet::BroadcastReply>, Status> {
        Ok(Response::new(Default::default()))
    }

    async fn broadcast_room(
        &self,
        _req: Request<herald_protocol::pb::BroadcastRoomReq>,
    ) -> Result<Response<herald_protocol::pb::goim::comet::BroadcastRoomReply>, Status> {
        self.room_calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(Default::default()))
    }

    async fn rooms(
        &self,
        _req: Request<herald_protocol::pb::goim::comet::RoomsReq>,
    ) -> Result<Response<herald_protocol::pb::goim::comet::RoomsReply>, Status> {
        Err(Status::unavailable("rooms unknown"))
    }
}

#[tokio::test]
async fn room_pushes_skip_comets_without_members_but_not_unknown_ones() -> Result {
    const POLL: Duration = Duration::from_millis(100);
    let topic = unique("job-rooms");
    create_topic(&topic, 1).await?;
    let with = Comet::start("comet-with").await?;
    let without = Comet::start("comet-without").await?;
    let mut member = with.client("k1", "live://r").await?;
    let mut other = without.client("k2", "live://other").await?;
    let stub = NoRooms::default();
    let stub_listener = TcpListener::bind("127.0.0.1:0").await?;
    let stub_addr = stub_listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(herald_protocol::pb::CometServer::new(stub.clone()))
            .serve_with_incoming(TcpListenerStream::new(stub_listener)),
    );
    let mut config = job_config(&topic, &unique("job-rooms-group"), &[&with, &without]);
    config.comets.push(StaticComet {
        name: "comet-unknown".to_owned(),
        grpc: stub_addr.to_string(),
    });
    config.rooms_poll = Some(POLL);
    let job = RunningJob::start(config)?;
    // A few polls: every comet answered (or failed) at least once.
    tokio::time::sleep(POLL * 5).await;
    let producer = Producer::new(&topic)?;
    producer.send("live://r", &room("live://r", b"one")).await?;
    assert_eq!(&member.next_frame().await?.body[..], b"one");
    job.wait_stats("one skipped send", |s| s.room_skipped == 1)
        .await?;
    // The comet whose Rooms fails got the push anyway.
    job.wait_stats("2 room calls", |s| s.room_batches == 2)
        .await?;
    assert_eq!(stub.room_calls.load(Ordering::SeqCst), 1);
    expect_silence(&mut other, Duration::from_millis(200)).await?;

    // A member joins on the empty comet; once a poll has seen it, it gets
    // room pushes too (its rooms just changed: sent to regardless).
    let mut joined = without.client("k3", "live://r").await?;
    tokio::time::sleep(POLL * 3).await;
    producer.send("live://r", &room("live://r", b"two")).await?;
    assert_eq!(&member.next_frame().await?.body[..], b"two");
    assert_eq!(&joined.next_frame().await?.body[..], b"two");
    job.wait_stats("3 more room calls", |s| s.room_batches == 5)
        .await?;
    assert_eq!(job.stats().room_skipped, 1);
    job.stop().await?;
    Ok(())
}

#[tokio::test]
async fn nothing_is_lost_while_a_second_job_joins_and_the_first_leaves() -> Result {
    const N: usize = 3000;
    let topic = unique("job-rebalance");
    let group = unique("job-rebalance-group");
    create_topic(&topic, 4).await?;
    let comet = Comet::start("comet-b").await?;
    let mut client = comet.client("kb", "").await?;
    let producer = Producer::new(&topic)?;
    let records: Vec<(String, PushMsg)> = (0..N)
        .map(|i| {
            let body = format!("b{i:05}");
            (
                format!("part-{}", i % 11),
                push("comet-b", &["kb"], body.as_bytes()),
            )
        })
        .collect();
    // Produced in slices while the group changes under the consumers.
    let produce = tokio::spawn(async move {
        for chunk in records.chunks(100) {
            producer.send_all(chunk).await?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::Ok(())
    });
    let first = RunningJob::start(job_config(&topic, &group, &[&comet]))?;
    let mut seen = BTreeSet::new();
    while seen.len() < N / 4 {
        seen.insert(client.next_frame().await?.body);
    }
    let second = RunningJob::start(job_config(&topic, &group, &[&comet]))?;
    while seen.len() < N / 2 {
        seen.insert(client.next_frame().await?.body);
    }
    first.stop().await?;
    timeout(Duration::from_secs(60), async {
        while seen.len() < N {
            seen.insert(client.next_frame().await?.body);
        }
        anyhow::Ok(())
    })
    .await
    .with_context(|| format!("only {} of {N} arrived", seen.len()))??;
    produce.await??;
    let want: BTreeSet<Bytes> = (0..N).map(|i| Bytes::from(format!("b{i:05}"))).collect();
    assert_eq!(seen, want);
    assert!(second.stats().records > 0, "the second job took partitions");
    second.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_dead_comet_cannot_hold_up_the_others() -> Result {
    let live = Comet::start("comet-live").await?;
    let mut client = live.client("kl", "live://l").await?;
    let dead = black_hole().await?;
    let (queue, records) = MemoryQueue::new(16);
    let mut config = Config::new("unused:1", "unused", "unused");
    config.comets = vec![
        live.as_static(),
        herald_job::StaticComet {
            name: "comet-dead".to_owned(),
            grpc: dead.to_string(),
        },
    ];
    // Far fewer in-flight slots than records for the dead comet: without a
    // per-comet bound they would all be taken by calls that never finish.
    config.max_in_flight = 40;
    config.calls.max_queued = 8;
    config.calls.timeout = Duration::from_secs(2);
    let job = Job::start(&config)?;
    let (stop, stopped) = oneshot::channel::<()>();
    let runner = job.clone();
    let task = tokio::spawn(async move {
        source::channel(&runner, &config, records, async {
            let _ = stopped.await;
        })
        .await
    });
    // A separate task: without the bound, job would stop taking records and
    // these pushes would block; the reads below then time out and fail.
    let producer = tokio::spawn(async move {
        for i in 0..300u32 {
            let body = format!("n{i}");
            queue
                .push("kd", &push("comet-dead", &["kd"], body.as_bytes()))
                .await?;
            if i % 3 == 0 {
                queue
                    .push("kl", &push("comet-live", &["kl"], body.as_bytes()))
                    .await?;
            }
        }
        anyhow::Ok(())
    });
    for i in (0..300u32).step_by(3) {
        let frame = client.next_frame().await?;
        assert_eq!(&frame.body[..], format!("n{i}").as_bytes());
    }
    timeout(WAIT, producer).await???;
    let stats = job.stats();
    assert!(
        stats.queue_full >= 300 - 8 - 40,
        "dead comet's overflow not dropped: {stats:?}"
    );
    let _ = stop.send(());
    job.stop();
    let _ = timeout(WAIT, task).await?;
    Ok(())
}

// ------------------------------------------------------- push batching

/// A comet stub that holds every push call at a gate until it is opened, so
/// the records behind the first call queue up in job, and records each
/// push's frame with the RPC that carried it, and each batch's size. It serves `herald.push.v1` only when
/// started with batches (goim's comet does not).
#[derive(Debug, Clone)]
struct GatedComet {
    gate: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    seen: std::sync::Arc<std::sync::Mutex<Vec<(&'static str, Bytes)>>>,
    batch_sizes: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
}

impl GatedComet {
    async fn start(batches: bool) -> Result<(GatedComet, SocketAddr)> {
        let stub = GatedComet {
            gate: std::sync::Arc::new(tokio::sync::watch::channel(false).0),
            seen: Default::default(),
            batch_sizes: Default::default(),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let push = batches.then(|| {
            herald_protocol::pb::push::comet_push_server::CometPushServer::new(stub.clone())
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(herald_protocol::pb::CometServer::new(stub.clone()))
                .add_optional_service(push)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Ok((stub, addr))
    }

    async fn pass(&self) {
        let _ = self.gate.subscribe().wait_for(|open| *open).await;
    }

    fn record(&self, rpc: &'static str, req: herald_protocol::pb::PushMsgReq) {
        let frame = req.proto.map(|p| p.body).unwrap_or_default();
        self.seen.lock().expect("seen lock").push((rpc, frame));
    }

    fn seen(&self) -> Vec<(&'static str, Bytes)> {
        self.seen.lock().expect("seen lock").clone()
    }
}

#[tonic::async_trait]
impl herald_protocol::pb::Comet for GatedComet {
    async fn push_msg(
        &self,
        req: Request<herald_protocol::pb::PushMsgReq>,
    ) -> Result<Response<herald_protocol::pb::goim::comet::PushMsgReply>, Status> {
        self.pass().await;
        self.record("PushMsg", req.into_inner());
        Ok(Response::new(Default::default()))
    }

    async fn broadcast(
        &self,
        _req: Request<herald_protocol::pb::BroadcastReq>,
    ) -> Result<Response<herald_protocol::pb::goim::comet::BroadcastReply>, Status> {
        Err(Status::unimplemented("not in the stub"))
    }

    async fn broadcast_room(
        &self,
        _req: Request<herald_protocol::pb::BroadcastRoomReq>,
    ) -> Result<Response<herald_protocol::pb::goim::comet::BroadcastRoomReply>, Status> {
        Err(Status::unimplemented("not in the stub"))
    }

    async fn rooms(
        &self,
        _req: Request<herald_protocol::pb::goim::comet::RoomsReq>,
    ) -> Result<Response<herald_protocol::pb::goim::comet::RoomsReply>, Status> {
        Err(Status::unavailable("rooms unknown"))
    }
}

#[tonic::async_trait]
impl herald_protocol::pb::push::comet_push_server::CometPush for GatedComet {
    async fn push_msgs(
        &self,
        req: Request<herald_protocol::pb::push::PushMsgsReq>,
    ) -> Result<Response<herald_protocol::pb::push::PushMsgsReply>, Status> {
        self.pass().await;
        let pushes = req.into_inner().pushes;
        self.batch_sizes
            .lock()
            .expect("sizes lock")
            .push(pushes.len());
        for push in pushes {
            self.record("PushMsgs", push);
        }
        Ok(Response::new(Default::default()))
    }
}

/// Sends `n` pushes for the gated comet while its first `PushMsg` is held,
/// opens the gate once job has taken every record, and returns what the
/// comet saw and job's counts.
async fn gated_run(
    batches: bool,
    n: usize,
    done: impl Fn(&StatsSnapshot) -> bool,
) -> Result<(GatedComet, StatsSnapshot)> {
    let topic = unique("job-batch");
    create_topic(&topic, 1).await?;
    let (stub, addr) = GatedComet::start(batches).await?;
    let mut config = job_config(&topic, &unique("job-batch-group"), &[]);
    config.comets.push(StaticComet {
        name: "comet-g".to_owned(),
        grpc: addr.to_string(),
    });
    // The held call must not time out and be sent again meanwhile.
    config.calls.timeout = WAIT;
    let job = RunningJob::start(config)?;
    let records: Vec<(String, PushMsg)> = (0..n)
        .map(|i| {
            let key = format!("k{}", i % 3);
            let msg = push("comet-g", &[key.as_str()], format!("p{i:04}").as_bytes());
            ("one-partition".to_owned(), msg)
        })
        .collect();
    Producer::new(&topic)?.send_all(&records).await?;
    job.wait_stats("every record taken", |s| s.records == n as u64)
        .await?;
    // Job took them all while the first call is held: the rest are queued.
    stub.gate.send_replace(true);
    job.wait_stats("every call answered", done)
        .await
        .with_context(|| format!("comet saw {} of {n} pushes", stub.seen().len()))?;
    let stats = job.stats();
    job.stop().await?;
    Ok((stub, stats))
}

/// The frames' bodies in the order the comet saw them.
fn bodies(seen: &[(&'static str, Bytes)]) -> Vec<String> {
    seen.iter()
        .map(|(_, frame)| {
            String::from_utf8_lossy(&frame[frame.len().saturating_sub(5)..]).into_owned()
        })
        .collect()
}

#[tokio::test]
async fn queued_pushes_go_to_a_herald_comet_in_batches_in_order() -> Result {
    const N: usize = 30;
    let every_push = |s: &StatsSnapshot| s.push_batched + s.calls - s.push_batches == N as u64;
    let (stub, stats) = gated_run(true, N, every_push).await?;
    let seen = stub.seen();
    let want: Vec<String> = (0..N).map(|i| format!("p{i:04}")).collect();
    assert_eq!(bodies(&seen), want, "every push once, in order");
    // Whatever the first call carried, at least 10 pushes queued behind it
    // (a batch holds at most 20, the default) and went out batched.
    let sizes = stub.batch_sizes.lock().expect("sizes lock").clone();
    assert!(stats.push_batches >= 1, "{stats:?}");
    assert_eq!(sizes.len() as u64, stats.push_batches);
    assert_eq!(sizes.iter().sum::<usize>() as u64, stats.push_batched);
    assert!(sizes.iter().all(|n| (2..=20).contains(n)), "{sizes:?}");
    let singles = seen.iter().filter(|(rpc, _)| *rpc == "PushMsg").count() as u64;
    assert_eq!(singles, stats.calls - stats.push_batches);
    assert_eq!(
        (stats.rejected, stats.comet_gone, stats.queue_full),
        (0, 0, 0)
    );
    Ok(())
}

#[tokio::test]
async fn a_goim_comet_without_batches_gets_one_push_msg_per_push() -> Result {
    const N: usize = 30;
    let (stub, stats) = gated_run(false, N, |s| s.calls == N as u64).await?;
    let seen = stub.seen();
    let want: Vec<String> = (0..N).map(|i| format!("p{i:04}")).collect();
    assert_eq!(bodies(&seen), want, "every push once, in order");
    assert!(seen.iter().all(|(rpc, _)| *rpc == "PushMsg"));
    // The refused batch is neither a delivery nor a drop.
    assert_eq!((stats.push_batches, stats.push_batched), (0, 0));
    assert_eq!(stats.calls, N as u64);
    assert_eq!(
        (stats.rejected, stats.comet_gone, stats.queue_full),
        (0, 0, 0)
    );
    Ok(())
}
