//! The harness shared by comet's black-box tests: a comet started with
//! `run` on 127.0.0.1:0, herald-testkit's recording stub logic and HTTP
//! client, herald-client's goim clients (TCP and WebSocket), and a tonic
//! client for the comet's gRPC services. Byte vectors are spec §14's.

// Each test binary uses its own part of the harness.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, ensure};
use bytes::Bytes;
use herald_client::{Client, Error as ClientError};
use herald_comet::{Config, Listeners};
use herald_protocol::pb::admin::comet_admin_client::CometAdminClient;
use herald_protocol::pb::{CometClient, Proto};
use herald_protocol::{Frame, op, ws};
use herald_testkit::http;
use herald_testkit::stub::{Event, StubLogic};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;
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

/// T7 as a WebSocket client receives it: one op-9 message, [`T7_WS_HEADER`]
/// then both frames.
pub(crate) fn t7_ws() -> Vec<u8> {
    let mut message = hex(T7_WS_HEADER);
    message.extend(hex(T7));
    message
}

pub(crate) const T8_REQ: &str =
    "00 00 00 1b 00 10 00 01 00 00 00 0c 00 00 00 03 6c 69 76 65 3a 2f 2f 31 30 30 31";

pub(crate) const T8_REPLY: &str =
    "00 00 00 1b 00 10 00 01 00 00 00 0d 00 00 00 03 6c 69 76 65 3a 2f 2f 31 30 30 31";

pub(crate) const T10_REQ: &str = "00 00 00 12 00 10 00 01 00 00 00 04 00 00 00 05 68 69";

pub(crate) const T10_REPLY: &str = "00 00 00 10 00 10 00 01 00 00 00 04 00 00 00 05";

// ---------------------------------------------------------------- stub logic

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

    /// A TCP client authenticated with `token`.
    pub(crate) async fn tcp_client(&self, token: &str) -> Result<Client> {
        let mut client = connect_tcp(self.tcp).await?;
        client.auth(token.to_owned()).await?;
        Ok(client)
    }

    /// A WebSocket client authenticated with `token`.
    pub(crate) async fn ws_client(&self, token: &str) -> Result<Client> {
        let mut client = connect_ws(self.ws).await?;
        client.auth(token.to_owned()).await?;
        Ok(client)
    }

    /// A client that connects now (over WebSocket with `ws`, else TCP)
    /// authenticates and gets a key push: whatever a test's offender did
    /// left the comet serving everyone else.
    pub(crate) async fn serves_a_new_client(&self, ws: bool, key: &str) -> Result {
        let token = token(key, "", &[1000]);
        let mut client = if ws {
            self.ws_client(&token).await?
        } else {
            self.tcp_client(&token).await?
        };
        self.comet_client()
            .await?
            .push_msg(herald_protocol::pb::PushMsgReq {
                keys: vec![key.to_owned()],
                proto: Some(raw_push(1000, b"fresh")),
                proto_op: 1000,
            })
            .await?;
        let want = if ws {
            ws::push_for_ws(&raw_push(1000, b"fresh"))
        } else {
            Frame::push(1000, &b"fresh"[..]).to_bytes()
        };
        assert_eq!(
            client.next_message().await?.to_bytes(),
            want,
            "a new client after the offender"
        );
        Ok(())
    }

    /// Polls `/readyz` until it answers `expected` (e.g. 200); bounded by [`WAIT`].
    pub(crate) async fn wait_readyz(&self, expected: u16) -> Result {
        timeout(WAIT, async {
            loop {
                if let Ok(answer) = http::get(self.http, "/readyz").await
                    && answer.status == expected
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
        let answer = http::get(self.http, "/metrics").await?;
        Ok(metric_value(&answer.body, series))
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

/// A TCP client of `addr`, not authenticated; each of its waits bounded by
/// [`WAIT`].
pub(crate) async fn connect_tcp(addr: SocketAddr) -> Result<Client> {
    Ok(Client::connect_tcp(addr).await?.with_timeout(WAIT))
}

/// A WebSocket client of `ws://{addr}/sub`, not authenticated; each of its
/// waits bounded by [`WAIT`].
pub(crate) async fn connect_ws(addr: SocketAddr) -> Result<Client> {
    Ok(Client::connect_ws(format!("ws://{addr}/sub"))
        .await?
        .with_timeout(WAIT))
}

/// Waits for the comet to close `client`'s connection; returns the messages
/// (frames on TCP, one per message on WebSocket) received meanwhile.
pub(crate) async fn closed(client: &mut Client) -> Result<Vec<Frame>> {
    let mut frames = Vec::new();
    loop {
        match client.next_message().await {
            Ok(frame) => frames.push(frame),
            Err(ClientError::Closed | ClientError::Io(_) | ClientError::WebSocket(_)) => {
                return Ok(frames);
            }
            Err(err @ ClientError::Timeout(_)) => {
                return Err(err).context("connection was not closed");
            }
            Err(err) => return Err(err.into()),
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
