//! Where records come from: a Kafka consumer group, or an in-process channel.
//!
//! Both submit records in arrival order (so per-partition, per-room order
//! reaches each comet worker unchanged) and keep at most `max_in_flight`
//! records being delivered.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use herald_protocol::pb::PushMsg;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::comets::Stats;
use crate::offsets::Tracker;
use crate::{Config, Error, Job, Outcome, Poison, Result};

/// librdkafka callbacks: readiness on assignment, revocations for the
/// offset tracker, lag from statistics.
struct Context {
    job: Job,
    /// Partitions taken away since the consume loop last looked. Their
    /// tracking must be dropped: if one comes back later, starting from the
    /// group's commit, stale "highest started" state could otherwise store
    /// an offset past records the new run has not delivered yet.
    revoked: std::sync::Mutex<Vec<i32>>,
}

impl Context {
    fn take_revoked(&self) -> Vec<i32> {
        match self.revoked.lock() {
            Ok(mut revoked) => std::mem::take(&mut *revoked),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        }
    }
}

impl Context {
    fn set_auth_failure(&self, failure: Option<String>) {
        match self.job.auth_failure.lock() {
            Ok(mut last) => *last = failure,
            Err(poisoned) => *poisoned.into_inner() = failure,
        }
    }
}

impl ClientContext for Context {
    fn stats(&self, statistics: Statistics) {
        // consumer_lag is -1 while unknown (nothing committed or fetched yet).
        let lag = statistics
            .topics
            .values()
            .flat_map(|t| t.partitions.values())
            .filter(|p| p.partition >= 0 && p.consumer_lag >= 0)
            .map(|p| p.consumer_lag)
            .sum();
        self.job.stats.metrics.set_lag(lag);
    }
}

impl ConsumerContext for Context {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                info!(partitions = partitions.count(), "partitions assigned");
                self.set_auth_failure(None);
                self.job.ready.store(true, Ordering::SeqCst);
            }
            Rebalance::Revoke(partitions) => {
                info!(partitions = partitions.count(), "partitions revoked");
                let mut revoked = match self.revoked.lock() {
                    Ok(revoked) => revoked,
                    Err(poisoned) => poisoned.into_inner(),
                };
                revoked.extend(partitions.elements().iter().map(|p| p.partition()));
            }
            Rebalance::Error(err) => warn!(cause = %err, "rebalance failed"),
        }
    }
}

/// Copies poison records to a dead-letter topic.
#[derive(Clone)]
struct DeadLetter {
    producer: FutureProducer,
    topic: Arc<str>,
    source: Arc<str>,
    stats: Arc<Stats>,
}

impl DeadLetter {
    fn new(config: &Config, topic: &str, stats: Arc<Stats>) -> Result<DeadLetter> {
        let producer = client_config(&config.kafka)
            .set("bootstrap.servers", &config.kafka.brokers)
            // The source offset moves past a poison record only once this
            // write is on every in-sync replica.
            .set("acks", "all")
            .set("enable.idempotence", "true")
            // Fail (count, retry) within 30 s rather than librdkafka's 5 min,
            // so a missing topic or broker shows up in the metrics soon.
            .set("message.timeout.ms", "30000")
            .create()
            .map_err(Error::Kafka)?;
        Ok(DeadLetter {
            producer,
            topic: topic.into(),
            source: config.kafka.topic.as_str().into(),
            stats,
        })
    }

