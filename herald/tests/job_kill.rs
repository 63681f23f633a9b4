//! Fault test: `herald job` is killed with SIGKILL five times while it
//! delivers 100,000 pushes, and restarted each time. Every push Kafka
//! acknowledged must reach its client at least once (job's at-least-once
//! offsets); duplicates are allowed and counted.
//!
//! Separate processes on the test bed's Redis and Kafka: `herald logic`
//! (clients authenticate through it), `herald comet` (holds four TCP
//! clients), and `herald job`, the one that gets killed. Records go straight
//! into the topic with acks=all, each carrying its sequence number as body.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use herald_client::{Client, Token};
use herald_e2e::{testbed_var, unique_name};
use herald_protocol::pb::{PushMsg, push_msg};
use herald_testkit::HeraldProcess;
use prost::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};

mod common;

use common::roles::{self, CometPorts, LogicPorts, loopback as addr};

/// Pushes produced.
const PUSHES: usize = 100_000;
/// SIGKILLs of the job process.
const KILLS: usize = 5;
/// Connected clients; push `seq` goes to client `seq % CLIENTS`.
const CLIENTS: usize = 4;
const PUSH_OP: i32 = 1000;
/// Bound on every single wait (start-up, the pushes between two kills,
/// including a restart's group rejoin). Bounds, not expectations: on an idle
/// 2-core machine the whole test takes about 75 s.
const WAIT: Duration = Duration::from_secs(60);
/// Bound on the whole delivery.
const TOTAL: Duration = Duration::from_secs(240);

/// The `n`th job, logging into `dir`.
fn spawn(dir: &Path, n: usize, args: Vec<String>) -> anyhow::Result<HeraldProcess> {
    roles::herald("job", &format!("job-{n}"), dir)
        .args(args)
        .start()
}

/// A raw TCP client that authenticates with `key` and counts, per sequence
/// number, the pushes it receives.
async fn client(
    port: u16,
    index: usize,
    counts: Arc<Vec<AtomicU8>>,
    received: Arc<AtomicUsize>,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let mut client = Client::connect_tcp(addr(port)).await?.with_timeout(WAIT);
    let token = Token::new(index as i64 + 1, format!("kill-{index}"))
        .platform("web")
        .accepts([PUSH_OP]);
    client.auth(&token).await.context("auth")?;
    // Heartbeats are 60 s apart by default; the test is shorter.
    client.set_timeout(None);
    Ok(tokio::spawn(async move {
        loop {
            let push = client
                .next_push()
                .await
                .with_context(|| format!("client {index}"))?;
            if push.op != PUSH_OP {
                continue;
            }
            let seq: usize = std::str::from_utf8(&push.body)?.parse()?;
            ensure!(
                seq < PUSHES && seq % CLIENTS == index,
                "client {index} got push {seq}"
            );
            if counts[seq].fetch_add(1, Ordering::Relaxed) == 0 {
                received.fetch_add(1, Ordering::Relaxed);
            }
        }
    }))
}

/// Produces every push with acks=all; returns the sequence numbers Kafka
/// acknowledged (only those count).
async fn produce(brokers: String, topic: String, server: String) -> anyhow::Result<Vec<usize>> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?;
    let mut pending = FuturesUnordered::new();
    let mut acked = Vec::with_capacity(PUSHES);
    for seq in 0..PUSHES {
        let key = format!("kill-{}", seq % CLIENTS);
        let value = PushMsg {
            r#type: push_msg::Type::Push as i32,
            operation: PUSH_OP,
            server: server.clone(),
            keys: vec![key.clone()],
            msg: Bytes::from(seq.to_string()),
            ..Default::default()
        }
        .encode_to_vec();
        let ack = loop {
            match producer.send_result(FutureRecord::to(&topic).key(&key).payload(&value)) {
                Ok(ack) => break ack,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // Let acknowledgements drain the local queue.
                    if let Some(done) = pending.next().await {
                        collect(done, &mut acked);
                    }
                }
                Err((err, _)) => bail!("enqueue push {seq}: {err}"),
            }
        };
        pending.push(async move { (seq, ack.await) });
        if pending.len() >= 20_000
            && let Some(done) = pending.next().await
        {
            collect(done, &mut acked);
        }
    }
    while let Some(done) = pending.next().await {
        collect(done, &mut acked);
    }
    Ok(acked)
}

type Ack = Result<
    rdkafka::producer::future_producer::OwnedDeliveryResult,
    futures::channel::oneshot::Canceled,
>;

