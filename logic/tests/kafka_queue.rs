//! Logic's Kafka queue against the test bed's broker: a lone record goes out
//! through the producer that sends at once, a burst past the busy threshold
//! goes through the lingering one, and every record either way is
//! acknowledged once and lands in the topic once, in order for a caller that
//! waits for each answer.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use herald_logic::queue::Upstream;
use herald_logic::queue::kafka::{KafkaConfig, KafkaQueue};

fn queue(topic: &str) -> KafkaQueue {
    KafkaQueue::new(KafkaConfig {
        brokers: kafka_brokers(),
        topic: topic.to_owned(),
        message_timeout: Duration::from_secs(10),
        linger: Duration::ZERO,
        busy_linger: Duration::from_millis(5),
        busy_in_flight: 4,
        security: Default::default(),
    })
    .expect("producer config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_records_take_the_lingering_producer_and_all_land_once() {
    let topic = unique("logic-kafka-queue");
    create_topic(&topic).await;
    let queue = queue(&topic);
    let consumer = consumer(&topic);

    // One caller, one record at a time: never busy, so all go at once,
    // and they land in the order they were sent.
    for i in 0..20 {
        let value = format!("serial-{i:03}");
        queue
            .send("k", value.as_bytes())
            .await
            .unwrap_or_else(|err| panic!("record {i}: {err}"));
    }
    assert_eq!(queue.sent(), (20, 0), "a lone record never lingers");
    let serial = consume(&consumer, 20).await;
    let values: Vec<String> = serial
        .iter()
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .collect();
    let expected: Vec<String> = (0..20).map(|i| format!("serial-{i:03}")).collect();
    assert_eq!(values, expected);

    // 200 at once: past the first four, the rest find four or more in
    // flight and linger. Every one is acknowledged at its own offset.
    let burst: Vec<String> = (0..200).map(|i| format!("burst-{i:03}")).collect();
    let results =
        futures::future::join_all(burst.iter().map(|value| queue.send("k", value.as_bytes())))
            .await;
    let mut offsets = BTreeSet::new();
    for (value, result) in burst.iter().zip(results) {
        let id = result.unwrap_or_else(|err| panic!("{value}: {err}"));
        assert!(offsets.insert(id), "{value}: offset {id} given twice");
    }
    let (at_once, lingered) = queue.sent();
    assert_eq!(at_once + lingered, 220);
    assert!(lingered > 0, "a burst of 200 went out at once: {at_once}");
    let got: BTreeSet<String> = consume(&consumer, 200)
        .await
        .into_iter()
        .map(|(_, v)| String::from_utf8_lossy(&v).into_owned())
        .collect();
    assert_eq!(got, burst.iter().cloned().collect::<BTreeSet<_>>());
    assert_no_more(&consumer, Duration::from_secs(2)).await;
}
