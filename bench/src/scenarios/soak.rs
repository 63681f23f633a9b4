//! The soak: a long run of mixed load, reported window by window, to show
//! what no short step can: memory or descriptors that creep, latency that
//! degrades, and messages that go missing once in a while.
//!
//! With `--redis` and `--kafka` (or the test bed's variables) it runs the
//! full path, real `herald logic`, `job` and `comet` processes as S5 starts
//! them, pushes POSTed to logic's HTTP API; without them, comet alone
//! against the stub logic, pushes sent to its gRPC API. Either way the load
//! is the same and runs in every window:
//!
//! - idle clients (`--clients`, 2,000 by default) in a room nobody pushes
//!   to, heartbeating every 30 s, for the whole run;
//! - [`ROOMS`] rooms of [`MEMBERS`] clients (one in five a latency probe),
//!   each pushed [`ROOM_RATE`] times a second by its own serial injector;
//! - [`KEY_CLIENTS`] probe clients whose keys get [`KEY_RATE`] single-key
//!   pushes a second in all, overlapping freely;
//! - connects and disconnects: every [`CHURN_EVERY`] a batch of
//!   [`CHURN_BATCH`] fresh clients authenticates and the batch before it
//!   closes;
//! - slow readers: a room of [`SLOW_ROOM_MEMBERS`] clients that read gets
//!   [`SLOW_RATE`] pushes a second of [`SLOW_BODY`] bytes, and at the start
//!   of each window [`SLOW_READERS`] more clients join it and never read.
//!   Comet runs with a small queue and send buffer (as S7's does), so it
//!   closes them as `slow_consumer` within seconds.
//!
//! Each window injects for its length, then waits until every push it
//! accepted is delivered (or nothing arrives for a while), so its
//! delivered/expected is exact; it then reads each server's RSS, open
//! descriptors and CPU, the probes' latency and comet's `disconnects`
//! counters by reason. Every message owed and not delivered is listed with
//! its reason: a slow reader closed as `slow_consumer` is explained,
//! anything else (a shortfall at a reading client, a push refused, a client
//! closed for another reason, a churn connect that failed) is not, and any
//! unexplained loss fails the run. Drift (last window against the first:
//! RSS, descriptors, p99) is reported against the targets, not enforced.

mod drift;
mod losses;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald_protocol::pb::{BroadcastRoomReq, CometClient, Proto, PushMsgReq};
use herald_runtime::grpc_auth::AuthChannel;
use serde_json::json;

use self::drift::{drift, targets};
use self::losses::{Accounting, Loss, losses};
use super::{Ctx, connect_comet, start_comet};
use crate::inject::{self, Call, LogicHttp, Order, Sender};
use crate::load::{ClientSpec, Clock, Generator, Transport};
use crate::proc::{self, Sample};
use crate::report::{Percentiles, Report, Target};
use crate::s5::cluster::Cluster;
use crate::server::Comet;
use crate::wire::{self, BENCH_OP};
use crate::{Error, Result};

/// Rooms pushed to, each by its own serial injector.
const ROOMS: usize = 4;
/// Clients per room; one in [`PROBE_EVERY`] is a latency probe.
const MEMBERS: usize = 50;
const PROBE_EVERY: usize = 5;
/// Pushes per second per room.
const ROOM_RATE: f64 = 5.0;
/// Clients whose keys get single-key pushes (all probes).
const KEY_CLIENTS: usize = 100;
/// Single-key pushes per second over all of them.
const KEY_RATE: f64 = 100.0;
/// Clients that authenticate (and those before them close) every [`CHURN_EVERY`].
const CHURN_BATCH: usize = 50;
const CHURN_EVERY: Duration = Duration::from_secs(2);
/// Reading members of the slow readers' room.
const SLOW_ROOM_MEMBERS: usize = 20;
/// Clients that join the slow room at each window's start and never read.
const SLOW_READERS: usize = 5;
/// Pushes per second to the slow room, and their body size: enough that a
/// reader that stopped fills comet's queue and socket buffers in seconds.
const SLOW_RATE: f64 = 20.0;
const SLOW_BODY: usize = 1024;
/// The slow readers' receive buffer (the kernel doubles it).
const SLOW_RCVBUF: u32 = 4 * 1024;
/// Comet's per-connection queue and socket send buffer in the soak: small,
/// as in S7, so a slow reader is closed within a window; the reading
/// clients get far less than this between two sweeps.
const QUEUE_BYTES: usize = 32 * 1024;
const SEND_BUFFER_BYTES: usize = 8 * 1024;
/// How long a window waits with no new message before calling delivery done.
const DRAIN_IDLE: Duration = Duration::from_secs(3);
/// How long a window waits for comet to close its slow readers.
const SLOW_CLOSE_WAIT: Duration = Duration::from_secs(10);
/// Handshakes in flight while connecting (logic's `Connect` goes to Redis).
const CONNECT_CONCURRENCY: usize = 256;
/// The unmeasured first window, at most.
const WARM_UP: Duration = Duration::from_secs(10);
/// Comet's close reason for a client that stopped reading.
const SLOW_CONSUMER: &str = "slow_consumer";
/// Comet's close reason for a client that closed its side.
const CLIENT: &str = "client";

