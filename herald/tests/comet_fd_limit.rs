//! `herald comet` running out of file descriptors: the real binary, started
//! under `ulimit -n 64` against a stub logic in this process, is flooded with
//! connections past its descriptor limit. It must stay up, keep serving the
//! sessions it holds, and accept and authenticate again once descriptors are
//! free — with every failed accept counted in `accept_errors_total`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, ensure};
use bytes::Bytes;
use herald_client::{Client, Frame, Token, op};
use herald_protocol::pb::{CometClient, PushMsgReq};
use herald_protocol::ws::raw_proto;
use herald_testkit::{Herald, HeraldProcess, http};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

type Result<T = (), E = anyhow::Error> = std::result::Result<T, E>;

const WAIT: Duration = Duration::from_secs(15);
/// The comet's descriptor limit.
const NOFILE: usize = 64;
/// Connections opened at once: well past what the limit leaves for sessions,
/// and what is not accepted fits the listen backlog.
const FLOOD: usize = 2 * NOFILE;

/// The comet child; killed and reaped by its pid when dropped.
struct Comet {
    process: HeraldProcess,
    tcp: SocketAddr,
    grpc: SocketAddr,
    http: SocketAddr,
}

impl Comet {
    fn log(&self) -> String {
        self.process.stderr()
    }

    fn alive(&mut self) -> Result {
        self.process.check_running()
    }

    /// `GET path` on the admin listener: the body.
    async fn http_get(&self, path: &str) -> Result<String> {
        Ok(http::get(self.http, path).await?.body)
    }
}

async fn start(logic: SocketAddr) -> Result<Comet> {
    let mut listeners = Vec::new();
    for _ in 0..5 {
        listeners.push(TcpListener::bind("127.0.0.1:0").await?);
    }
    let addrs = listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<std::io::Result<Vec<_>>>()?;
    drop(listeners);
    let (tcp, ws, grpc, http) = (addrs[0], addrs[1], addrs[2], addrs[3]);
    let process = Herald::new(env!("CARGO_BIN_EXE_herald"), "comet")
        .nofile(NOFILE as u64)
        .args(["--tcp-addr", &tcp.to_string()])
        .args(["--ws-addr", &ws.to_string()])
        .args(["--grpc-addr", &grpc.to_string()])
        .args(["--http-addr", &http.to_string()])
        .args(["--logic-addr", &logic.to_string()])
        .args(["--server-id", "fd-limit"])
        // Flood connections that never authenticate keep their descriptor
        // for the whole test instead of timing out.
        .args(["--handshake-timeout-ms", "120000"])
        .args(["--drain-deadline-ms", "100"])
        .name(format!("comet-fd-limit-{}", std::process::id()))
        .dir(Path::new(env!("CARGO_TARGET_TMPDIR")))
        .start()?;
    let mut comet = Comet {
        process,
        tcp,
        grpc,
        http,
    };
    comet
        .process
        .wait_until(WAIT, "a ready comet", || async {
            let ready = http::get(http, "/readyz").await;
            Ok(ready.is_ok_and(|r| r.status == 200).then_some(()))
        })
        .await
        .context("comet never became ready")?;
    Ok(comet)
}

/// A TCP client that has sent op 7 with `key` (the reply is not awaited).
async fn connect(addr: SocketAddr, key: &str) -> Result<Client> {
    let mut client = Client::connect_tcp(addr).await?;
    let token = Token::new(0, key).accepts([1000]);
    client
        .send(Frame {
            ver: 1,
            op: op::AUTH,
            seq: 1,
            body: Bytes::from(&token),
        })
        .await?;
    Ok(client)
}

/// The next frame, waiting at most `wait`.
async fn recv(client: &mut Client, wait: Duration) -> Result<Frame> {
    client.set_timeout(Some(wait));
    Ok(client.next_frame().await?)
}

fn metric(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}

#[tokio::test]
async fn comet_keeps_serving_through_descriptor_exhaustion() -> Result {
    let (logic, _) = herald_testkit::stub::start().await?;
    let mut comet = start(logic).await?;

    // A session and a gRPC connection opened before the flood.
    let mut held = connect(comet.tcp, "held").await?;
    ensure!(recv(&mut held, WAIT).await?.op == op::AUTH_REPLY);
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", comet.grpc))?
        .connect()
        .await?;
    let mut grpc = CometClient::new(channel);

    // Flood: the kernel completes every handshake (backlog), the comet
    // accepts until EMFILE.
    let mut flood = Vec::new();
    for i in 0..FLOOD {
        let stream = timeout(WAIT, TcpStream::connect(comet.tcp))
            .await
            .with_context(|| format!("flood connection {i} not completed"))??;
        flood.push(stream);
    }
    timeout(WAIT, async {
        while !comet.log().contains("emfile") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .with_context(|| format!("no EMFILE logged:\n{}", comet.log()))?;

    // A client that arrives now waits in the backlog: not answered yet.
    let mut waiting = connect(comet.tcp, "waiting").await?;
    ensure!(
        recv(&mut waiting, Duration::from_millis(300))
            .await
            .is_err(),
        "a client was authenticated while descriptors were exhausted: no exhaustion"
    );

    // Exhausted, yet alive, and the held session works both ways.
    comet.alive()?;
    held.heartbeat().await?;
    grpc.push_msg(PushMsgReq {
        keys: vec!["held".into()],
        proto_op: 1000,
        proto: Some(raw_proto(Frame::push(1000, &b"during"[..]).to_bytes())),
    })
    .await?;
    let push = recv(&mut held, WAIT).await?;
    ensure!(push.op == 1000 && push.body == b"during"[..], "{push:?}");

    // Descriptors free up: the waiting client is accepted and authenticated,
    // and so is a new one.
    drop(flood);
    ensure!(recv(&mut waiting, WAIT).await?.op == op::AUTH_REPLY);
    let mut late = connect(comet.tcp, "late").await?;
    ensure!(recv(&mut late, WAIT).await?.op == op::AUTH_REPLY);
    late.heartbeat().await?;
    held.heartbeat().await?;
    comet.alive()?;

    let metrics = comet.http_get("/metrics").await?;
    let emfile = metric(
        &metrics,
        r#"herald_comet_accept_errors_total{reason="emfile"}"#,
    );
    ensure!(emfile >= 1.0, "accept errors not counted:\n{metrics}");
    ensure!(
        metric(&metrics, r#"herald_comet_connections{transport="tcp"}"#) == 3.0,
        "held, waiting and late connected:\n{metrics}"
    );
    Ok(())
}
