//! Open-loop injectors: calls go out on a fixed schedule whatever the server
//! does, each spawned on its own so a slow reply never delays the next send,
//! and every latency is measured from the *scheduled* send time. A loaded
//! server therefore shows up as latency instead of silently lowering the
//! offered rate (no coordinated omission).
//!
//! The schedule is the same for every target: comet's gRPC API ([`Call`] on a
//! [`CometClient`]) and logic's HTTP push API ([`HttpCall`] on a
//! [`LogicHttp`]), each a [`Sender`].

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use herald_protocol::pb::{BroadcastRoomReq, CometClient, PushMsgReq};
use herald_runtime::grpc_auth::AuthChannel;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::load::{Clock, new_histogram};

/// Something calls are sent to, one call at a time per task.
pub(crate) trait Sender: Clone + 'static {
    /// One call.
    type Call: 'static;
    /// Sends `call`; `Err` carries why it failed, for the record.
    fn send(&self, call: Self::Call) -> impl Future<Output = Result<(), String>>;
}

impl Sender for CometClient<AuthChannel> {
    type Call = Call;

    async fn send(&self, call: Call) -> Result<(), String> {
        let mut client = self.clone();
        let result = match call {
            Call::Room(req) => client.broadcast_room(req).await.map(drop),
            Call::Push(req) => client.push_msg(req).await.map(drop),
        };
        result.map_err(|status| status.to_string())
    }
}

/// One POST to logic's HTTP API.
#[derive(Debug)]
pub(crate) struct HttpCall {
    /// Path and query, e.g. `/goim/push/keys?operation=1000&keys=b1`.
    pub(crate) path_and_query: String,
    pub(crate) body: Bytes,
}

/// A keep-alive HTTP/1.1 client for logic's push API at one address; calls
/// that overlap open more pooled connections.
#[derive(Debug, Clone)]
pub(crate) struct LogicHttp {
    client: Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    /// `Authorization: Bearer <key>` on every call, when logic wants one.
    api_key: Option<Arc<str>>,
}

impl LogicHttp {
    pub(crate) fn new(addr: SocketAddr) -> LogicHttp {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        LogicHttp {
            client: Client::builder(TokioExecutor::new()).build(connector),
            addr,
            api_key: None,
        }
    }

    /// Sends `key` as the bearer key on every call.
    pub(crate) fn with_api_key(mut self, key: Option<String>) -> LogicHttp {
        self.api_key = key.map(Into::into);
        self
    }