/// What the soak pushes through: comet's gRPC API, or logic's HTTP API.
#[derive(Debug, Clone)]
enum Pusher {
    Comet(CometClient<AuthChannel>),
    Logic(LogicHttp),
}

/// One push: to room `live://<room>` or to a key, with its body.
#[derive(Debug)]
enum Push {
    Room { room: String, body: Bytes },
    Key { key: String, body: Bytes },
}

impl Sender for Pusher {
    type Call = Push;

    async fn send(&self, push: Push) -> Result<(), String> {
        match self {
            Pusher::Comet(client) => {
                let proto = |body| Proto {
                    ver: 1,
                    op: BENCH_OP,
                    seq: 0,
                    body,
                };
                let call = match push {
                    Push::Room { room, body } => Call::Room(BroadcastRoomReq {
                        room_id: format!("live://{room}"),
                        proto: Some(proto(body)),
                    }),
                    Push::Key { key, body } => Call::Push(PushMsgReq {
                        keys: vec![key],
                        proto: Some(proto(body)),
                        proto_op: BENCH_OP,
                    }),
                };
                client.send(call).await
            }
            Pusher::Logic(http) => {
                let call = match push {
                    Push::Room { room, body } => crate::s5::room_post(&room, body),
                    Push::Key { key, body } => crate::s5::key_post(&key, body),
                };
                http.send(call).await
            }
        }
    }
}

/// The servers under load: comet alone, or logic, job and comet.
#[derive(Debug)]
enum Servers {
    Comet(Comet),
    Full(Box<Cluster>),
}

impl Servers {
    fn comet(&self) -> &Comet {
        match self {
            Servers::Comet(comet) => comet,
            Servers::Full(cluster) => &cluster.comet,
        }
    }

    /// Each server's name and pid.
    fn processes(&self) -> Vec<(&'static str, u32)> {
        match self {
            Servers::Comet(comet) => vec![("comet", comet.pid)],
            Servers::Full(cluster) => {
                let [logic, job, comet] = cluster.pids();
                vec![("comet", comet), ("logic", logic), ("job", job)]
            }
        }
    }
}

