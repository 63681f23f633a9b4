//! Job's admin HTTP (`herald_job::run` with its listener on 127.0.0.1:0):
//! `/readyz` waits for the Kafka assignment, `/metrics` counts records,
//! deliveries, poison and comet failures. Against the test bed's real Kafka
//! and `herald_comet::run` on 127.0.0.1:0 with a stub logic.
//!
//! Needs `HERALD_KAFKA_BROKERS` (source `target/testbed/env` after
//! `e2e/services/up.sh kafka`); panics without it rather than skipping.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use herald_e2e::unique_name;
use herald_job::{Config, StaticComet};
use herald_testkit::http;
use tokio::net::TcpListener;
use tokio::time::timeout;

mod common;

use common::job::{Producer, WAIT, fresh_topic, job_config};
use common::{LocalComet as Comet, Stoppable};

type Result<T = (), E = anyhow::Error> = std::result::Result<T, E>;

/// `GET path` on a plain HTTP/1.1 server: (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let response = http::get(addr, path).await?;
    Ok((response.status, response.body))
}

/// `herald_job::run` with its admin listener on 127.0.0.1:0.
struct Served {
    http: SocketAddr,
    task: Stoppable<herald_job::Error>,
}

impl Served {
    async fn start(config: Config) -> Result<Served> {
        let listeners = herald_job::Listeners::bind("127.0.0.1:0".parse()?).await?;
        let http = listeners
            .http
            .as_ref()
            .context("bound listener")?
            .local_addr()?;
        let task = Stoppable::spawn(|stopped| herald_job::run(config, listeners, stopped));
        Ok(Served { http, task })
    }

    async fn wait_metric(&self, series: &str, pred: impl Fn(f64) -> bool) -> Result<String> {
        let mut last = String::new();
        let waited = timeout(WAIT, async {
            loop {
                let (status, text) = http_get(self.http, "/metrics").await?;
                anyhow::ensure!(status == 200, "/metrics answered {status}");
                if common::metric_sample(&text, series).is_some_and(&pred) {
                    return anyhow::Ok(text);
                }
                last = text;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        match waited {
            Ok(text) => text,
            Err(_) => bail!("{series} never matched; last /metrics:\n{last}"),
        }
    }

    async fn stop(mut self) -> Result {
        self.task.stop(WAIT).await.context("job")
    }
}

#[tokio::test]
async fn readyz_waits_for_the_kafka_assignment() -> Result {
    // Nothing listens on the brokers' address: never assigned, never ready.
    let dead = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let mut config = Config::new(&dead.to_string(), "t", &unique_name("job-unready"));
    config.drain_timeout = Duration::from_millis(100);
    let job = Served::start(config).await?;
    assert_eq!(http_get(job.http, "/healthz").await?.0, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, body) = http_get(job.http, "/readyz").await?;
    assert_eq!(
        (status, body.as_str()),
        (503, "KafkaNotAssigned: kafka consumer not assigned yet")
    );
    job.stop().await?;

    // The real broker: ready once the group assigned the partition.
    let (topic, group) = fresh_topic("job-ready", 1).await?;
    let job = Served::start(job_config(&topic, &group, &[])).await?;
    timeout(WAIT, async {
        while http_get(job.http, "/readyz").await?.0 != 200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::Ok(())
    })
    .await
    .context("/readyz never said 200")??;
    job.stop().await?;
    Ok(())
}

#[tokio::test]
async fn metrics_count_records_deliveries_poison_and_comet_failures() -> Result {
    let (topic, group) = fresh_topic("job-metrics", 1).await?;
    let comet = Comet::start("comet-x").await?;
    let mut client = comet.client("kx", "live://x").await?;
    // A comet whose port refuses connections: every call fails and retries.
    let refused = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let mut config = job_config(&topic, &group, &[&comet]);
    config.comets.push(StaticComet {
        name: "comet-refused".to_owned(),
        grpc: refused.to_string(),
    });
    config.calls.backoff = Duration::from_millis(10);
    config.calls.backoff_max = Duration::from_millis(10);
    config.drain_timeout = Duration::from_millis(200);
    let job = Served::start(config).await?;
    let producer = Producer::new(&topic)?;
    producer.push("comet-x", "kx", b"p1").await?;
    producer.push("comet-x", "kx", b"p2").await?;
    producer.push("comet-x", "kx", b"p3").await?;
    producer.send_raw("x", b"\xff\xff\xff").await?;
    producer.push("comet-refused", "kr", b"never").await?;
    for want in [&b"p1"[..], b"p2", b"p3"] {
        assert_eq!(&client.next_frame().await?.body[..], want);
    }
    job.wait_metric("herald_job_pushes_delivered_total{type=\"push\"}", |v| {
        v == 3.0
    })
    .await?;
    job.wait_metric(
        "herald_job_comet_call_retries_total{comet=\"comet-refused\"}",
        |v| v >= 2.0,
    )
    .await?;
    let text = job
        .wait_metric("herald_job_records_consumed_total", |v| v == 5.0)
        .await?;
    let get = |series: &str| common::metric_sample(&text, series);
    assert_eq!(
        get("herald_job_pushes_delivered_total{type=\"push\"}"),
        Some(3.0)
    );
    assert_eq!(
        get("herald_job_poison_records_total{reason=\"undecodable\"}"),
        Some(1.0)
    );
    assert!(
        get("herald_job_comet_call_failures_total{comet=\"comet-refused\"}")
            .is_some_and(|v| v >= 2.0),
        "{text}"
    );
    assert_eq!(
        get("herald_job_comet_call_failures_total{comet=\"comet-x\"}"),
        None,
        "the healthy comet never failed"
    );
    // Three successful calls to comet-x, plus failed attempts to the other.
    assert!(
        get("herald_job_comet_call_seconds_count{rpc=\"PushMsg\"}").is_some_and(|v| v >= 3.0),
        "{text}"
    );
    // Only the record for the refused comet is still being delivered.
    job.wait_metric("herald_job_records_in_flight", |v| v == 1.0)
        .await?;
    // It pins its partition: the group's commit stays one record behind
    // the end (seen through librdkafka statistics, every 5 s).
    job.wait_metric("herald_job_committed_offset_lag", |v| v == 1.0)
        .await?;
    job.stop().await?;
    Ok(())
}