    /// Writes until Kafka acknowledges; the caller's drain deadline bounds
    /// it at shutdown (then the offset is not stored: redelivered later).
    async fn write(
        &self,
        why: Poison,
        key: Option<&[u8]>,
        value: &[u8],
        partition: i32,
        offset: i64,
    ) {
        let partition_text = partition.to_string();
        let offset_text = offset.to_string();
        let mut delay = Duration::from_millis(100);
        loop {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "herald-poison-reason",
                    value: Some(why.reason()),
                })
                .insert(Header {
                    key: "herald-source-topic",
                    value: Some(&*self.source),
                })
                .insert(Header {
                    key: "herald-source-partition",
                    value: Some(&partition_text),
                })
                .insert(Header {
                    key: "herald-source-offset",
                    value: Some(&offset_text),
                });
            let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic)
                .payload(value)
                .headers(headers);
            if let Some(key) = key {
                record = record.key(key);
            }
            match self.producer.send(record, Duration::from_secs(10)).await {
                Ok(_) => {
                    self.stats.metrics.dead_lettered();
                    return;
                }
                Err((err, _)) => {
                    self.stats.metrics.dead_letter_failed();
                    warn!(cause = %err, partition, offset, "dead-letter write failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// A librdkafka config with `kafka`'s TLS and SASL settings, for every
/// client job makes.
fn client_config(kafka: &crate::config::KafkaConfig) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (key, value) in kafka.security.client_settings() {
        config.set(key, value);
    }
    config
}

/// Consumes `config.kafka` into `job` until `shutdown`; see [`crate::run`].
/// [`Job::is_ready`] turns true at the first partition assignment.
///
/// # Errors
/// librdkafka refusing the consumer or dead-letter producer configuration,
/// or the subscription.
pub async fn kafka(job: &Job, config: &Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    let kafka = &config.kafka;
    let consumer: StreamConsumer<Context> = client_config(kafka)
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", &kafka.group)
        // Auto-commit only commits what we *stored*, and we store an offset
        // only once every record below it is delivered: at least once.
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        // Commit stored offsets every second (librdkafka: 5 s): a killed job
        // then redelivers about a second of records, not five.
        .set("auto.commit.interval.ms", "1000")
        .set("auto.offset.reset", "earliest")
        .set(
            "session.timeout.ms",
            kafka.session_timeout.as_millis().to_string(),
        )
        // Feeds the committed-offset lag gauge; cheap at this period.
        .set("statistics.interval.ms", "5000")
        .create_with_context(Context {
            job: job.clone(),
            revoked: std::sync::Mutex::default(),
        })
        .map_err(Error::Kafka)?;
    consumer.subscribe(&[&kafka.topic]).map_err(Error::Kafka)?;
    let dead_letter = match &config.dead_letter_topic {
        Some(topic) => Some(DeadLetter::new(config, topic, job.stats.clone())?),
        None => None,
    };
    info!(topic = %kafka.topic, group = %kafka.group, dead_letter = ?config.dead_letter_topic, "consuming");

    let mut tracker = Tracker::default();
    let mut in_flight = FuturesUnordered::new();
    let mut shutdown = pin!(shutdown);
    let metrics = &job.stats.metrics;
    let store = |tracker: &mut Tracker, (partition, offset, outcome): (i32, i64, Outcome)| {
        if outcome == Outcome::Abandoned {
            return;
        }
        if let Some(next) = tracker.complete(partition, offset) {
            let mut tpl = TopicPartitionList::new();
            if tpl
                .add_partition_offset(&kafka.topic, partition, Offset::Offset(next))
                .is_ok()
                && let Err(err) = consumer.store_offsets(&tpl)
            {
                // Typically: the partition was revoked by a rebalance; its
                // new owner starts from the last commit (duplicates, no loss).
                debug!(partition, next, cause = %err, "offset not stored");
            }
        }
    };
    loop {
        metrics.set_in_flight(in_flight.len());
        tokio::select! {
            () = &mut shutdown => break,
            Some(done) = in_flight.next(), if !in_flight.is_empty() => store(&mut tracker, done),
            received = consumer.recv(), if in_flight.len() < config.max_in_flight => match received {
                Ok(record) => {
                    // Revocations happen inside recv(), before the first
                    // record of a new assignment is returned.
                    for partition in consumer.context().take_revoked() {
                        tracker.forget(partition);
                    }
                    let (partition, offset) = (record.partition(), record.offset());
                    let value = record.payload().unwrap_or_default();
                    let delivery = job.submit_bytes(value);
                    // Copied only when a poison record may need them.
                    let original = dead_letter.clone().map(|dl| {
                        (dl, record.key().map(<[u8]>::to_vec), value.to_vec())
                    });
                    tracker.start(partition, offset);
                    in_flight.push(async move {
                        let outcome = delivery.await;
                        if let (Outcome::Skipped(why), Some((dl, key, value))) = (outcome, original) {
                            dl.write(why, key.as_deref(), &value, partition, offset).await;
                        }
                        (partition, offset, outcome)
                    });
                }
                Err(err) => {
                    // A wrong SASL user or password arrives here (the
                    // consumer's queue carries librdkafka's errors): kept
                    // for `/readyz` until partitions are assigned.
                    if err.rdkafka_error_code() == Some(RDKafkaErrorCode::Authentication) {
                        consumer.context().set_auth_failure(Some(err.to_string()));
                    }
                    // librdkafka retries by itself; pause so a dead broker does not spin.
                    warn!(cause = %err, "kafka consumer error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
        }
    }
    info!(
        in_flight = in_flight.len(),
        "stopping; draining in-flight records"
    );
    let drained = tokio::time::timeout(config.drain_timeout, async {
        while let Some(done) = in_flight.next().await {
            store(&mut tracker, done);
        }
    })
    .await;
    if drained.is_err() {
        warn!(
            abandoned = tracker.in_flight(),
            "drain deadline passed; abandoned records will be redelivered"
        );
    }
    job.stop();
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => info!("offsets committed"),
        // "No offset" just means nothing new was stored since the last commit.
        Err(err) => debug!(cause = %err, "final commit"),
    }
    Ok(())
}

/// Delivers from an in-process channel until `shutdown` or the channel closes.
pub async fn channel(
    job: &Job,
    config: &Config,
    mut records: mpsc::Receiver<(String, PushMsg)>,
    shutdown: impl Future<Output = ()>,
) {
    let mut in_flight = FuturesUnordered::new();
    let mut shutdown = pin!(shutdown);
    job.ready.store(true, Ordering::SeqCst);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = in_flight.next(), if !in_flight.is_empty() => {}
            received = records.recv(), if in_flight.len() < config.max_in_flight => match received {
                Some((_key, msg)) => in_flight.push(job.submit(msg)),
                None => break,
            },
        }
    }
    let _ = tokio::time::timeout(config.drain_timeout, async {
        while in_flight.next().await.is_some() {}
    })
    .await;
}
