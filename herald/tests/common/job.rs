//! Job against the test bed's real Kafka (`HERALD_KAFKA_BROKERS`) and
//! in-process comets: topics, a producer, committed offsets, the records
//! logic would write, and job itself run in-process ([`RunningJob`]).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use herald_client::{Client, Token};
use herald_e2e::unique_name;
use herald_job::{Config, Job, StaticComet, StatsSnapshot, source};
use herald_protocol::pb::{PushMsg, push_msg};
use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::time::timeout;

use super::{LocalComet, Stoppable};

/// Bound on every wait.
pub(crate) const WAIT: Duration = Duration::from_secs(20);

/// Bytes written as hex pairs (whitespace between them ignored).
pub(crate) fn hex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
        .collect()
}

/// goim's T5: a keys push of `hello` (op 1000) on TCP.
pub(crate) const T5: &str = "00 00 00 15 00 10 00 01 00 00 03 e8 00 00 00 00 68 65 6c 6c 6f";
/// goim's T7: two room pushes on TCP.
pub(crate) const T7: &str =
    "00 00 00 1a 00 10 00 01 00 00 03 e8 00 00 00 00 7b 22 74 65 73 74 22 3a 31 7d
00 00 00 1a 00 10 00 01 00 00 03 e8 00 00 00 00 7b 22 74 65 73 74 22 3a 32 7d";

// ------------------------------------------------------------------ kafka

/// The test bed's brokers; panics without them rather than skipping.
pub(crate) fn brokers() -> String {
    herald_e2e::testbed_var("HERALD_KAFKA_BROKERS")
}

/// A topic on the test bed's Kafka.
pub(crate) async fn create_topic(topic: &str, partitions: i32) -> Result<()> {
    super::create_topic(&brokers(), topic, partitions).await
}

/// A fresh topic of `partitions` named after `prefix`, and a fresh
/// consumer group for it.
pub(crate) async fn fresh_topic(prefix: &str, partitions: i32) -> Result<(String, String)> {
    let topic = unique_name(prefix);
    create_topic(&topic, partitions).await?;
    Ok((topic, unique_name(&format!("{prefix}-group"))))
}

/// An idempotent producer (acks=all) for one topic.
pub(crate) struct Producer {
    producer: FutureProducer,
    topic: String,
}

