//! The test bed's Kafka is a real broker: topics are created through the admin
//! API, records are produced with acks=all by an idempotent producer and
//! consumed in a consumer group whose committed offsets survive a new member.

use std::time::Duration;

use futures::StreamExt;
use herald_e2e::{testbed_var, unique_name};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};

const RECORDS: usize = 50;

fn config() -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", testbed_var("HERALD_KAFKA_BROKERS"));
    config
}

fn consumer(group: &str) -> anyhow::Result<StreamConsumer> {
    Ok(config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?)
}

#[tokio::test]
async fn produce_acks_all_and_consume_in_a_group() -> anyhow::Result<()> {
    let topic = unique_name("smoke");
    let group = unique_name("smoke-group");

    let admin: AdminClient<DefaultClientContext> = config().create()?;
    let results = admin
        .create_topics(
            &[NewTopic::new(&topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    for result in results {
        result.map_err(|(name, code)| anyhow::anyhow!("create topic {name}: {code}"))?;
    }

    let producer: FutureProducer = config()
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "10000")
        .create()?;
    for i in 0..RECORDS {
        let key = format!("room-{}", i % 5);
        let value = format!("push-{i}");
        producer
            .send(
                FutureRecord::to(&topic).key(&key).payload(&value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(err, _)| anyhow::anyhow!("produce {i}: {err}"))?;
    }

    let first = consumer(&group)?;
    first.subscribe(&[&topic])?;
    let mut seen = Vec::new();
    let mut stream = first.stream();
    while seen.len() < RECORDS {
        let message = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .map_err(|_| anyhow::anyhow!("only {} of {RECORDS} records arrived", seen.len()))?
            .ok_or_else(|| anyhow::anyhow!("consumer stream ended"))??;
        let key = String::from_utf8(message.key().unwrap_or_default().to_vec())?;
        let value = String::from_utf8(message.payload().unwrap_or_default().to_vec())?;
        // Same key → same partition, so per-key order holds.
        seen.push((key, value, message.partition()));
    }
    drop(stream);
    first.commit_consumer_state(CommitMode::Sync)?;
    drop(first);

    let mut values: Vec<usize> = seen
        .iter()
        .map(|(_, value, _)| value["push-".len()..].parse())
        .collect::<Result<_, _>>()?;
    values.sort_unstable();
    assert_eq!(values, (0..RECORDS).collect::<Vec<_>>());
    for room in 0..5 {
        let key = format!("room-{room}");
        let of_key: Vec<&(String, String, i32)> =
            seen.iter().filter(|(k, _, _)| *k == key).collect();
        assert!(
            of_key.windows(2).all(|w| w[0].2 == w[1].2),
            "{key} spread over partitions"
        );
        let order: Vec<usize> = of_key
            .iter()
            .map(|(_, value, _)| value["push-".len()..].parse().unwrap_or(usize::MAX))
            .collect();
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "{key} out of order: {order:?}"
        );
    }

    // A new member of the same group starts from the committed offsets: it
    // sees the one record produced after the commit, and nothing before it.
    producer
        .send(
            FutureRecord::to(&topic)
                .key("room-0")
                .payload("after-commit"),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(err, _)| anyhow::anyhow!("produce: {err}"))?;
    let second = consumer(&group)?;
    second.subscribe(&[&topic])?;
    let message = tokio::time::timeout(Duration::from_secs(30), second.recv()).await??;
    assert_eq!(message.payload(), Some(&b"after-commit"[..]));

    admin.delete_topics(&[&topic], &AdminOptions::new()).await?;
    Ok(())
}