fn collect((seq, ack): (usize, Ack), acked: &mut Vec<usize>) {
    if let Ok(Ok(_)) = ack {
        acked.push(seq);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_killed_five_times_loses_no_acknowledged_push() -> anyhow::Result<()> {
    let redis = testbed_var("HERALD_REDIS_URL");
    let brokers = testbed_var("HERALD_KAFKA_BROKERS");
    let topic = unique_name("jobkill");
    let group = unique_name("jobkill-job");
    let server = unique_name("comet-jobkill");
    common::create_topic(&brokers, &topic, 4).await?;
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("job_kill")
        .join(&topic);
    std::fs::create_dir_all(&dir)?;
    let s = |v: &str| v.to_owned();

    let logic_ports = LogicPorts::free();
    let mut logic = roles::herald("logic", "logic", &dir)
        .args(logic_ports.args(&redis, &brokers, &topic))
        .start()?;
    logic
        .wait_for_port(addr(logic_ports.grpc).as_str(), WAIT)
        .await?;
    let ports = CometPorts::free();
    let (tcp, grpc) = (ports.tcp, ports.grpc);
    let mut comet = roles::herald("comet", "comet", &dir)
        .args(ports.args(&server, logic_ports.grpc))
        .start()?;
    for port in [tcp, grpc] {
        comet.wait_for_port(addr(port).as_str(), WAIT).await?;
    }

    let counts: Arc<Vec<AtomicU8>> = Arc::new((0..PUSHES).map(|_| AtomicU8::new(0)).collect());
    let received = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for index in 0..CLIENTS {
        readers.push(client(tcp, index, counts.clone(), received.clone()).await?);
    }

    let job_args = |http: u16| {
        let mut args = roles::job_args(&brokers, &topic, &group, http);
        args.extend([
            // The broker's minimum: a killed member's partitions move soonest.
            s("--kafka-session-timeout-ms"),
            s("6000"),
            s("--comet"),
            format!("{server}={}", addr(grpc)),
        ]);
        args
    };
    let started = Instant::now();
    let producer = tokio::spawn(produce(brokers.clone(), topic.clone(), server.clone()));
    let mut job = spawn(&dir, 0, job_args(herald_e2e::free_port()))?;
    let result = async {
        // Kill when a sixth, two sixths, ... of the pushes have arrived.
        for kill in 1..=KILLS {
            let mark = PUSHES * kill / (KILLS + 1);
            let deadline = Instant::now() + WAIT;
            while received.load(Ordering::Relaxed) < mark {
                job.check_running()?;
                ensure!(
                    Instant::now() < deadline,
                    "stalled at {} of {PUSHES} before kill {kill}",
                    received.load(Ordering::Relaxed)
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // SIGKILL to its pid, then reaped.
            job.kill()?;
            eprintln!(
                "kill {kill}: SIGKILL to job pid {} at {:.1} s, {} pushes received",
                job.pid(),
                started.elapsed().as_secs_f64(),
                received.load(Ordering::Relaxed)
            );
            job = spawn(&dir, kill, job_args(herald_e2e::free_port()))?;
        }
        let acked = tokio::time::timeout(TOTAL, producer)
            .await
            .context("producing took too long")???;
        let deadline = started + TOTAL;
        loop {
            let missing = acked
                .iter()
                .filter(|&&seq| counts[seq].load(Ordering::Relaxed) == 0)
                .count();
            if missing == 0 {
                break;
            }
            job.check_running()?;
            for reader in &readers {
                ensure!(!reader.is_finished(), "a client stopped reading");
            }
            if Instant::now() > deadline {
                // Give the report below a chance: count what never came.
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let lost = acked
            .iter()
            .filter(|&&seq| counts[seq].load(Ordering::Relaxed) == 0)
            .count();
        let duplicates: usize = counts
            .iter()
            .map(|c| usize::from(c.load(Ordering::Relaxed)).saturating_sub(1))
            .sum();
        eprintln!(
            "job kill -9 x{KILLS}: produced {PUSHES}, acknowledged {}, lost {lost}, \
             duplicates {duplicates}, took {:.1} s",
            acked.len(),
            started.elapsed().as_secs_f64()
        );
        ensure!(
            acked.len() == PUSHES,
            "Kafka acknowledged only {}",
            acked.len()
        );
        ensure!(lost == 0, "{lost} acknowledged pushes never arrived");
        anyhow::Ok(())
    }
    .await;
    if result.is_err() {
        for proc in [&logic, &comet, &job] {
            proc.print_logs();
        }
    }
    for reader in readers {
        reader.abort();
    }
    drop(job);
    drop(comet);
    drop(logic);
    if let Ok(admin) = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create::<AdminClient<DefaultClientContext>>()
    {
        let _ = admin.delete_topics(&[&topic], &AdminOptions::new()).await;
    }
    result
}
