//! `herald comet` running out of file descriptors: the real binary, started
//! under `ulimit -n 64` against a stub logic in this process, is flooded with
//! connections past its descriptor limit. It must stay up, keep serving the
//! sessions it holds, and accept and authenticate again once descriptors are
//! free — with every failed accept counted in `accept_errors_total`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bytes::{Bytes, BytesMut};
use herald_protocol::pb::{CometClient, PushMsgReq};
use herald_protocol::ws::raw_proto;
use herald_protocol::{Frame, Limits, op};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    child: Child,
    stderr: PathBuf,
    tcp: SocketAddr,
    grpc: SocketAddr,
    http: SocketAddr,
}

impl Drop for Comet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Comet {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn alive(&mut self) -> Result {
        if let Some(status) = self.child.try_wait()? {
            bail!("comet exited ({status}); its log:\n{}", self.log());
        }
        Ok(())
    }

    /// `GET path` on the admin listener: the whole answer.
    async fn http_get(&self, path: &str) -> Result<String> {
        let mut stream = TcpStream::connect(self.http).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await?;
        let mut resp = Vec::new();
        timeout(WAIT, stream.read_to_end(&mut resp)).await??;
        Ok(String::from_utf8(resp)?)
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
    let stderr = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("comet-fd-limit-{}.err", std::process::id()));
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!("ulimit -n {NOFILE} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_herald"))
        .arg("comet")
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
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr)?);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("HERALD_") {
            command.env_remove(key);
        }
    }
    let mut comet = Comet {
        child: command.spawn().context("spawn herald comet")?,
        stderr,
        tcp,
        grpc,
        http,
    };
    timeout(WAIT, async {
        loop {
            comet.alive()?;
            if let Ok(resp) = comet.http_get("/readyz").await
                && resp.starts_with("HTTP/1.1 200")
            {
                return anyhow::Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .context("comet never became ready")??;
    Ok(comet)
}

struct Client {
    stream: TcpStream,
    buf: BytesMut,
}

impl Client {
    async fn connect(addr: SocketAddr, key: &str) -> Result<Client> {
        let mut client = Client {
            stream: TcpStream::connect(addr).await?,
            buf: BytesMut::new(),
        };
        let token = serde_json::json!({ "key": key, "accepts": [1000] }).to_string();
        let auth = Frame {
            ver: 1,
            op: op::AUTH,
            seq: 1,
            body: Bytes::from(token),
        };
        client.stream.write_all(&auth.to_bytes()).await?;
        Ok(client)
    }

    async fn recv(&mut self, wait: Duration) -> Result<Frame> {
        timeout(wait, async {
            loop {
                if let Some(frame) = Frame::decode(&mut self.buf, Limits::OUTBOUND)? {
                    return Ok(frame);
                }
                if self.stream.read_buf(&mut self.buf).await? == 0 {
                    bail!("connection closed");
                }
            }
        })
        .await
        .context("timed out waiting for a frame")?
    }

    async fn heartbeat(&mut self) -> Result {
        let frame = Frame {
            ver: 1,
            op: op::HEARTBEAT,
            seq: 2,
            body: Bytes::new(),
        };
        self.stream.write_all(&frame.to_bytes()).await?;
        let reply = self.recv(WAIT).await?;
        ensure!(reply.op == op::HEARTBEAT_REPLY, "got {reply:?}");
        Ok(())
    }
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
    let (logic, _) = herald_bench::stub::start().await?;
    let mut comet = start(logic).await?;

    // A session and a gRPC connection opened before the flood.
    let mut held = Client::connect(comet.tcp, "held").await?;
    ensure!(held.recv(WAIT).await?.op == op::AUTH_REPLY);
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
    let mut waiting = Client::connect(comet.tcp, "waiting").await?;
    ensure!(
        waiting.recv(Duration::from_millis(300)).await.is_err(),
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
    let push = held.recv(WAIT).await?;
    ensure!(push.op == 1000 && push.body == b"during"[..], "{push:?}");

    // Descriptors free up: the waiting client is accepted and authenticated,
    // and so is a new one.
    drop(flood);
    ensure!(waiting.recv(WAIT).await?.op == op::AUTH_REPLY);
    let mut late = Client::connect(comet.tcp, "late").await?;
    ensure!(late.recv(WAIT).await?.op == op::AUTH_REPLY);
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
