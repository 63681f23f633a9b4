//! [`PushQueue`] on Kafka: an idempotent `acks=all` producer, so a push the
//! HTTP API reported as done survives a broker failover and a retried send
//! is not duplicated by the producer itself.

use std::time::Duration;

use futures::future::BoxFuture;
use herald_protocol::pb::PushMsg;
use prost::Message;
use rdkafka::ClientConfig;
use rdkafka::producer::Producer;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use super::{Error, PushQueue, RecordId, Result, Upstream};

/// Producer settings.
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    /// `host:port[,host:port...]`.
    pub brokers: String,
    /// The push topic (§10, e.g. `goim-push-topic`).
    pub topic: String,
    /// Upper bound for one record to be acknowledged, retries included
    /// (`message.timeout.ms`); the HTTP caller waits at most this long.
    pub message_timeout: Duration,
    /// How long the producer waits for more records before sending a batch
    /// (`linger.ms`). Zero (the default) sends at once: pushes are small and
    /// latency-bound, and records still batch while requests are in flight.
    /// A little linger lowers the CPU per push, here and on the brokers,
    /// when logic is busy, at the cost of up to that much added latency.
    pub linger: Duration,
}

/// Kafka-backed push queue.
#[derive(Clone)]
pub struct KafkaQueue {
    producer: FutureProducer,
    topic: String,
    enqueue_timeout: Duration,
}

impl std::fmt::Debug for KafkaQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaQueue")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl KafkaQueue {
    /// Builds the producer; it connects in the background.
    ///
    /// # Errors
    /// librdkafka rejecting the configuration.
    pub fn new(config: KafkaConfig) -> Result<Self> {
        let KafkaConfig {
            brokers,
            topic,
            message_timeout,
            linger,
        } = config;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set(
                "message.timeout.ms",
                message_timeout.as_millis().max(1).to_string(),
            )
            // Fractional milliseconds are allowed.
            .set("linger.ms", (linger.as_secs_f64() * 1e3).to_string())
            .create()
            .map_err(Error::Config)?;
        Ok(KafkaQueue {
            producer,
            topic,
            enqueue_timeout: message_timeout,
        })
    }
}

impl KafkaQueue {
    /// Writes `value` under `key` and waits for the acknowledgement.
    async fn send_bytes(&self, key: &str, value: &[u8]) -> Result<RecordId> {
        let record = FutureRecord::to(&self.topic).key(key).payload(value);
        // Bounds the wait for room in a full local queue; once queued,
        // message.timeout.ms bounds the delivery report.
        self.producer
            .send(record, Timeout::After(self.enqueue_timeout))
            .await
            .map(|d| RecordId {
                partition: d.partition,
                offset: d.offset,
            })
            .map_err(|(err, _)| Error::Produce(err))
    }
}

impl PushQueue for KafkaQueue {
    fn push<'a>(&'a self, key: &'a str, msg: &'a PushMsg) -> BoxFuture<'a, Result<RecordId>> {
        Box::pin(async move { self.send_bytes(key, &msg.encode_to_vec()).await })
    }

    /// Ready when the broker answers a metadata request for the topic within
    /// a second (librdkafka's call blocks, so it runs off the async workers).
    fn ready(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let producer = self.producer.clone();
            let topic = self.topic.clone();
            let probe = tokio::task::spawn_blocking(move || {
                producer
                    .client()
                    .fetch_metadata(Some(&topic), Duration::from_secs(1))
                    .map_err(Error::Produce)
                    .and_then(|md| match md.topics().first() {
                        Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(()),
                        _ => Err(Error::Produce(rdkafka::error::KafkaError::MetadataFetch(
                            rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition,
                        ))),
                    })
            });
            probe.await.map_err(|_| Error::Closed)?
        })
    }
}

impl Upstream for KafkaQueue {
    fn send<'a>(&'a self, key: &'a str, value: &'a [u8]) -> BoxFuture<'a, Result<RecordId>> {
        Box::pin(self.send_bytes(key, value))
    }
}
