//! S4's call floor: the `floor-connect` process, which makes unary
//! `Connect` calls to logic with a plain tonic client, and [`CallFloor`],
//! the benchmark's handle on it.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use herald_protocol::pb::LogicClient;
use herald_protocol::pb::goim::logic::ConnectReq;
use tonic::transport::{Channel, Endpoint};

use super::{Error, FloorChild, Result};
use crate::wire;

/// One batch of the call floor's `Connect` calls.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub(crate) struct CallRun {
    pub(crate) calls: u64,
    /// Calls logic answered with a reply (not an error status).
    pub(crate) ok: u64,
    pub(crate) seconds: f64,
}

/// Serves S4's call floor in this process (the `floor-connect` target):
/// for each stdin line `<logic address> <calls> <in flight>`, makes that many
/// unary `goim.logic.Logic/Connect` calls with a plain tonic client (one
/// HTTP/2 connection, no deadline, concurrency limit or task per call), at
/// most `in flight` at once, and answers with one JSON line. Its CPU per call
/// is the least an authenticating server adds per connection by asking
/// logic, as goim's contract has it, on top of the handshake floor. The
/// client, and its connection, stay from one line to the next while the
/// address does.
pub(crate) fn connect() -> Result<()> {
    use std::io::BufRead;
    let io = |step| move |source| Error::Io { step, source };
    // Pinned to one core, this has one worker, like comet's runtime there.
    let runtime = tokio::runtime::Runtime::new().map_err(io("runtime"))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")
        .and_then(|()| out.flush())
        .map_err(io("answer"))?;
    let mut client: Option<(SocketAddr, LogicClient<Channel>)> = None;
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(io("read command"))?;
        let bad = || Error::Command(line.clone());
        let mut words = line.split_whitespace();
        let addr: SocketAddr = words.next().and_then(|w| w.parse().ok()).ok_or_else(bad)?;
        let calls: u64 = words.next().and_then(|w| w.parse().ok()).ok_or_else(bad)?;
        let in_flight: usize = words.next().and_then(|w| w.parse().ok()).ok_or_else(bad)?;
        let logic = match &client {
            Some((at, logic)) if *at == addr => logic.clone(),
            _ => {
                // The channel's worker task starts on this runtime.
                let _entered = runtime.enter();
                let endpoint =
                    Endpoint::from_shared(format!("http://{addr}")).map_err(|_| bad())?;
                let logic = LogicClient::new(endpoint.connect_lazy());
                client = Some((addr, logic.clone()));
                logic
            }
        };
        let run = runtime.block_on(runtime.spawn(connect_calls(logic, calls, in_flight.max(1))));
        let run = run.map_err(|_| Error::Gone)?;
        let json = serde_json::to_string(&run).map_err(|_| bad())?;
        writeln!(out, "{json}")
            .and_then(|()| out.flush())
            .map_err(io("answer"))?;
    }
    Ok(())
}

/// `calls` `Connect` calls through `client`, `in_flight` at a time.
async fn connect_calls(client: LogicClient<Channel>, calls: u64, in_flight: usize) -> CallRun {
    use futures::StreamExt;
    let start = Instant::now();
    let ok = futures::stream::iter(0..calls)
        .map(|i| {
            let mut client = client.clone();
            let req = ConnectReq {
                server: "floor".to_owned(),
                cookie: String::new(),
                token: wire::token(CALL_FLOOR_MID + i, "live://storm").into(),
            };
            async move { client.connect(req).await.is_ok() }
        })
        .buffer_unordered(in_flight)
        .filter(|ok| std::future::ready(*ok))
        .count()
        .await;
    CallRun {
        calls,
        ok: ok as u64,
        seconds: start.elapsed().as_secs_f64(),
    }
}

/// The call floor's clients' first mid: apart from any storm's.
const CALL_FLOOR_MID: u64 = 9_000_000;

/// The call floor process, seen from the benchmark.
#[derive(Debug)]
pub(crate) struct CallFloor(FloorChild);

impl CallFloor {
    /// Starts `binary bench floor-connect`, pinned to `core`.
    pub(crate) fn start(binary: &Path, core: Option<usize>) -> Result<CallFloor> {
        match FloorChild::spawn(binary, "floor-connect", 1, core)? {
            (proc, first) if first == "ready" => Ok(CallFloor(proc)),
            (_, first) => Err(Error::Command(first)),
        }
    }

    /// The floor process's id, for its CPU figures.
    pub(crate) fn pid(&self) -> u32 {
        self.0.pid()
    }

    /// Makes `calls` calls to the logic at `logic`, `in_flight` at a time,
    /// and returns their figures. Waits without blocking the event loop,
    /// which may be serving that logic.
    pub(crate) async fn run(
        &mut self,
        logic: SocketAddr,
        calls: u64,
        in_flight: usize,
    ) -> Result<CallRun> {
        self.0.send(&format!("{logic} {calls} {in_flight}"))?;
        loop {
            if let Some(answer) = self.0.try_answer() {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
