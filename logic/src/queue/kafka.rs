//! [`PushQueue`] on Kafka: an idempotent `acks=all` producer, so a push the
//! HTTP API reported as done survives a broker failover and a retried send
//! is not duplicated by the producer itself.
//!
//! Two producers, picked per record by how many records await their
//! acknowledgement. While few do, a record goes out at once (`linger.ms` 0
//! by default): a lone push should not wait for company. Once many do, it
//! goes to a second producer that lingers (1 ms by default) and fills
//! batches. One producer cannot do both: its linger is fixed when it is
//! built, and with no linger under load librdkafka sends batches of one or
//! two records until the idempotent producer's five requests per partition
//! are in flight, then its broker thread polls with a zero timeout until an
//! answer arrives (hundreds of thousands of `poll` calls a second at 10k
//! pushes/s), taking the core from everything else on it. Measured with 64
//! concurrent HTTP callers against logic, job and comet on one core: 74-102
//! µs of CPU per push with one producer without linger, 67-74 µs with 1 ms,
//! 64-72 µs with the two.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use herald_protocol::pb::PushMsg;
use herald_runtime::kafka_security::KafkaSecurity;
use prost::Message;
use rdkafka::error::KafkaError;
use rdkafka::producer::Producer;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, ClientContext};

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
    /// The linger of the producer used while logic is busy (see the module
    /// docs); equal to `linger`, there is one producer.
    pub busy_linger: Duration,
    /// Records awaiting acknowledgement from which logic counts as busy.
    pub busy_in_flight: usize,
    /// TLS and SASL (shared with job, `herald_runtime::kafka_security`).
    pub security: KafkaSecurity,
}

/// The producers' librdkafka context: logs librdkafka's errors and keeps
/// the last authentication failure (a wrong SASL user or password), which
/// librdkafka reports only here, for readiness to name.
#[derive(Clone, Debug, Default)]
pub struct AuthWatch(Arc<Mutex<Option<String>>>);

impl AuthWatch {
    /// The last authentication failure since the last successful probe.
    fn failure(&self) -> Option<String> {
        // Poisoned only if a holder panicked mid-assignment: the value is
        // still a whole `Option<String>`.
        match self.0.lock() {
            Ok(last) => last.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set(&self, failure: Option<String>) {
        match self.0.lock() {
            Ok(mut last) => *last = failure,
            Err(poisoned) => *poisoned.into_inner() = failure,
        }
    }
}

impl ClientContext for AuthWatch {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Authentication) {
            self.set(Some(reason.to_owned()));
        }
        tracing::error!(target: "librdkafka", cause = %error, "librdkafka: {reason}");
    }
}

type WatchedProducer = FutureProducer<AuthWatch>;

/// Kafka-backed push queue.
#[derive(Clone)]
pub struct KafkaQueue {
    /// Sends at once (`linger`).
    producer: WatchedProducer,
    /// Lingers (`busy_linger`); `None` when both lingers are equal.
    busy: Option<WatchedProducer>,
    /// Authentication failures of both producers.
    auth: AuthWatch,
    busy_in_flight: usize,
    /// Records handed to a producer and not yet acknowledged or failed.
    in_flight: Arc<AtomicUsize>,
    /// Records sent through each producer: `[at once, lingering]`.
    sent: Arc<[AtomicU64; 2]>,
    topic: String,
    enqueue_timeout: Duration,
}

/// Whether a record goes to the lingering producer: once `in_flight`
/// records (this one not counted) await acknowledgement and `threshold` is
/// reached. Records that overlap in time have no order between them (two
/// HTTP requests in flight at once), so a record sent at once may overtake
/// one still lingering; a caller that waits for each answer before its next
/// push gets them in order whichever producer each one took.
fn lingers(in_flight: usize, threshold: usize) -> bool {
    in_flight >= threshold
}

/// Counts a record in flight until dropped (answered, failed or abandoned
/// by a caller that went away).
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
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
            busy_linger,
            busy_in_flight,
            security,
        } = config;
        let mut base = ClientConfig::new();
        for (key, value) in security.client_settings() {
            base.set(key, value);
        }
        let auth = AuthWatch::default();
        let build = |linger: Duration| -> Result<WatchedProducer> {
            base.clone()
                .set("bootstrap.servers", &brokers)
                .set("acks", "all")
                .set("enable.idempotence", "true")
                .set(
                    "message.timeout.ms",
                    message_timeout.as_millis().max(1).to_string(),
                )
                // Fractional milliseconds are allowed.
                .set("linger.ms", (linger.as_secs_f64() * 1e3).to_string())
                .create_with_context(auth.clone())
                .map_err(Error::Config)
        };
        let busy = if busy_linger == linger {
            None
        } else {
            Some(build(busy_linger)?)
        };
        Ok(KafkaQueue {
            producer: build(linger)?,
            busy,
            auth,
            busy_in_flight,
            in_flight: Arc::new(AtomicUsize::new(0)),
            sent: Arc::new([AtomicU64::new(0), AtomicU64::new(0)]),
            topic,
            enqueue_timeout: message_timeout,
        })
    }

    /// Records sent so far: `(at once, through the lingering producer)`.
    pub fn sent(&self) -> (u64, u64) {
        (
            self.sent[0].load(Ordering::Relaxed),
            self.sent[1].load(Ordering::Relaxed),
        )
    }
}

impl KafkaQueue {
    /// Writes `value` under `key` and waits for the acknowledgement.
    async fn send_bytes(&self, key: &str, value: &[u8]) -> Result<RecordId> {
        let record = FutureRecord::to(&self.topic).key(key).payload(value);
        let before = self.in_flight.fetch_add(1, Ordering::Relaxed);
        let _counted = InFlight(&self.in_flight);
        let (producer, which) = match &self.busy {
            Some(busy) if lingers(before, self.busy_in_flight) => (busy, 1),
            _ => (&self.producer, 0),
        };
        self.sent[which].fetch_add(1, Ordering::Relaxed);
        // Bounds the wait for room in a full local queue; once queued,
        // message.timeout.ms bounds the delivery report.
        producer
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
            let auth = self.auth.clone();
            let probe = tokio::task::spawn_blocking(move || {
                producer
                    .client()
                    .fetch_metadata(Some(&topic), Duration::from_secs(1))
                    .map_err(|err| match auth.failure() {
                        Some(reason) => Error::Auth(reason),
                        None => Error::Produce(err),
                    })
                    .inspect(|_| auth.set(None))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_linger_only_once_enough_await_acknowledgement() {
        assert!(!lingers(0, 8), "a lone push goes out at once");
        assert!(!lingers(7, 8));
        assert!(lingers(8, 8));
        assert!(lingers(500, 8));
        assert!(lingers(1, 1));
    }

    #[test]
    fn equal_lingers_build_one_producer_and_counts_start_at_zero() {
        let config = |busy_linger| KafkaConfig {
            brokers: "127.0.0.1:1".to_owned(),
            topic: "t".to_owned(),
            message_timeout: Duration::from_secs(1),
            linger: Duration::ZERO,
            busy_linger,
            busy_in_flight: 8,
            security: KafkaSecurity::default(),
        };
        let one = KafkaQueue::new(config(Duration::ZERO)).expect("valid config");
        assert!(one.busy.is_none());
        let two = KafkaQueue::new(config(Duration::from_millis(1))).expect("valid config");
        assert!(two.busy.is_some());
        assert_eq!(two.sent(), (0, 0));
        assert_eq!(two.in_flight.load(Ordering::Relaxed), 0);
    }
}
