//! S5's floors, measured in the same run: Kafka's own produce→consume
//! latency (what the single-key figure is compared with) and the echo
//! round trip's CPU on the servers' core (the least a push can cost).

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;

use super::{Error, PARTITIONS, ROUND_TRIPS_PER_PUSH, Result, WAIT};
use crate::load::{Clock, new_histogram};
use crate::proc;
use crate::report::Percentiles;

/// Logic's default `--kafka-message-timeout-ms`, used by the floor producer.
const MESSAGE_TIMEOUT_MS: u64 = 5_000;

/// Bytes per echo message (one small frame).
const ECHO_BYTES: usize = 32;

/// Echo round trips at `rate`/s for `duration` against `herald bench
/// floor-echo` pinned to `core` (where the servers ran): the echo process's
/// CPU per round trip, and that times [`ROUND_TRIPS_PER_PUSH`], the least a
/// single-key push can cost the three servers at this rate on this machine.
/// The sender is a plain thread with its own absolute schedule: one 32-byte
/// message, then its echo, then sleep to the next slot.
pub(super) async fn round_trip_floor(
    binary: &Path,
    core: Option<usize>,
    rate: f64,
    duration: Duration,
) -> Result<serde_json::Value> {
    use std::io::{Read, Write};
    let floor = crate::floor::FloorProc::start_echo(binary, core)?;
    let (addr, pid) = (floor.addr(), floor.pid());
    let io = |step: &'static str| move |source| crate::floor::Error::Io { step, source };
    let count = (rate * duration.as_secs_f64()).round().max(1.0) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate.max(1e-3));
    let cpu_now = move || {
        proc::precise_cpu_seconds(pid)
            .ok_or_else(|| Error::Process("cannot read the echo process's CPU clock".to_owned()))
    };
    let run = tokio::task::spawn_blocking(move || -> Result<(f64, f64, Duration)> {
        let mut sock = std::net::TcpStream::connect(addr).map_err(io("connect"))?;
        sock.set_nodelay(true).map_err(io("nodelay"))?;
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(io("read timeout"))?;
        let mut buf = [0u8; ECHO_BYTES];
        // One round trip first, so the accept and connection set-up are
        // not in the figure.
        sock.write_all(&buf).map_err(io("write"))?;
        sock.read_exact(&mut buf).map_err(io("read"))?;
        let before = cpu_now()?;
        let start = Instant::now();
        for i in 1..=count {
            if let Some(wait) = (start + interval * i as u32).checked_duration_since(Instant::now())
            {
                std::thread::sleep(wait);
            }
            sock.write_all(&buf).map_err(io("write"))?;
            sock.read_exact(&mut buf).map_err(io("read"))?;
        }
        Ok((before, cpu_now()?, start.elapsed()))
    });
    let (before, after, wall) = run
        .await
        .map_err(|e| Error::Process(format!("round-trip floor sender: {e}")))??;
    drop(floor);
    let cpu_s = after - before;
    let per_trip = cpu_s * 1e6 / count as f64;
    eprintln!(
        "  round-trip floor {rate}/s: {per_trip:.1} µs CPU per round trip, × {ROUND_TRIPS_PER_PUSH} = {:.0} µs per push",
        per_trip * ROUND_TRIPS_PER_PUSH
    );
    Ok(json!({
        "rate": rate,
        "round_trips": count,
        "cpu_s": cpu_s,
        "wall_s": wall.as_secs_f64(),
        "cpu_us_per_round_trip": per_trip,
        "round_trips_per_push": ROUND_TRIPS_PER_PUSH,
        "cpu_us_per_push": per_trip * ROUND_TRIPS_PER_PUSH,
    }))
}