impl Producer {
    pub(crate) fn new(topic: &str) -> Result<Producer> {
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

    pub(crate) async fn send_raw(&self, key: &str, value: &[u8]) -> Result<()> {
        self.producer
            .send(
                FutureRecord::to(&self.topic).key(key).payload(value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(err, _)| anyhow::anyhow!("produce: {err}"))?;
        Ok(())
    }

    pub(crate) async fn send(&self, key: &str, msg: &PushMsg) -> Result<()> {
        self.send_raw(key, &msg.encode_to_vec()).await
    }

    /// A [`push`] to `key` on comet `server`, keyed by `key`.
    pub(crate) async fn push(&self, server: &str, key: &str, body: &[u8]) -> Result<()> {
        self.send(key, &push(server, &[key], body)).await
    }

    /// A [`room`] push, keyed by the room.
    pub(crate) async fn room(&self, name: &str, body: &[u8]) -> Result<()> {
        self.send(name, &room(name, body)).await
    }

    /// Enqueues all, then waits for every acknowledgement (idempotent
    /// producer: per-partition order is kept).
    pub(crate) async fn send_all(&self, records: &[(String, PushMsg)]) -> Result<()> {
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
pub(crate) fn committed(topic: &str, group: &str) -> Result<Offset> {
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

// ---------------------------------------------------------------- records

/// A PUSH record: op 1000 to `keys` on comet `server`.
pub(crate) fn push(server: &str, keys: &[&str], body: &[u8]) -> PushMsg {
    PushMsg {
        r#type: push_msg::Type::Push as i32,
        operation: 1000,
        server: server.to_owned(),
        keys: keys.iter().map(|k| (*k).to_owned()).collect(),
        msg: Bytes::copy_from_slice(body),
        ..Default::default()
    }
}

/// A ROOM record: op 1000 to `room`.
pub(crate) fn room(room: &str, body: &[u8]) -> PushMsg {
    PushMsg {
        r#type: push_msg::Type::Room as i32,
        operation: 1000,
        room: room.to_owned(),
        msg: Bytes::copy_from_slice(body),
        ..Default::default()
    }
}

/// A BROADCAST record: op 1000 to everyone.
pub(crate) fn broadcast(body: &[u8], speed: i32) -> PushMsg {
    PushMsg {
        r#type: push_msg::Type::Broadcast as i32,
        operation: 1000,
        speed,
        msg: Bytes::copy_from_slice(body),
        ..Default::default()
    }
}

// ------------------------------------------------------------------ comet

impl LocalComet {
    /// This comet as job's static configuration lists it.
    pub(crate) fn as_static(&self) -> StaticComet {
        StaticComet {
            name: self.name.clone(),
            grpc: self.grpc.to_string(),
        }
    }

    /// A TCP client of this comet, authenticated with `key` in `room`.
    pub(crate) async fn client(&self, key: &str, room: &str) -> Result<Client> {
        let mut client = Client::connect_tcp(self.tcp).await?.with_timeout(WAIT);
        client
            .auth(&Token::new(1, key).room(room).accepts([1000]))
            .await?;
        Ok(client)
    }
}

// -------------------------------------------------------------------- job

/// Job consuming Kafka in this process; stopped when dropped.
pub(crate) struct RunningJob {
    job: Job,
    task: Stoppable<herald_job::Error>,
}

impl RunningJob {
    pub(crate) fn start(config: Config) -> Result<RunningJob> {
        let job = Job::start(&config)?;
        let runner = job.clone();
        let task = Stoppable::spawn(|stopped| async move {
            let result = source::kafka(&runner, &config, stopped).await;
            runner.stop();
            result
        });
        Ok(RunningJob { job, task })
    }

    pub(crate) fn stats(&self) -> StatsSnapshot {
        self.job.stats()
    }

    pub(crate) async fn wait_stats(
        &self,
        what: &str,
        pred: impl Fn(&StatsSnapshot) -> bool,
    ) -> Result<()> {
        timeout(WAIT, async {
            while !pred(&self.stats()) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .with_context(|| format!("job never reached {what}: {:?}", self.stats()))
    }

    pub(crate) async fn stop(mut self) -> Result<()> {
        self.task.stop(WAIT).await.context("job")
    }
}

impl Drop for RunningJob {
    fn drop(&mut self) {
        self.job.stop();
    }
}

/// A node-list file job reads, in a fresh temporary directory that goes
/// when this is dropped.
pub(crate) struct NodeListFile {
    dir: PathBuf,
}

impl NodeListFile {
    pub(crate) fn new() -> Result<NodeListFile> {
        let dir = std::env::temp_dir().join(unique_name("job-nodes"));
        std::fs::create_dir_all(&dir)?;
        Ok(NodeListFile { dir })
    }

    /// Replaces the document: written aside and renamed, as a ConfigMap
    /// update is, so job never reads half a file.
    pub(crate) fn write(&self, document: &serde_json::Value) -> Result<()> {
        let tmp = self.dir.join("nodes.json.tmp");
        std::fs::write(&tmp, document.to_string())?;
        std::fs::rename(&tmp, self.dir.join("nodes.json"))?;
        Ok(())
    }

    /// The document's path (for a `--node-list` flag).
    pub(crate) fn path(&self) -> PathBuf {
        self.dir.join("nodes.json")
    }

    /// Job's setting for it, read every `poll`.
    pub(crate) fn source(&self, poll: Duration) -> herald_runtime::nodes::Source {
        herald_runtime::nodes::Source::File {
            path: self.path(),
            poll,
        }
    }
}

impl Drop for NodeListFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Job's configuration for `topic` and `group`, with `comets` listed
/// statically and a 5 s drain.
pub(crate) fn job_config(topic: &str, group: &str, comets: &[&LocalComet]) -> Config {
    let mut config = Config::new(&brokers(), topic, group);
    config.comets = comets.iter().map(|c| c.as_static()).collect();
    config.drain_timeout = Duration::from_secs(5);
    config
}
