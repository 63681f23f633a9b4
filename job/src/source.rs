//! Where records come from: a Kafka consumer group, or an in-process channel.
//!
//! Both submit records in arrival order (so per-partition, per-room order
//! reaches each comet worker unchanged) and keep at most `max_in_flight`
//! records being delivered.

use std::future::Future;
use std::pin::pin;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use herald_protocol::pb::PushMsg;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::offsets::Tracker;
use crate::{Config, Error, Job, Outcome, Result};

/// Consumes `config.kafka` into `job` until `shutdown`; see [`crate::run`].
///
/// # Errors
/// librdkafka refusing the consumer configuration or subscription.
pub async fn kafka(job: &Job, config: &Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    let kafka = &config.kafka;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", &kafka.group)
        // Auto-commit only commits what we *stored*, and we store an offset
        // only once every record below it is delivered: at least once.
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(Error::Kafka)?;
    consumer.subscribe(&[&kafka.topic]).map_err(Error::Kafka)?;
    info!(topic = %kafka.topic, group = %kafka.group, "consuming");

    let mut tracker = Tracker::default();
    let mut in_flight = FuturesUnordered::new();
    let mut shutdown = pin!(shutdown);
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
        tokio::select! {
            () = &mut shutdown => break,
            Some(done) = in_flight.next(), if !in_flight.is_empty() => store(&mut tracker, done),
            received = consumer.recv(), if in_flight.len() < config.max_in_flight => match received {
                Ok(record) => {
                    let (partition, offset) = (record.partition(), record.offset());
                    let delivery = job.submit_bytes(record.payload().unwrap_or_default());
                    tracker.start(partition, offset);
                    in_flight.push(async move { (partition, offset, delivery.await) });
                }
                Err(err) => {
                    // librdkafka retries by itself; pause so a dead broker does not spin.
                    warn!(cause = %err, "kafka consumer error");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
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