    /// POSTs `body` to `path_and_query`. A push counts as done when logic
    /// answered 200 with goim's `"code":0` (the record is in Kafka); anything
    /// else is an error with its status and body.
    pub(crate) async fn post(&self, path_and_query: &str, body: Bytes) -> Result<(), String> {
        let uri = format!("http://{}{path_and_query}", self.addr);
        let mut req = http::Request::post(uri);
        if let Some(key) = &self.api_key {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
        let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let text = String::from_utf8_lossy(&body);
        if status.is_success() && text.contains("\"code\":0") {
            Ok(())
        } else {
            Err(format!("{status}: {text}"))
        }
    }

    /// GETs `path`; returns the status code (readiness probes).
    pub(crate) async fn get_status(&self, path: &str) -> Result<u16, String> {
        self.get(path).await.map(|(status, _)| status)
    }

    /// GETs `path`; returns the status code and the body as text (a
    /// server's `/metrics`, say).
    pub(crate) async fn get(&self, path: &str) -> Result<(u16, String), String> {
        let uri = format!("http://{}{path}", self.addr);
        let req = http::Request::get(uri)
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

impl Sender for LogicHttp {
    type Call = HttpCall;

    async fn send(&self, call: HttpCall) -> Result<(), String> {
        self.post(&call.path_and_query, call.body).await
    }
}

/// One push for S3's floor relay: the relay writes `frame` to its
/// `index`-th client.
#[derive(Debug)]
pub(crate) struct RelayCall {
    pub(crate) index: u32,
    pub(crate) frame: Vec<u8>,
}

/// The injector's connection to the floor relay (`herald bench
/// floor-relay`). Calls are framed as `index: u32, length: u32, frame` and
/// written by one task that takes everything queued in one write, as an
/// HTTP/2 connection task does for gRPC calls; a call is done once queued
/// (the relay does not answer).
#[derive(Debug, Clone)]
pub(crate) struct FloorRelay {
    queue: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
}

impl FloorRelay {
    /// Connects to the relay at `addr`; must run inside a `LocalSet`.
    pub(crate) async fn connect(addr: SocketAddr) -> std::io::Result<FloorRelay> {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (queue, mut calls) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        tokio::task::spawn_local(async move {
            let mut batch = Vec::new();
            while let Some(first) = calls.recv().await {
                batch.clear();
                batch.extend_from_slice(&first);
                while let Ok(more) = calls.try_recv() {
                    batch.extend_from_slice(&more);
                }
                if stream.write_all(&batch).await.is_err() {
                    break;
                }
            }
        });
        Ok(FloorRelay { queue })
    }
}

impl Sender for FloorRelay {
    type Call = RelayCall;

    async fn send(&self, call: RelayCall) -> Result<(), String> {
        let len = u32::try_from(call.frame.len()).map_err(|e| e.to_string())?;
        let mut record = Vec::with_capacity(8 + call.frame.len());
        record.extend_from_slice(&call.index.to_be_bytes());
        record.extend_from_slice(&len.to_be_bytes());
        record.extend_from_slice(&call.frame);
        self.queue
            .send(record)
            .map_err(|_| "floor relay connection closed".to_owned())
    }
}

/// Most calls in flight before new ones are counted as not sent: bounds the
/// generator's memory when the server stops answering.
const MAX_IN_FLIGHT: usize = 20_000;

/// One call to make.
#[derive(Debug)]
pub(crate) enum Call {
    Room(BroadcastRoomReq),
    Push(PushMsgReq),
}

/// What an injection run did.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Injected {
    /// Calls per second the schedule asked for ([`run_closed`]: the rate
    /// its callers achieved).
    pub(crate) offered_rate: f64,
    pub(crate) scheduled: u64,
    pub(crate) ok: u64,
    pub(crate) errors: u64,
    /// Calls not sent because too many were in flight.
    pub(crate) skipped: u64,
    pub(crate) first_error: Option<String>,
    /// Wall time from the first scheduled send to the last reply.
    pub(crate) seconds: f64,
    /// When the first call was scheduled.
    #[serde(skip)]
    pub(crate) started: Option<Instant>,
    /// RPC latency (scheduled send → reply), nanoseconds.
    #[serde(skip)]
    pub(crate) rpc_latency: Option<Histogram<u64>>,
}

#[derive(Debug)]
struct Shared {
    ok: u64,
    errors: u64,
    in_flight: usize,
    first_error: Option<String>,
    latency: Histogram<u64>,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            ok: 0,
            errors: 0,
            in_flight: 0,
            first_error: None,
            latency: new_histogram(),
        }
    }

    /// What a run that started at `start` did, counted here.
    fn injected(
        &self,
        offered_rate: f64,
        scheduled: u64,
        skipped: u64,
        start: Instant,
    ) -> Injected {
        Injected {
            offered_rate,
            scheduled,
            ok: self.ok,
            errors: self.errors,
            skipped,
            first_error: self.first_error.clone(),
            seconds: start.elapsed().as_secs_f64(),
            started: Some(start),
            rpc_latency: Some(self.latency.clone()),
        }
    }
}

/// How calls may overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    /// Every call on its own task: calls overlap and the server may apply
    /// them in any order (keys pushed by many job workers).
    Concurrent,
    /// One call at a time, in schedule order, later ones queued (what job
    /// does for one room, minus its batching): comet only promises order
    /// between calls that do not overlap.
    Serial,
}

/// Sends `make(i, scheduled_ns)` at `rate` calls per second for `duration`,
/// then waits (at most 30 s) for the replies.
pub(crate) async fn run<S: Sender>(
    client: &S,
    clock: Clock,
    rate: f64,
    duration: Duration,
    order: Order,
    make: impl FnMut(u64, u64) -> S::Call,
) -> Injected {
    run_phased(client, clock, rate, duration, order, Duration::ZERO, make).await
}

