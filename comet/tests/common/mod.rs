//! The harness shared by comet's black-box tests: a comet started with
//! `run` on 127.0.0.1:0, herald-testkit's recording stub logic, real TCP and
//! WebSocket clients, and a tonic client for the comet's gRPC services. Byte
//! vectors are spec §14's.

// Each test binary uses its own part of the harness.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use herald_comet::{Config, Listeners};
use herald_protocol::pb::admin::comet_admin_client::CometAdminClient;
use herald_protocol::pb::{CometClient, Proto};
use herald_protocol::{Frame, Limits, op, ws};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tonic::transport::Channel;

pub(crate) type Result<T = (), E = anyhow::Error> = std::result::Result<T, E>;

/// Upper bound of every wait for an event.
pub(crate) const WAIT: Duration = Duration::from_secs(5);

pub(crate) fn hex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
        .collect()
}

pub(crate) const T1: &str = "00 00 00 5f 00 10 00 01 00 00 00 07 00 00 00 01
7b 22 6d 69 64 22 3a 31 32 33 2c 22 72 6f 6f 6d 5f 69 64 22 3a 22 6c 69 76 65 3a 2f 2f
31 30 30 30 22 2c 22 70 6c 61 74 66 6f 72 6d 22 3a 22 77 65 62 22 2c 22 61 63 63 65 70
74 73 22 3a 5b 31 30 30 30 2c 31 30 30 31 2c 31 30 30 32 5d 7d";

pub(crate) const T2: &str = "00 00 00 10 00 10 00 01 00 00 00 08 00 00 00 01";

pub(crate) const T3: &str = "00 00 00 10 00 10 00 01 00 00 00 02 00 00 00 02";

pub(crate) const T4: &str = "00 00 00 14 00 10 00 01 00 00 00 03 00 00 00 02 00 00 00 03";

pub(crate) const T5: &str = "00 00 00 15 00 10 00 01 00 00 03 e8 00 00 00 00 68 65 6c 6c 6f";

pub(crate) const T6: &str = "00 00 00 25 00 10 00 01 00 00 00 09 00 00 00 00
00 00 00 15 00 10 00 01 00 00 03 e8 00 00 00 00 68 65 6c 6c 6f";

pub(crate) const T7: &str =
    "00 00 00 1a 00 10 00 01 00 00 03 e8 00 00 00 00 7b 22 74 65 73 74 22 3a 31 7d
00 00 00 1a 00 10 00 01 00 00 03 e8 00 00 00 00 7b 22 74 65 73 74 22 3a 32 7d";

pub(crate) const T7_WS_HEADER: &str = "00 00 00 44 00 10 00 01 00 00 00 09 00 00 00 00";

pub(crate) const T8_REQ: &str =
    "00 00 00 1b 00 10 00 01 00 00 00 0c 00 00 00 03 6c 69 76 65 3a 2f 2f 31 30 30 31";

pub(crate) const T8_REPLY: &str =
    "00 00 00 1b 00 10 00 01 00 00 00 0d 00 00 00 03 6c 69 76 65 3a 2f 2f 31 30 30 31";

pub(crate) const T10_REQ: &str = "00 00 00 12 00 10 00 01 00 00 00 04 00 00 00 05 68 69";

pub(crate) const T10_REPLY: &str = "00 00 00 10 00 10 00 01 00 00 00 04 00 00 00 05";

// ---------------------------------------------------------------- stub logic

use herald_testkit::stub::{Event, StubLogic};

/// The recording stub logic the tests run against: a minute of idle timeout
/// unless the token says otherwise.
pub(crate) fn stub() -> StubLogic {
    StubLogic::recording().idle_timeout(Duration::from_secs(60))
}

// ------------------------------------------------------------------ harness

pub(crate) struct Harness {
    pub(crate) tcp: SocketAddr,
    pub(crate) ws: SocketAddr,
    pub(crate) grpc: SocketAddr,
    pub(crate) http: SocketAddr,
    pub(crate) wss: Option<SocketAddr>,
    pub(crate) stub: StubLogic,
    pub(crate) stop: Option<oneshot::Sender<()>>,
    pub(crate) comet: Option<JoinHandle<herald_comet::Result<()>>>,
}

impl Harness {
    pub(crate) async fn start(tweak: impl FnOnce(&mut Config)) -> Result<Harness> {
        Harness::start_with(stub(), tweak).await
    }

    pub(crate) async fn start_with(
        stub: StubLogic,
        tweak: impl FnOnce(&mut Config),
    ) -> Result<Harness> {
        let logic_addr = stub.serve().await?;
        let mut config = Config::new("comet-test", logic_addr.to_string());
        config.renew_online_interval = Duration::from_secs(3600);
        tweak(&mut config);
        Harness::start_comet(config, stub).await
    }

