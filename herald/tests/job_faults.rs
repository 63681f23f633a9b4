//! Job when things go wrong: poison records (skipped, or copied to the
//! dead-letter topic before their offset moves), restarts and rebalances
//! (at least once, nothing lost), comets that leave the node list, never
//! answer, or fall behind. Against the test bed's real Kafka and
//! `herald_comet::run` on 127.0.0.1:0 with a stub logic.
//!
//! Needs `HERALD_KAFKA_BROKERS` (source `target/testbed/env` after
//! `e2e/services/up.sh kafka`); panics without it rather than skipping.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use herald_e2e::unique_name;
use herald_job::{Config, Job, StaticComet, source};
use herald_logic::queue::PushQueue;
use herald_logic::queue::memory::MemoryQueue;
use herald_protocol::pb::PushMsg;
use herald_testkit::expect_silence;
use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::timeout;

mod common;

use common::LocalComet as Comet;
use common::job::{
    NodeListFile, Producer, RunningJob, WAIT, brokers, committed, create_topic, fresh_topic,
    job_config, push, room,
};

type Result<T = (), E = anyhow::Error> = std::result::Result<T, E>;

#[tokio::test]
async fn poison_records_are_skipped_and_committed_past() -> Result {
    let (topic, group) = fresh_topic("job-poison", 1).await?;
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
    let (topic, group) = fresh_topic("job-alo", 3).await?;
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
    let (topic, group) = fresh_topic("job-gone", 1).await?;
    let comet = Comet::start("comet-n").await?;
    let mut client = comet.client("kn", "live://n").await?;
    let list = NodeListFile::new()?;
    let write_list = |nodes: serde_json::Value| {
        list.write(&serde_json::json!({"generation": 1, "nodes": nodes}))
    };
    let dead = black_hole().await?;
    write_list(serde_json::json!([
        {"name": "comet-n", "grpc": comet.grpc.to_string()},
        {"name": "comet-dead", "grpc": dead.to_string()},
    ]))?;
    let mut config = job_config(&topic, &group, &[]);
    config.node_list = Some(list.source(Duration::from_millis(50)));
    config.calls.timeout = Duration::from_millis(200);
    config.calls.attempts = 2;
    config.calls.backoff = Duration::from_millis(20);
    let job = RunningJob::start(config)?;
    let producer = Producer::new(&topic)?;
    producer.push("comet-dead", "kd", b"never").await?;
    producer.room("live://n", b"room for both").await?;
    // The room record reaches the live comet while the dead one retries.
    assert_eq!(&client.next_frame().await?.body[..], b"room for both");
    // Still listed: retried, not dropped.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(job.stats().comet_gone, 0, "{:?}", job.stats());

    write_list(serde_json::json!([{"name": "comet-n", "grpc": comet.grpc.to_string()}]))?;
    job.wait_stats("both dead calls dropped", |s| s.comet_gone == 2)
        .await?;
    producer.push("comet-dead", "kd", b"unknown now").await?;
    producer.push("comet-n", "kn", b"still flowing").await?;
    assert_eq!(&client.next_frame().await?.body[..], b"still flowing");
    job.wait_stats("one unknown comet", |s| s.unknown_comet == 1)
        .await?;
    job.stop().await?;
    assert_eq!(committed(&topic, &group)?, Offset::Offset(4));
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
        .set("group.id", unique_name("dlq-reader"))
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
    let (topic, group) = fresh_topic("job-dl-src", 1).await?;
    let dead = unique_name("job-dl");
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
    producer.push("comet-d", "kd", b"good").await?;
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

#[tokio::test]
async fn nothing_is_lost_while_a_second_job_joins_and_the_first_leaves() -> Result {
    const N: usize = 3000;
    let (topic, group) = fresh_topic("job-rebalance", 4).await?;
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