/// [`run`] with its schedule shifted by `phase`: injectors running side by
/// side (one per room) spread their calls instead of all firing at once.
pub(crate) async fn run_phased<S: Sender>(
    client: &S,
    clock: Clock,
    rate: f64,
    duration: Duration,
    order: Order,
    phase: Duration,
    mut make: impl FnMut(u64, u64) -> S::Call,
) -> Injected {
    let total = (rate * duration.as_secs_f64()).round().max(1.0) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate.max(1e-9));
    let shared = Rc::new(RefCell::new(Shared::new()));
    let serial = (order == Order::Serial).then(|| {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(S::Call, Instant)>();
        let client = client.clone();
        let shared = shared.clone();
        tokio::task::spawn_local(async move {
            while let Some((call, scheduled)) = rx.recv().await {
                send(client.clone(), call, scheduled, &shared).await;
            }
        });
        tx
    });
    let timer = crate::timer::Timer::new();
    let start = Instant::now() + Duration::from_millis(5) + phase;
    let mut skipped = 0;
    for i in 0..total {
        let scheduled = start + interval.mul_f64(i as f64);
        if scheduled > Instant::now() {
            let precise = match &timer {
                Ok(timer) => timer.until(scheduled).await.is_ok(),
                Err(_) => false,
            };
            if !precise {
                // Millisecond ticks: still on schedule, only coarser.
                tokio::time::sleep_until(scheduled.into()).await;
            }
        }
        if shared.borrow().in_flight >= MAX_IN_FLIGHT {
            skipped += 1;
            continue;
        }
        let sched_ns = clock.at(scheduled);
        let call = make(i, sched_ns);
        shared.borrow_mut().in_flight += 1;
        match &serial {
            Some(queue) => {
                if queue.send((call, scheduled)).is_err() {
                    let mut s = shared.borrow_mut();
                    s.in_flight -= 1;
                    s.errors += 1;
                }
            }
            None => {
                let client = client.clone();
                let shared = shared.clone();
                tokio::task::spawn_local(async move {
                    send(client, call, scheduled, &shared).await;
                });
            }
        }
    }
    drop(serial);
    let deadline = Instant::now() + Duration::from_secs(30);
    while shared.borrow().in_flight > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    shared.borrow().injected(rate, total, skipped, start)
}

/// Closed loop: `callers` callers, caller `c` sending its `j`-th call
/// `make(c, j, now_ns)` as soon as its previous one is answered, for
/// `duration`. Where [`run`]
/// holds the offered rate and shows a slow server as latency, this holds the
/// concurrency and shows what the server sustains: its capacity, and the
/// cost of a call at it, without the pile of open connections an open-loop
/// schedule above capacity builds up. Latency counts from each call's send.
pub(crate) async fn run_closed<S: Sender>(
    client: &S,
    clock: Clock,
    callers: usize,
    duration: Duration,
    make: impl FnMut(usize, u64, u64) -> S::Call,
) -> Injected {
    let shared = &RefCell::new(Shared::new());
    let make = &RefCell::new(make);
    let start = Instant::now();
    let end = start + duration;
    let caller = |c| async move {
        let mut j = 0;
        while Instant::now() < end {
            let sent = Instant::now();
            let call = make.borrow_mut()(c, j, clock.at(sent));
            j += 1;
            shared.borrow_mut().in_flight += 1;
            send(client.clone(), call, sent, shared).await;
        }
    };
    futures::future::join_all((0..callers.max(1)).map(caller)).await;
    let s = shared.borrow();
    // Every call made was answered or failed before its caller went on.
    let made = s.ok + s.errors;
    let rate = made as f64 / start.elapsed().as_secs_f64().max(1e-9);
    s.injected(rate, made, 0, start)
}

async fn send<S: Sender>(client: S, call: S::Call, scheduled: Instant, shared: &RefCell<Shared>) {
    let result = client.send(call).await;
    let done = Instant::now();
    let mut s = shared.borrow_mut();
    s.in_flight -= 1;
    match result {
        Ok(()) => {
            s.ok += 1;
            let ns = u64::try_from(done.saturating_duration_since(scheduled).as_nanos())
                .unwrap_or(u64::MAX);
            s.latency.saturating_record(ns.max(1));
        }
        Err(err) => {
            s.errors += 1;
            s.first_error.get_or_insert(err);
        }
    }
}