    pub(crate) async fn start_comet(config: Config, stub: StubLogic) -> Result<Harness> {
        let listeners = Listeners {
            tcp: TcpListener::bind("127.0.0.1:0").await?,
            ws: TcpListener::bind("127.0.0.1:0").await?,
            wss: match config.tls_cert {
                Some(_) => Some(TcpListener::bind("127.0.0.1:0").await?),
                None => None,
            },
            grpc: TcpListener::bind("127.0.0.1:0").await?,
            http: Some(TcpListener::bind("127.0.0.1:0").await?),
        };
        let (tcp, ws, grpc) = (
            listeners.tcp.local_addr()?,
            listeners.ws.local_addr()?,
            listeners.grpc.local_addr()?,
        );
        let http = listeners.http.as_ref().context("http")?.local_addr()?;
        let wss = match &listeners.wss {
            Some(listener) => Some(listener.local_addr()?),
            None => None,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let comet = tokio::spawn(herald_comet::run(config, listeners, async {
            let _ = stopped.await;
        }));
        Ok(Harness {
            tcp,
            ws,
            grpc,
            http,
            wss,
            stub,
            stop: Some(stop),
            comet: Some(comet),
        })
    }

    pub(crate) async fn channel(&self) -> Result<Channel> {
        Ok(Channel::from_shared(format!("http://{}", self.grpc))?
            .connect()
            .await?)
    }

    pub(crate) async fn comet_client(&self) -> Result<CometClient<Channel>> {
        Ok(CometClient::new(self.channel().await?))
    }

    pub(crate) async fn admin_client(&self) -> Result<CometAdminClient<Channel>> {
        Ok(CometAdminClient::new(self.channel().await?))
    }

    pub(crate) async fn tcp_client(&self, token: &str) -> Result<TcpClient> {
        let mut client = TcpClient::connect(self.tcp).await?;
        client.auth(token).await?;
        Ok(client)
    }

    pub(crate) async fn ws_client(&self, token: &str) -> Result<WsClient> {
        let mut client = WsClient::connect(self.ws).await?;
        client.auth(token).await?;
        Ok(client)
    }

    /// `GET path` on the admin HTTP listener: (status line, body).
    pub(crate) async fn http_get(&self, path: &str) -> Result<(String, String)> {
        let mut stream = TcpStream::connect(self.http).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await?;
        let mut resp = Vec::new();
        timeout(WAIT, stream.read_to_end(&mut resp)).await??;
        let resp = String::from_utf8(resp)?;
        let (head, body) = resp.split_once("\r\n\r\n").context("no body")?;
        let status = head.lines().next().unwrap_or_default().to_owned();
        Ok((status, body.to_owned()))
    }

    /// Polls `/readyz` until it answers `expected` (e.g. "200"); bounded by [`WAIT`].
    pub(crate) async fn wait_readyz(&self, expected: &str) -> Result {
        timeout(WAIT, async {
            loop {
                if let Ok((status, _)) = self.http_get("/readyz").await
                    && status.contains(expected)
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .with_context(|| format!("/readyz never answered {expected}"))
    }

    /// Polls the stub logic's recorded calls until `pred` holds; bounded by
    /// [`WAIT`].
    pub(crate) async fn logic_saw(&self, what: &str, pred: impl Fn(&[Event]) -> bool) -> Result {
        ensure!(
            self.stub.wait_until(WAIT, pred).await,
            "logic never saw {what}: {:?}",
            self.stub.events()
        );
        Ok(())
    }

    /// Stops the comet and waits for `run` to return (sessions included).
    pub(crate) async fn shutdown(&mut self) -> Result {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(comet) = self.comet.take() {
            timeout(WAIT, comet)
                .await
                .context("run did not return")???;
        }
        Ok(())
    }
}

impl Harness {
    /// The value of the metric line `series` (name with labels) on `/metrics`,
    /// 0 when absent.
    pub(crate) async fn metric(&self, series: &str) -> Result<f64> {
        let (_, body) = self.http_get("/metrics").await?;
        Ok(metric_value(&body, series))
    }

    /// Polls `series` until it equals `expected`; bounded by [`WAIT`].
    pub(crate) async fn wait_metric(&self, series: &str, expected: f64) -> Result {
        let mut last = 0.0;
        let waited = timeout(WAIT, async {
            loop {
                if let Ok(value) = self.metric(series).await {
                    last = value;
                    if value == expected {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        waited.with_context(|| format!("{series} stayed {last}, expected {expected}"))
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(comet) = self.comet.take() {
            comet.abort();
        }
    }
}

// ------------------------------------------------------------------ clients

pub(crate) fn auth_frame(token: &str) -> Frame {
    Frame {
        ver: 1,
        op: op::AUTH,
        seq: 1,
        body: Bytes::copy_from_slice(token.as_bytes()),
    }
}

pub(crate) fn raw_push(op: i32, body: &'static [u8]) -> Proto {
    ws::raw_proto(Frame::push(op, body).to_bytes())
}

pub(crate) fn token(key: &str, room: &str, accepts: &[i32]) -> String {
    serde_json::json!({"mid": 7, "key": key, "room_id": room, "accepts": accepts}).to_string()
}

/// A token with its own mid, so the stub's `Receive` calls tell clients apart.
pub(crate) fn token_mid(mid: i64, key: &str) -> String {
    serde_json::json!({"mid": mid, "key": key, "room_id": "", "accepts": []}).to_string()
}

pub(crate) struct TcpClient {
    pub(crate) stream: TcpStream,
    pub(crate) buf: BytesMut,
}

impl TcpClient {
    pub(crate) async fn connect(addr: SocketAddr) -> Result<TcpClient> {
        Ok(TcpClient {
            stream: TcpStream::connect(addr).await?,
            buf: BytesMut::new(),
        })
    }

    pub(crate) async fn send_raw(&mut self, bytes: &[u8]) -> Result {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    pub(crate) async fn send(&mut self, frame: &Frame) -> Result {
        self.send_raw(&frame.to_bytes()).await
    }

    pub(crate) async fn auth(&mut self, token: &str) -> Result {
        self.send(&auth_frame(token)).await?;
        let reply = self.recv().await?;
        if reply.op != op::AUTH_REPLY {
            bail!("expected op 8, got {reply:?}");
        }
        Ok(())
    }

    /// Exactly `n` bytes off the stream.
    pub(crate) async fn read_bytes(&mut self, n: usize) -> Result<Vec<u8>> {
        while self.buf.len() < n {
            let read = timeout(WAIT, self.stream.read_buf(&mut self.buf))
                .await
                .context("timed out reading")??;
            if read == 0 {
                bail!("connection closed after {} of {n} bytes", self.buf.len());
            }
        }
        Ok(self.buf.split_to(n).to_vec())
    }

    pub(crate) async fn recv(&mut self) -> Result<Frame> {
        loop {
            if let Some(frame) = Frame::decode(&mut self.buf, Limits::OUTBOUND)? {
                return Ok(frame);
            }
            let read = timeout(WAIT, self.stream.read_buf(&mut self.buf))
                .await
                .context("timed out waiting for a frame")??;
            if read == 0 {
                bail!("connection closed");
            }
        }
    }

    /// Waits for the server to close; returns the frames received meanwhile.
    pub(crate) async fn closed(&mut self) -> Result<Vec<Frame>> {
        let mut frames = Vec::new();
        loop {
            while let Some(frame) = Frame::decode(&mut self.buf, Limits::OUTBOUND)? {
                frames.push(frame);
            }
            match timeout(WAIT, self.stream.read_buf(&mut self.buf))
                .await
                .context("connection was not closed")?
            {
                Ok(0) | Err(_) => return Ok(frames),
                Ok(_) => {}
            }
        }
    }
}

pub(crate) struct WsClient {
    pub(crate) ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WsClient {
    pub(crate) async fn connect(addr: SocketAddr) -> Result<WsClient> {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/sub")).await?;
        Ok(WsClient { ws })
    }

    pub(crate) async fn send_raw(&mut self, bytes: Vec<u8>) -> Result {
        self.ws.send(Message::Binary(bytes.into())).await?;
        Ok(())
    }

    pub(crate) async fn send(&mut self, frame: &Frame) -> Result {
        self.send_raw(frame.to_bytes().to_vec()).await
    }

    pub(crate) async fn auth(&mut self, token: &str) -> Result {
        self.send(&auth_frame(token)).await?;
        let reply = Frame::from_message(self.recv_msg().await?, Limits::OUTBOUND)?;
        if reply.op != op::AUTH_REPLY {
            bail!("expected op 8, got {reply:?}");
        }
        Ok(())
    }

    /// The next data message.
    pub(crate) async fn recv_msg(&mut self) -> Result<Bytes> {
        loop {
            let msg = timeout(WAIT, self.ws.next())
                .await
                .context("timed out waiting for a message")?
                .context("stream ended")??;
            match msg {
                Message::Binary(b) => return Ok(b),
                Message::Close(_) => bail!("closed"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => bail!("unexpected message {other:?}"),
            }
        }
    }

    /// Waits for the server to close; returns the data messages received meanwhile.
    pub(crate) async fn closed(&mut self) -> Result<Vec<Bytes>> {
        let mut msgs = Vec::new();
        loop {
            match timeout(WAIT, self.ws.next())
                .await
                .context("connection was not closed")?
            {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Ok(msgs),
                Some(Ok(Message::Binary(b))) => msgs.push(b),
                Some(Ok(_)) => {}
            }
        }
    }
}

pub(crate) fn upgrade_head(extra: &str) -> String {
    format!(
        "GET /sub HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

// ------------------------------------------------------------------ metrics

pub(crate) fn metric_value(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}