/// Kafka alone at `rate` messages/s for `duration`: an idempotent `acks=all`
/// producer with logic's settings and a consumer with job's defaults, each
/// message timed from its scheduled send to its consumption.
pub(super) async fn kafka_floor(
    brokers: &str,
    topic: &str,
    group: &str,
    clock: Clock,
    rate: f64,
    duration: Duration,
) -> Result<serde_json::Value> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", MESSAGE_TIMEOUT_MS.to_string())
        .set("linger.ms", "0")
        .create()
        .map_err(|e| Error::Kafka(format!("floor producer: {e}")))?;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| Error::Kafka(format!("floor consumer: {e}")))?;
    // Assigned, not subscribed: no group rebalance to wait for.
    let mut partitions = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        partitions
            .add_partition_offset(topic, p, Offset::Beginning)
            .map_err(|e| Error::Kafka(format!("floor partitions: {e}")))?;
    }
    consumer
        .assign(&partitions)
        .map_err(|e| Error::Kafka(format!("floor assign: {e}")))?;
    // One message through first: connections and the producer id are set up
    // before the measured schedule starts.
    let warm = clock.ns().to_be_bytes();
    producer
        .send(
            FutureRecord::to(topic).key("warm").payload(&warm[..]),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| Error::Kafka(format!("floor warm-up produce: {e}")))?;
    tokio::time::timeout(WAIT, consumer.recv())
        .await
        .map_err(|_| Error::Kafka("floor warm-up message never consumed".to_owned()))?
        .map_err(|e| Error::Kafka(format!("floor consume: {e}")))?;

    let latency = Rc::new(RefCell::new(new_histogram()));
    let consumed = Rc::new(RefCell::new(0u64));
    // A second at the rate before the measured schedule, not recorded: the
    // producer's and broker's steady state, not their first batches.
    let warm = rate.round().max(1.0) as u64;
    let measured = (rate * duration.as_secs_f64()).round().max(1.0) as u64;
    let total = warm + measured;
    let interval = Duration::from_secs_f64(1.0 / rate.max(1e-9));
    let start = Instant::now() + Duration::from_millis(5);
    let measured_from = clock.at(start + interval.mul_f64(warm as f64));
    let reader = {
        let latency = latency.clone();
        let consumed = consumed.clone();
        async move {
            while *consumed.borrow() < measured {
                let Ok(message) = consumer.recv().await else {
                    continue;
                };
                let now = clock.ns();
                if let Some(sent) = message
                    .payload()
                    .and_then(|p| p.get(..8))
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                {
                    let sent = u64::from_be_bytes(sent);
                    if sent >= measured_from {
                        latency
                            .borrow_mut()
                            .saturating_record(now.saturating_sub(sent).max(1));
                        *consumed.borrow_mut() += 1;
                    }
                }
            }
        }
    };
    let reader = tokio::task::spawn_local(reader);
    let producer = Rc::new(producer);
    let errors = Rc::new(RefCell::new(0u64));
    // Produce → acknowledgement: what logic waits for before it answers.
    let acked = Rc::new(RefCell::new(new_histogram()));
    let mut sends = Vec::with_capacity(total as usize);
    for i in 0..total {
        let scheduled = start + interval.mul_f64(i as f64);
        if scheduled > Instant::now() {
            tokio::time::sleep_until(scheduled.into()).await;
        }
        let payload = clock.at(scheduled).to_be_bytes();
        let producer = producer.clone();
        let errors = errors.clone();
        let acked = acked.clone();
        let topic = topic.to_owned();
        sends.push(tokio::task::spawn_local(async move {
            let key = format!("k{}", i % 1000);
            let record = FutureRecord::to(&topic).key(&key).payload(&payload[..]);
            if producer.send(record, Duration::from_secs(5)).await.is_err() {
                *errors.borrow_mut() += 1;
            } else if i >= warm {
                let ns = u64::try_from(scheduled.elapsed().as_nanos()).unwrap_or(u64::MAX);
                acked.borrow_mut().saturating_record(ns.max(1));
            }
        }));
    }
    for send in sends {
        let _ = send.await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), reader).await;
    let consumed = *consumed.borrow();
    let errors = *errors.borrow();
    let p = Percentiles::of(&latency.borrow());
    eprintln!(
        "  kafka floor at {rate}/s: consumed {consumed}/{measured}, p50 {:.0} µs, p99 {:.0} µs",
        p.p50_us, p.p99_us
    );
    Ok(json!({
        "rate": rate,
        "warm_up_records": warm,
        "scheduled": measured,
        "produce_errors": errors,
        "consumed": consumed,
        "latency": p,
        "ack_latency": Percentiles::of(&acked.borrow()),
    }))
}