/// Comet's `herald_comet_disconnects_total`, summed over transports, by reason.
async fn disconnects(admin: &LogicHttp) -> BTreeMap<String, u64> {
    let mut by_reason = BTreeMap::new();
    let Ok((200, text)) = admin.get("/metrics").await else {
        return by_reason;
    };
    for line in text.lines() {
        let Some(labels) = line.strip_prefix("herald_comet_disconnects_total{") else {
            continue;
        };
        let reason = labels
            .split_once("reason=\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(reason, _)| reason.to_owned());
        let value = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let (Some(reason), Some(value)) = (reason, value) {
            *by_reason.entry(reason).or_default() += value as u64;
        }
    }
    by_reason
}

/// `later - earlier` per reason, leaving out reasons that did not move.
fn delta(earlier: &BTreeMap<String, u64>, later: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    later
        .iter()
        .map(|(reason, n)| {
            let before = earlier.get(reason).copied().unwrap_or(0);
            (reason.clone(), n.saturating_sub(before))
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// One message body: send time and sequence number, padded to `len`.
fn body(seq: i32, sched_ns: u64, len: usize) -> Bytes {
    let mut body = wire::message_body(seq, sched_ns);
    body.resize(len.max(wire::BODY_LEN), 0);
    Bytes::from(body)
}

/// Connections that churn: the batch opened last is held until the next one
/// has authenticated.
#[derive(Debug, Default, serde::Serialize)]
struct Churn {
    batches: u64,
    connected: u64,
    failed: u64,
    first_error: Option<String>,
}

/// Everything a window needs that stays put across windows.
struct Soak<'a> {
    servers: &'a Servers,
    pusher: Pusher,
    admin: LogicHttp,
    clock: Clock,
    sweep: Duration,
    /// The next unused mid: every client of the run has its own key.
    next_mid: Cell<u64>,
    /// Reading members per room, and of the slow room.
    members: Vec<u64>,
    slow_members: u64,
    keys: Vec<String>,
    /// Sequence numbers handed out so far, per room and per key.
    room_seq: Vec<i32>,
    slow_seq: i32,
    key_seq: Vec<i32>,
    started: Instant,
}

/// A client spec for the soak: body sequence numbers (pushes through logic
/// carry header seq 0).
fn spec(mid: u64, room: &str, probe: bool) -> ClientSpec {
    ClientSpec {
        mid,
        room: room.to_owned(),
        transport: Transport::Tcp,
        auth: true,
        probe,
        rcvbuf: None,
        body_seq: true,
    }
}

fn room_name(r: usize) -> String {
    format!("soak-{r}")
}

const SLOW_ROOM: &str = "soak-slow";

impl Soak<'_> {
    fn mids(&self, n: usize) -> std::ops::Range<u64> {
        let first = self.next_mid.get();
        self.next_mid.set(first + n as u64);
        first..first + n as u64
    }

    /// Opens `n` fresh clients of `room` in `generator`.
    async fn open(
        &self,
        generator: &mut Generator,
        n: usize,
        room: &str,
        probe_every: usize,
        rcvbuf: Option<u32>,
    ) -> crate::load::ConnectStats {
        let specs = self
            .mids(n)
            .enumerate()
            .map(|(i, mid)| ClientSpec {
                rcvbuf,
                ..spec(mid, room, i % probe_every == probe_every - 1)
            })
            .collect();
        generator
            .connect(self.servers.comet().tcp, specs, CONNECT_CONCURRENCY)
            .await
    }

    /// Opens and closes batches of clients until `end`.
    async fn churn(&self, end: Instant) -> Churn {
        let mut churn = Churn::default();
        let mut held: Option<Generator> = None;
        while Instant::now() < end {
            let mut batch = Generator::new(self.clock, self.sweep);
            let stats = self
                .open(
                    &mut batch,
                    CHURN_BATCH,
                    "live://soak-churn",
                    usize::MAX,
                    None,
                )
                .await;
            churn.batches += 1;
            churn.connected += stats.connected as u64;
            churn.failed += stats.failed as u64;
            if churn.first_error.is_none() {
                churn.first_error = batch.first_error().map(str::to_owned);
            }
            if let Some(mut old) = held.replace(batch) {
                old.close_all().await;
            }
            let next = Instant::now() + CHURN_EVERY;
            tokio::time::sleep_until(next.min(end).into()).await;
        }
        if let Some(mut old) = held {
            old.close_all().await;
        }
        churn
    }

    /// One window: `duration` of load, then delivery, then the readings.
    async fn window(
        &mut self,
        generator: &Generator,
        index: usize,
        duration: Duration,
    ) -> (serde_json::Value, Vec<Loss>) {
        let before = generator.totals();
        let _ = generator.take_latency();
        let processes = self.servers.processes();
        let cpu0: Vec<Sample> = processes.iter().map(|(_, p)| Sample::take(*p)).collect();
        let closes0 = disconnects(&self.admin).await;
        // The slow readers join first, so every push of the window is owed
        // to them; their generator is never swept, so they never read.
        let mut slow = Generator::new(self.clock, self.sweep);
        let slow_connect = self
            .open(
                &mut slow,
                SLOW_READERS,
                &format!("live://{SLOW_ROOM}"),
                usize::MAX,
                Some(SLOW_RCVBUF),
            )
            .await;
        let readers = slow_connect.connected as u64;
        let end = Instant::now() + duration;
        let (clock, pusher) = (self.clock, &self.pusher);
        let interval = Duration::from_secs_f64(1.0 / ROOM_RATE);
        let rooms = self.room_seq.iter().enumerate().map(move |(r, &base)| {
            let name = room_name(r);
            let phase = interval.mul_f64(r as f64 / ROOMS as f64);
            async move {
                inject::run_phased(
                    pusher,
                    clock,
                    ROOM_RATE,
                    duration,
                    Order::Serial,
                    phase,
                    |i, sched| Push::Room {
                        room: name.clone(),
                        body: body(base + 1 + i as i32, sched, wire::BODY_LEN),
                    },
                )
                .await
            }
        });
        let slow_base = self.slow_seq;
        let slow_room = inject::run(
            pusher,
            clock,
            SLOW_RATE,
            duration,
            Order::Serial,
            |i, sched| Push::Room {
                room: SLOW_ROOM.to_owned(),
                body: body(slow_base + 1 + i as i32, sched, SLOW_BODY),
            },
        );
        // Out of `self` while the window runs: the churn borrows `self` too.
        let mut key_seq = std::mem::take(&mut self.key_seq);
        let keys = &self.keys;
        let key_pushes = inject::run(
            pusher,
            clock,
            KEY_RATE,
            duration,
            Order::Concurrent,
            |i, sched| {
                let k = i as usize % keys.len().max(1);
                key_seq[k] += 1;
                Push::Key {
                    key: keys.get(k).cloned().unwrap_or_default(),
                    body: body(key_seq[k], sched, wire::BODY_LEN),
                }
            },
        );
        let churn = self.churn(end);
        let (rooms, slow_room, key_pushes, churn) = futures::join!(
            futures::future::join_all(rooms),
            slow_room,
            key_pushes,
            churn
        );
        self.key_seq = key_seq;
        for (seq, injected) in self.room_seq.iter_mut().zip(&rooms) {
            *seq += injected.scheduled as i32;
        }
        self.slow_seq += slow_room.scheduled as i32;
        let expected: u64 = rooms
            .iter()
            .zip(&self.members)
            .map(|(inj, m)| inj.ok * m)
            .sum::<u64>()
            + slow_room.ok * self.slow_members
            + key_pushes.ok;
        let (total, _) = generator
            .wait_delivered(before.messages + expected, DRAIN_IDLE)
            .await;
        // Comet closes each slow reader once its queue overflows; wait for
        // that (bounded), then close any it left open.
        let slow_deadline = Instant::now() + SLOW_CLOSE_WAIT;
        let closes = loop {
            let closes = delta(&closes0, &disconnects(&self.admin).await);
            let slow_closed = closes.get(SLOW_CONSUMER).copied().unwrap_or(0);
            if slow_closed >= readers || Instant::now() > slow_deadline {
                break closes;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        slow.close_all().await;
        let after = generator.totals();
        let latency = Percentiles::of(&generator.take_latency());
        let delivered = total - before.messages;
        let readings: Vec<serde_json::Value> = processes
            .iter()
            .zip(&cpu0)
            .map(|((name, pid), cpu0)| {
                json!({
                    "name": name,
                    "rss_bytes": proc::rss(*pid).ok(),
                    "fds": proc::open_fds(*pid),
                    "cpu": cpu0.since(&Sample::take(*pid)),
                })
            })
            .collect();
        let losses = losses(&Accounting {
            window: index,
            expected,
            delivered,
            active_closed: after.active_closed - before.active_closed,
            gaps: after.active_lost - before.active_lost,
            injected: [&rooms[..], &[slow_room.clone(), key_pushes.clone()][..]].concat(),
            readers,
            slow_failed: slow_connect.failed as u64,
            slow_pushes: slow_room.ok,
            closes: &closes,
            churn: &churn,
        });
        let unexplained: u64 = losses
            .iter()
            .filter(|l| !l.explained)
            .map(|l| l.count)
            .sum();
        let label = if index == 0 {
            "warm-up".to_owned()
        } else {
            format!("window {index}")
        };
        eprintln!(
            "  {label} (+{:.0} s): delivered {delivered}/{expected}, p50 {:.1} ms, p99 {:.1} ms, {}, churn {}/{}, slow readers closed {}/{readers}, unexplained {unexplained}",
            self.started.elapsed().as_secs_f64(),
            latency.p50_us / 1e3,
            latency.p99_us / 1e3,
            readings
                .iter()
                .map(|r| format!(
                    "{} {:.1} MiB {} fds",
                    r["name"].as_str().unwrap_or("?"),
                    r["rss_bytes"].as_f64().unwrap_or(f64::NAN) / 1048576.0,
                    r["fds"]
                ))
                .collect::<Vec<_>>()
                .join(", "),
            churn.connected,
            churn.connected + churn.failed,
            closes.get(SLOW_CONSUMER).copied().unwrap_or(0),
        );
        let record = json!({
            "window": index,
            "warm_up": index == 0,
            "end_s": self.started.elapsed().as_secs_f64(),
            "seconds": duration.as_secs_f64(),
            "expected": expected,
            "delivered": delivered,
            "gaps": after.active_lost - before.active_lost,
            "reordered": after.reordered - before.reordered,
            "latency": latency,
            "pushes": {
                "rooms": &rooms,
                "slow_room": &slow_room,
                "keys": &key_pushes,
            },
            "processes": readings,
            "churn": &churn,
            "slow_readers": {
                "connected": readers,
                "failed": slow_connect.failed,
                "closed_slow_consumer": closes.get(SLOW_CONSUMER).copied().unwrap_or(0),
                "messages_owed": slow_room.ok * readers,
            },
            "disconnects": &closes,
            "losses": &losses,
            "unexplained": unexplained,
            "loadavg": proc::loadavg(),
        });
        (record, losses)
    }
}

pub(super) async fn soak(ctx: &mut Ctx) -> Result<()> {
    let plan = ctx.plan.soak.clone();
    let comet_flags = vec![
        "--queue-bytes".to_owned(),
        QUEUE_BYTES.to_string(),
        "--send-buffer-bytes".to_owned(),
        SEND_BUFFER_BYTES.to_string(),
    ];
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let run_id = format!("{}-{stamp}", std::process::id());
    let topic = format!("herald-bench-soak-{run_id}");
    let (servers, pusher) = match &ctx.services {
        Some(services) => {
            crate::s5::create_topics(&services.kafka, &[&topic]).await?;
            let started = Cluster::start(
                &ctx.binary,
                ctx.server_core,
                services,
                &topic,
                &run_id,
                &ctx.out,
                &ctx.grpc.flags,
                &comet_flags,
            )
            .await;
            let cluster = match started {
                Ok(cluster) => cluster,
                Err(err) => {
                    crate::s5::delete_topics(&services.kafka, &[&topic]).await;
                    return Err(err.into());
                }
            };
            let pusher = Pusher::Logic(cluster.http.clone());
            (Servers::Full(Box::new(cluster)), pusher)
        }
        None => {
            let comet = start_comet(ctx, &comet_flags)?;
            let client = connect_comet(ctx, &comet).await?;
            (Servers::Comet(comet), Pusher::Comet(client))
        }
    };
    let result = run(ctx, &plan, &servers, pusher).await;
    drop(servers);
    if let Some(services) = &ctx.services {
        crate::s5::delete_topics(&services.kafka, &[&topic]).await;
    }
    let (record, targets) = result?;
    ctx.report.targets.extend(targets);
    ctx.report.scenarios.insert("soak".to_owned(), record);
    Ok(())
}

async fn run(
    ctx: &Ctx,
    plan: &super::plan::SoakPlan,
    servers: &Servers,
    pusher: Pusher,
) -> Result<(serde_json::Value, Vec<Target>)> {
    let full = matches!(servers, Servers::Full(_));
    let mut generator = Generator::new(ctx.clock, ctx.sweep);
    // Mids unique to this process, so two runs sharing a Redis never route
    // each other's keys (S5 uses the range below).
    let first_mid = 2_000_000_000_000 + u64::from(std::process::id() % 100_000) * 10_000_000;
    let mut soak = Soak {
        servers,
        pusher,
        admin: LogicHttp::new(servers.comet().http),
        clock: ctx.clock,
        sweep: ctx.sweep,
        next_mid: Cell::new(first_mid),
        members: Vec::new(),
        slow_members: 0,
        keys: Vec::new(),
        room_seq: vec![0; ROOMS],
        slow_seq: 0,
        key_seq: vec![0; KEY_CLIENTS],
        started: Instant::now(),
    };
    let mut connect = Vec::new();
    let idle = soak
        .open(
            &mut generator,
            plan.idle,
            "live://soak-idle",
            usize::MAX,
            None,
        )
        .await;
    connect.push(json!({ "clients": "idle", "connect": idle }));
    for r in 0..ROOMS {
        let stats = soak
            .open(
                &mut generator,
                MEMBERS,
                &format!("live://{}", room_name(r)),
                PROBE_EVERY,
                None,
            )
            .await;
        soak.members.push(stats.connected as u64);
        connect.push(json!({ "clients": room_name(r), "connect": stats }));
    }
    let slow_room = soak
        .open(
            &mut generator,
            SLOW_ROOM_MEMBERS,
            &format!("live://{SLOW_ROOM}"),
            PROBE_EVERY,
            None,
        )
        .await;
    soak.slow_members = slow_room.connected as u64;
    connect.push(json!({ "clients": SLOW_ROOM, "connect": slow_room }));
    let key_first = soak.next_mid.get();
    let keys = soak
        .open(&mut generator, KEY_CLIENTS, "live://soak-keys", 1, None)
        .await;
    connect.push(json!({ "clients": "keys", "connect": keys }));
    soak.keys = (key_first..key_first + KEY_CLIENTS as u64)
        .map(wire::key)
        .collect();
    let failed: usize = [&idle, &slow_room, &keys]
        .iter()
        .map(|c| c.failed)
        .sum::<usize>()
        + ROOMS * MEMBERS
        - soak.members.iter().sum::<u64>() as usize;
    if failed > 0 {
        return Err(Error::Soak(format!(
            "{failed} of the soak's clients could not connect: {}",
            generator.first_error().unwrap_or("?")
        )));
    }
    generator.start_sweeping();
    if full {
        // Job learns which rooms comet holds by polling it (1 s).
        tokio::time::sleep(Duration::from_millis(2_500)).await;
    }
    soak.started = Instant::now();
    let (warm_up, mut losses) = soak.window(&generator, 0, plan.window.min(WARM_UP)).await;
    // Windows of one length (the nearest whole number of them), so the last
    // compares with the first and none is too short to close a slow reader.
    let count = (plan.duration.as_secs_f64() / plan.window.as_secs_f64())
        .round()
        .max(1.0) as u32;
    let length = plan.duration / count;
    let mut windows = Vec::new();
    for index in 1..=count as usize {
        let (record, lost) = soak.window(&generator, index, length).await;
        windows.push(record);
        losses.extend(lost);
    }
    generator.close_all().await;
    let drift = drift(&windows);
    let unexplained: u64 = losses
        .iter()
        .filter(|l| !l.explained)
        .map(|l| l.count)
        .sum();
    let explained: u64 = losses.iter().filter(|l| l.explained).map(|l| l.count).sum();
    let targets = targets(&drift, unexplained, explained);
    for target in &targets {
        eprintln!("  {}", target.verdict());
    }
    let record = json!({
        "path": if full { "full" } else { "comet" },
        "minutes": plan.duration.as_secs_f64() / 60.0,
        "window_seconds": length.as_secs_f64(),
        "load": {
            "idle_clients": plan.idle,
            "rooms": ROOMS,
            "members_per_room": MEMBERS,
            "room_pushes_per_sec": ROOM_RATE,
            "key_clients": KEY_CLIENTS,
            "key_pushes_per_sec": KEY_RATE,
            "churn_batch": CHURN_BATCH,
            "churn_every_s": CHURN_EVERY.as_secs_f64(),
            "slow_room_members": SLOW_ROOM_MEMBERS,
            "slow_readers_per_window": SLOW_READERS,
            "slow_room_pushes_per_sec": SLOW_RATE,
            "slow_room_body_bytes": SLOW_BODY,
            "comet_queue_bytes": QUEUE_BYTES,
            "comet_send_buffer_bytes": SEND_BUFFER_BYTES,
        },
        "connect": connect,
        "warm_up": warm_up,
        "windows": windows,
        "drift": drift,
        "losses": &losses,
        "unexplained": unexplained,
        "explained": explained,
        "first_error": generator.first_error(),
    });
    Ok((record, targets))
}

/// The soak passes only with no unexplained loss; drift is reported, not
/// enforced (a short run on a shared machine is too noisy for it).
pub(super) fn soak_check(report: &Report) -> Result<()> {
    let Some(soak) = report.scenarios.get("soak") else {
        return Err(Error::Soak("no soak record".to_owned()));
    };
    if soak["unexplained"].as_u64() == Some(0) {
        return Ok(());
    }
    let lines: Vec<String> = soak["losses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["explained"] == false)
        .map(|l| {
            format!(
                "window {}: {} {} to {}: {}",
                l["window"],
                l["count"],
                l["unit"].as_str().unwrap_or(""),
                l["to"].as_str().unwrap_or(""),
                l["reason"].as_str().unwrap_or("")
            )
        })
        .collect();
    Err(Error::Soak(format!(
        "unexplained losses: {}",
        lines.join("; ")
    )))
}
