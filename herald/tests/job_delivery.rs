//! Job delivering to comets: a record of each kind reaches TCP clients with
//! goim's exact bytes, room pushes keep their order (and are batched), skip
//! comets without members, and go to a Herald comet's `PushMsgs` batches,
//! one `PushMsg` each to a goim comet. Job consumes the test bed's real
//! Kafka (or logic's in-memory queue); comets are `herald_comet::run` on
//! 127.0.0.1:0 with a stub logic, or gRPC stubs.
//!
//! Needs `HERALD_KAFKA_BROKERS` (source `target/testbed/env` after
//! `e2e/services/up.sh kafka`); panics without it rather than skipping.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use herald_job::{Config, StaticComet, StatsSnapshot};
use herald_logic::queue::PushQueue;
use herald_logic::queue::memory::MemoryQueue;
use herald_protocol::pb::PushMsg;
use herald_testkit::expect_silence;
use rdkafka::Offset;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

mod common;

use common::job::{
    NodeListFile, Producer, RunningJob, T5, T7, WAIT, broadcast, committed, fresh_topic, hex,
    job_config, push, room,
};
use common::{LocalComet as Comet, Stoppable};

type Result<T = (), E = anyhow::Error> = std::result::Result<T, E>;

#[tokio::test]
async fn push_room_and_broadcast_reach_clients_with_exact_bytes() -> Result {
    let (topic, group) = fresh_topic("job-basic", 2).await?;
    let comet = Comet::start("comet-a").await?;
    // The comet comes from a node list file (draining still gets pushes).
    let list = NodeListFile::new()?;
    list.write(
        &serde_json::json!({"generation": 1, "updated": "2026-11-27T10:00:00Z",
        "nodes": [{"name": "comet-a", "grpc": comet.grpc.to_string(), "draining": true}]}),
    )?;
    let mut config = job_config(&topic, &group, &[]);
    config.node_list = Some(list.source(Duration::from_secs(2)));
    let job = RunningJob::start(config)?;
    let mut client = comet.client("ka", "live://1000").await?;
    let producer = Producer::new(&topic)?;

    producer.push("comet-a", "ka", b"hello").await?;
    assert_eq!(
        client.next_message().await?.to_bytes().to_vec(),
        hex(T5),
        "T5 on TCP"
    );

    producer.room("live://1000", br#"{"test":1}"#).await?;
    producer.room("live://1000", br#"{"test":2}"#).await?;
    let mut t7 = client.next_message().await?.to_bytes().to_vec();
    t7.extend_from_slice(&client.next_message().await?.to_bytes());
    assert_eq!(t7, hex(T7), "T7 on TCP");

    producer.send("1000", &broadcast(b"all", 100)).await?;
    let frame = client.next_frame().await?;
    assert_eq!((frame.op, &frame.body[..]), (1000, &b"all"[..]));

    // A PUSH for a comet nobody lists is dropped and counted; later ones flow.
    producer.push("ghost", "kx", b"lost").await?;
    producer.push("comet-a", "ka", b"after").await?;
    let frame = client.next_frame().await?;
    assert_eq!(&frame.body[..], b"after");
    job.wait_stats("one unknown comet", |s| s.unknown_comet == 1)
        .await?;
    let stats = job.stats();
    assert_eq!((stats.records, stats.poison), (6, 0), "{stats:?}");
    job.stop().await?;
    Ok(())
}

#[tokio::test]
async fn broadcast_with_zero_comets_does_nothing_and_commits() -> Result {
    let (topic, group) = fresh_topic("job-empty", 1).await?;
    let job = RunningJob::start(job_config(&topic, &group, &[]))?;
    let producer = Producer::new(&topic)?;
    producer.send("1000", &broadcast(b"nobody", 1000)).await?;
    producer.room("live://1", b"nobody").await?;
    job.wait_stats("2 records", |s| s.records == 2).await?;
    assert_eq!(job.stats().calls, 0);
    job.stop().await?;
    assert_eq!(committed(&topic, &group)?, Offset::Offset(2));
    Ok(())
}

#[tokio::test]
async fn room_pushes_arrive_in_order_in_batches() -> Result {
    const N: usize = 300;
    let (topic, group) = fresh_topic("job-order", 1).await?;
    let comet = Comet::start("comet-o").await?;
    let mut member = comet.client("ko", "live://order").await?;
    let producer = Producer::new(&topic)?;
    let records: Vec<(String, PushMsg)> = (0..N)
        .map(|i| {
            (
                "live://order".to_owned(),
                room("live://order", format!("r{i:04}").as_bytes()),
            )
        })
        .collect();
    // Produced before job starts, so records arrive while calls are in flight.
    producer.send_all(&records).await?;
    let job = RunningJob::start(job_config(&topic, &group, &[&comet]))?;
    for i in 0..N {
        let frame = member.next_frame().await?;
        assert_eq!(frame.op, 1000);
        assert_eq!(
            frame.body,
            Bytes::from(format!("r{i:04}")),
            "frame {i} out of order"
        );
    }
    job.wait_stats("all room frames", |s| s.room_frames == N as u64)
        .await?;
    let stats = job.stats();
    assert!(
        stats.room_batches < N as u64 && stats.room_batches >= (N / 20) as u64,
        "frames were batched (≤ 20 per call): {stats:?}"
    );
    job.stop().await?;
    Ok(())
}

#[tokio::test]
async fn memory_queue_feeds_job_without_kafka() -> Result {
    let comet = Comet::start("comet-m").await?;
    let mut client = comet.client("km", "live://m").await?;
    let (queue, records) = MemoryQueue::new(16);
    // Brokers are never contacted by the channel driver.
    let mut config = Config::new("unused:1", "unused", "unused");
    config.comets = vec![comet.as_static()];
    let mut task = Stoppable::spawn(|stopped| herald_job::run_channel(config, records, stopped));
    queue
        .push("km", &push("comet-m", &["km"], b"hello"))
        .await?;
    assert_eq!(client.next_message().await?.to_bytes().to_vec(), hex(T5));
    queue.push("live://m", &room("live://m", b"room")).await?;
    assert_eq!(&client.next_frame().await?.body[..], b"room");
    task.stop(WAIT).await?;
    Ok(())
}

// ------------------------------------------------------------ comet stub

/// A comet that is only its gRPC services: its `Rooms` always fails (which
/// rooms it holds is unknown), it counts the `BroadcastRoom` calls it gets,
/// records each push's frame with the RPC that carried it and each batch's
/// size, and holds every push call at a gate until the gate is opened (so
/// the records behind the first call queue up in job). It serves
/// `herald.push.v1` only when started with batches (goim's comet does not).
#[derive(Debug, Clone)]
struct StubComet {
    gate: Arc<watch::Sender<bool>>,
    seen: Arc<Mutex<Vec<(&'static str, Bytes)>>>,
    batch_sizes: Arc<Mutex<Vec<usize>>>,
    room_calls: Arc<AtomicU64>,
}

impl StubComet {
    /// Serves on 127.0.0.1:0, the gate closed when `gated`.
    async fn start(batches: bool, gated: bool) -> Result<(StubComet, SocketAddr)> {
        let stub = StubComet {
            gate: Arc::new(watch::channel(!gated).0),
            seen: Default::default(),
            batch_sizes: Default::default(),
            room_calls: Default::default(),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let push = batches.then(|| {
            herald_protocol::pb::push::comet_push_server::CometPushServer::new(stub.clone())
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(herald_protocol::pb::CometServer::new(stub.clone()))
                .add_optional_service(push)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Ok((stub, addr))
    }

    async fn pass(&self) {
        let _ = self.gate.subscribe().wait_for(|open| *open).await;
    }

    fn record(&self, rpc: &'static str, req: herald_protocol::pb::PushMsgReq) {
        let frame = req.proto.map(|p| p.body).unwrap_or_default();
        self.seen.lock().expect("seen lock").push((rpc, frame));
    }

    fn seen(&self) -> Vec<(&'static str, Bytes)> {
        self.seen.lock().expect("seen lock").clone()
    }
}

#[tonic::async_trait]
impl herald_protocol::pb::Comet for StubComet {
    async fn push_msg(
        &self,
        req: Request<herald_protocol::pb::PushMsgReq>,
    ) -> Result<Response<herald_protocol::pb::goim::comet::PushMsgReply>, Status> {
        self.pass().await;
        self.record("PushMsg", req.into_inner());
        Ok(Response::new(Default::default()))
    }

    async fn broadcast(
        &self,
        _req: Request<herald_protocol::pb::BroadcastReq>,
    ) -> Result<Response<herald_protocol::pb::goim::comet::BroadcastReply>, Status> {
        Ok(Response::new(Default::default()))
    }

    async fn broadcast_room(
        &self,
        _req: Request<herald_protocol::pb::BroadcastRoomReq>,
    ) -> Result<Response<herald_protocol::pb::goim::comet::BroadcastRoomReply>, Status> {
        self.room_calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(Default::default()))
    }

    async fn rooms(
        &self,
        _req: Request<herald_protocol::pb::goim::comet::RoomsReq>,
    ) -> Result<Response<herald_protocol::pb::goim::comet::RoomsReply>, Status> {
        Err(Status::unavailable("rooms unknown"))
    }
}

#[tonic::async_trait]
impl herald_protocol::pb::push::comet_push_server::CometPush for StubComet {
    async fn push_msgs(
        &self,
        req: Request<herald_protocol::pb::push::PushMsgsReq>,
    ) -> Result<Response<herald_protocol::pb::push::PushMsgsReply>, Status> {
        self.pass().await;
        let pushes = req.into_inner().pushes;
        self.batch_sizes
            .lock()
            .expect("sizes lock")
            .push(pushes.len());
        for push in pushes {
            self.record("PushMsgs", push);
        }
        Ok(Response::new(Default::default()))
    }
}

// ------------------------------------------------------- rooms filtering

#[tokio::test]
async fn room_pushes_skip_comets_without_members_but_not_unknown_ones() -> Result {
    const POLL: Duration = Duration::from_millis(100);
    let (topic, group) = fresh_topic("job-rooms", 1).await?;
    let with = Comet::start("comet-with").await?;
    let without = Comet::start("comet-without").await?;
    let mut member = with.client("k1", "live://r").await?;
    let mut other = without.client("k2", "live://other").await?;
    // A goim comet (no batches) whose Rooms fails.
    let (stub, stub_addr) = StubComet::start(false, false).await?;
    let mut config = job_config(&topic, &group, &[&with, &without]);
    config.comets.push(StaticComet {
        name: "comet-unknown".to_owned(),
        grpc: stub_addr.to_string(),
    });
    config.rooms_poll = Some(POLL);
    let job = RunningJob::start(config)?;
    // A few polls: every comet answered (or failed) at least once.
    tokio::time::sleep(POLL * 5).await;
    let producer = Producer::new(&topic)?;
    producer.room("live://r", b"one").await?;
    assert_eq!(&member.next_frame().await?.body[..], b"one");
    job.wait_stats("one skipped send", |s| s.room_skipped == 1)
        .await?;
    // The comet whose Rooms fails got the push anyway.
    job.wait_stats("2 room calls", |s| s.room_batches == 2)
        .await?;
    assert_eq!(stub.room_calls.load(Ordering::SeqCst), 1);
    expect_silence(&mut other, Duration::from_millis(200)).await?;

    // A member joins on the empty comet; once a poll has seen it, it gets
    // room pushes too (its rooms just changed: sent to regardless).
    let mut joined = without.client("k3", "live://r").await?;
    tokio::time::sleep(POLL * 3).await;
    producer.room("live://r", b"two").await?;
    assert_eq!(&member.next_frame().await?.body[..], b"two");
    assert_eq!(&joined.next_frame().await?.body[..], b"two");
    job.wait_stats("3 more room calls", |s| s.room_batches == 5)
        .await?;
    assert_eq!(job.stats().room_skipped, 1);
    job.stop().await?;
    Ok(())
}

// ------------------------------------------------------- push batching

/// Sends `n` pushes for the gated comet while its first `PushMsg` is held,
/// opens the gate once job has taken every record, and returns what the
/// comet saw and job's counts.
async fn gated_run(
    batches: bool,
    n: usize,
    done: impl Fn(&StatsSnapshot) -> bool,
) -> Result<(StubComet, StatsSnapshot)> {
    let (topic, group) = fresh_topic("job-batch", 1).await?;
    let (stub, addr) = StubComet::start(batches, true).await?;
    let mut config = job_config(&topic, &group, &[]);
    config.comets.push(StaticComet {
        name: "comet-g".to_owned(),
        grpc: addr.to_string(),
    });
    // The held call must not time out and be sent again meanwhile.
    config.calls.timeout = WAIT;
    let job = RunningJob::start(config)?;
    let records: Vec<(String, PushMsg)> = (0..n)
        .map(|i| {
            let key = format!("k{}", i % 3);
            let msg = push("comet-g", &[key.as_str()], format!("p{i:04}").as_bytes());
            ("one-partition".to_owned(), msg)
        })
        .collect();
    Producer::new(&topic)?.send_all(&records).await?;
    job.wait_stats("every record taken", |s| s.records == n as u64)
        .await?;
    // Job took them all while the first call is held: the rest are queued.
    stub.gate.send_replace(true);
    job.wait_stats("every call answered", done)
        .await
        .with_context(|| format!("comet saw {} of {n} pushes", stub.seen().len()))?;
    let stats = job.stats();
    job.stop().await?;
    Ok((stub, stats))
}

/// The frames' bodies in the order the comet saw them.
fn bodies(seen: &[(&'static str, Bytes)]) -> Vec<String> {
    seen.iter()
        .map(|(_, frame)| {
            String::from_utf8_lossy(&frame[frame.len().saturating_sub(5)..]).into_owned()
        })
        .collect()
}

#[tokio::test]
async fn queued_pushes_go_to_a_herald_comet_in_batches_in_order() -> Result {
    const N: usize = 30;
    let every_push = |s: &StatsSnapshot| s.push_batched + s.calls - s.push_batches == N as u64;
    let (stub, stats) = gated_run(true, N, every_push).await?;
    let seen = stub.seen();
    let want: Vec<String> = (0..N).map(|i| format!("p{i:04}")).collect();
    assert_eq!(bodies(&seen), want, "every push once, in order");
    // Whatever the first call carried, at least 10 pushes queued behind it
    // (a batch holds at most 20, the default) and went out batched.
    let sizes = stub.batch_sizes.lock().expect("sizes lock").clone();
    assert!(stats.push_batches >= 1, "{stats:?}");
    assert_eq!(sizes.len() as u64, stats.push_batches);
    assert_eq!(sizes.iter().sum::<usize>() as u64, stats.push_batched);
    assert!(sizes.iter().all(|n| (2..=20).contains(n)), "{sizes:?}");
    let singles = seen.iter().filter(|(rpc, _)| *rpc == "PushMsg").count() as u64;
    assert_eq!(singles, stats.calls - stats.push_batches);
    assert_eq!(
        (stats.rejected, stats.comet_gone, stats.queue_full),
        (0, 0, 0)
    );
    Ok(())
}

#[tokio::test]
async fn a_goim_comet_without_batches_gets_one_push_msg_per_push() -> Result {
    const N: usize = 30;
    let (stub, stats) = gated_run(false, N, |s| s.calls == N as u64).await?;
    let seen = stub.seen();
    let want: Vec<String> = (0..N).map(|i| format!("p{i:04}")).collect();
    assert_eq!(bodies(&seen), want, "every push once, in order");
    assert!(seen.iter().all(|(rpc, _)| *rpc == "PushMsg"));
    // The refused batch is neither a delivery nor a drop.
    assert_eq!((stats.push_batches, stats.push_batched), (0, 0));
    assert_eq!(stats.calls, N as u64);
    assert_eq!(
        (stats.rejected, stats.comet_gone, stats.queue_full),
        (0, 0, 0)
    );
    Ok(())
}
