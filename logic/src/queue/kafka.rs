//! [`PushQueue`] on Kafka: an idempotent `acks=all` producer, so a push the
//! HTTP API reported as done survives a broker failover and a retried send
//! is not duplicated by the producer itself.

use std::time::Duration;

use futures::future::BoxFuture;
use herald_protocol::pb::PushMsg;
use prost::Message;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use super::{Error, PushQueue, Result};

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
        } = config;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set(
                "message.timeout.ms",
                message_timeout.as_millis().max(1).to_string(),
            )
            // Pushes are latency-sensitive and small; do not wait to batch.
            .set("linger.ms", "0")
            .create()
            .map_err(Error::Config)?;
        Ok(KafkaQueue {
            producer,
            topic,
            enqueue_timeout: message_timeout,
        })
    }
}

impl PushQueue for KafkaQueue {
    fn push<'a>(&'a self, key: &'a str, msg: &'a PushMsg) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let value = msg.encode_to_vec();
            let record = FutureRecord::to(&self.topic).key(key).payload(&value);
            // Bounds the wait for room in a full local queue; once queued,
            // message.timeout.ms bounds the delivery report.
            self.producer
                .send(record, Timeout::After(self.enqueue_timeout))
                .await
                .map(|_| ())
                .map_err(|(err, _)| Error::Produce(err))
        })
    }
}
