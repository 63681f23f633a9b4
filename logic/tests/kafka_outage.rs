//! Kafka dies under load: logic answers 503 with `Retry-After` (never 200)
//! for every push it could not get acknowledged, is not ready meanwhile,
//! recovers on its own when the broker is back, and every push it did
//! answer 200 is in the topic afterwards (acknowledged and lost = 0).
//!
//! The broker is this test's own (e2e/services/kafka.sh with a private run
//! directory), so killing it does not disturb other tests.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use herald_protocol::pb::PushMsg;
use prost::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};

/// A Kafka broker started by the test-bed script in a private directory;
/// stopped (by the pid the script recorded) when dropped.
struct OwnKafka {
    run: PathBuf,
    brokers: String,
}

impl OwnKafka {
    fn script(verb: &str, run: &Path) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../e2e/services/kafka.sh");
        let out = Command::new("bash")
            .arg(script)
            .arg(verb)
            .env("HERALD_RUN", run)
            .output()
            .expect("run kafka.sh");
        assert!(
            out.status.success(),
            "kafka.sh {verb} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start() -> OwnKafka {
        let run = Path::new(env!("CARGO_TARGET_TMPDIR")).join(unique("kafka-outage"));
        std::fs::create_dir_all(&run).expect("run dir");
        Self::script("start", &run);
        let env = std::fs::read_to_string(run.join("kafka.env")).expect("kafka.env");
        let brokers = env
            .lines()
            .find_map(|line| line.strip_prefix("export HERALD_KAFKA_BROKERS="))
            .expect("brokers line")
            .to_owned();
        OwnKafka { run, brokers }
    }
}

impl Drop for OwnKafka {
    fn drop(&mut self) {
        Self::script("stop", &self.run);
        let _ = std::fs::remove_dir_all(&self.run);
    }
}

async fn create_topic_on(brokers: &str, topic: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin");
    let res = admin
        .create_topics(
            &[NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(WAIT)),
        )
        .await
        .expect("create topic");
    assert!(res.iter().all(Result::is_ok), "{res:?}");
}

#[derive(Default)]
struct Tally {
    acked: BTreeSet<u64>,
    refused: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_killed_under_load_loses_no_acknowledged_push() {
    let kafka = OwnKafka::start();
    let topic = unique("outage");
    create_topic_on(&kafka.brokers, &topic).await;
    let mut cfg = config(&topic);
    cfg.kafka.brokers = kafka.brokers.clone();
    cfg.kafka.message_timeout = Duration::from_secs(2);
    let logic = Logic::start(cfg).await;

    // 4 concurrent pushers, each numbering its bodies; only 200 counts as
    // acknowledged, 503 + Retry-After is the only other answer allowed.
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut pushers = Vec::new();
    for worker in 0..4u64 {
        let (tally, stop, addr) = (tally.clone(), stop.clone(), logic.http);
        pushers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let seq = worker * 1_000_000 + n;
                n += 1;
                let ans = http(
                    addr,
                    "POST",
                    "/goim/push/room?operation=1000&type=live&room=outage",
                    seq.to_string().as_bytes(),
                    None,
                )
                .await;
                let mut t = tally.lock().expect("tally");
                match ans.status {
                    200 => {
                        t.acked.insert(seq);
                    }
                    503 => {
                        assert!(ans.headers.contains_key("retry-after"), "{ans:?}");
                        t.refused += 1;
                    }
                    other => panic!("unexpected status {other}: {ans:?}"),
                }
            }
        }));
    }
    let acked = || tally.lock().expect("tally").acked.len();
    eventually("pushes acknowledged before the crash", || async {
        (acked() >= 200).then_some(())
    })
    .await;

    OwnKafka::script("crash", &kafka.run);
    let crashed_at = acked();
    eventually("pushes refused while kafka is down", || async {
        (tally.lock().expect("tally").refused >= 8).then_some(())
    })
    .await;
    assert_eq!(get_text(logic.http, "/readyz").await.0, 503);
    let during = acked();

    OwnKafka::script("resume", &kafka.run);
    eventually("pushes acknowledged again after the restart", || async {
        (acked() >= during + 200).then_some(())
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in pushers {
        p.await.expect("pusher");
    }
    let tally = Arc::try_unwrap(tally)
        .ok()
        .expect("pushers done")
        .into_inner()
        .expect("tally");

    // Read the whole topic back and look for every acknowledged number.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", unique("outage-check"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Beginning)
        .expect("partition");
    consumer.assign(&tpl).expect("assign");
    let mut seen = BTreeSet::new();
    let mut records = 0u64;
    while !tally.acked.is_subset(&seen) {
        let msg = tokio::time::timeout(WAIT, consumer.recv())
            .await
            .unwrap_or_else(|_| {
                let lost: Vec<_> = tally.acked.difference(&seen).take(10).collect();
                panic!(
                    "acknowledged pushes missing from the topic ({} lost, e.g. {lost:?})",
                    tally.acked.difference(&seen).count()
                )
            })
            .expect("kafka recv");
        let push = PushMsg::decode(msg.payload().unwrap_or_default()).expect("PushMsg");
        let seq: u64 = std::str::from_utf8(&push.msg)
            .expect("utf-8")
            .parse()
            .expect("seq");
        records += 1;
        seen.insert(seq);
    }
    println!(
        "kafka outage: acknowledged {} (before crash {crashed_at}, during {}), refused {}, \
         records read {records}, acknowledged lost 0",
        tally.acked.len(),
        during - crashed_at,
        tally.refused,
    );
    logic.stop().await;
    drop(kafka);
}
