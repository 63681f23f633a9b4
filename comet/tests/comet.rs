//! Black-box tests: a comet started with `run` on 127.0.0.1:0, a stub
//! `goim.logic.Logic` that records calls, real TCP and WebSocket clients, and
//! a tonic client for the comet's gRPC services. Byte vectors are docs/protocol.md §14's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use herald_comet::{Config, Listeners};
use herald_protocol::pb::admin::comet_admin_client::CometAdminClient;
use herald_protocol::pb::admin::{DrainRequest, LoadRequest};
use herald_protocol::pb::goim::comet::RoomsReq;
use herald_protocol::pb::goim::logic::{
    DisconnectReply, DisconnectReq, HeartbeatReply, HeartbeatReq, NodesReply, NodesReq,
    OnlineReply, OnlineReq, ReceiveReply, ReceiveReq,
};
use herald_protocol::pb::{
    BroadcastReq, BroadcastRoomReq, CometClient, ConnectReply, ConnectReq, Logic, LogicServer,
    Proto, PushMsgReq,
};
use herald_protocol::{Frame, Limits, op, ws};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Message, http};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

type Result<T = (), E = anyhow::Error> = std::result::Result<T, E>;

/// Upper bound of every wait for an event.
const WAIT: Duration = Duration::from_secs(5);

fn hex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
        .collect()
}

const T1: &str = "00 00 00 5f 00 10 00 01 00 00 00 07 00 00 00 01
7b 22 6d 69 64 22 3a 31 32 33 2c 22 72 6f 6f 6d 5f 69 64 22 3a 22 6c 69 76 65 3a 2f 2f
31 30 30 30 22 2c 22 70 6c 61 74 66 6f 72 6d 22 3a 22 77 65 62 22 2c 22 61 63 63 65 70
74 73 22 3a 5b 31 30 30 30 2c 31 30 30 31 2c 31 30 30 32 5d 7d";
const T2: &str = "00 00 00 10 00 10 00 01 00 00 00 08 00 00 00 01";
const T3: &str = "00 00 00 10 00 10 00 01 00 00 00 02 00 00 00 02";
const T4: &str = "00 00 00 14 00 10 00 01 00 00 00 03 00 00 00 02 00 00 00 03";
const T5: &str = "00 00 00 15 00 10 00 01 00 00 03 e8 00 00 00 00 68 65 6c 6c 6f";
const T6: &str = "00 00 00 25 00 10 00 01 00 00 00 09 00 00 00 00
00 00 00 15 00 10 00 01 00 00 03 e8 00 00 00 00 68 65 6c 6c 6f";
const T7: &str = "00 00 00 1a 00 10 00 01 00 00 03 e8 00 00 00 00 7b 22 74 65 73 74 22 3a 31 7d
00 00 00 1a 00 10 00 01 00 00 03 e8 00 00 00 00 7b 22 74 65 73 74 22 3a 32 7d";
const T7_WS_HEADER: &str = "00 00 00 44 00 10 00 01 00 00 00 09 00 00 00 00";
const T8_REQ: &str =
    "00 00 00 1b 00 10 00 01 00 00 00 0c 00 00 00 03 6c 69 76 65 3a 2f 2f 31 30 30 31";
const T8_REPLY: &str =
    "00 00 00 1b 00 10 00 01 00 00 00 0d 00 00 00 03 6c 69 76 65 3a 2f 2f 31 30 30 31";
const T10_REQ: &str = "00 00 00 12 00 10 00 01 00 00 00 04 00 00 00 05 68 69";
const T10_REPLY: &str = "00 00 00 10 00 10 00 01 00 00 00 04 00 00 00 05";

// ---------------------------------------------------------------- stub logic

#[derive(Debug, Clone, PartialEq)]
enum Event {
    Connect {
        token: String,
        server: String,
        cookie: String,
    },
    Disconnect {
        mid: i64,
        key: String,
    },
    Heartbeat {
        key: String,
    },
    Renew {
        counts: HashMap<String, i32>,
    },
    Receive {
        mid: i64,
        proto: Proto,
    },
}

#[derive(Debug, Clone, Default)]
struct Stub {
    events: Arc<Mutex<Vec<Event>>>,
    online: HashMap<String, i32>,
    auto_key: Arc<AtomicU64>,
    /// When set, `Disconnect`s are served one at a time, each taking this
    /// long: a logic with a finite rate.
    disconnect_cost: Option<Duration>,
    serial: Arc<tokio::sync::Mutex<()>>,
}

impl Stub {
    fn record(&self, event: Event) {
        self.events.lock().expect("events lock").push(event);
    }

    fn events(&self) -> Vec<Event> {
        self.events.lock().expect("events lock").clone()
    }

    fn disconnects(&self, key: &str) -> usize {
        self.events()
            .iter()
            .filter(|e| matches!(e, Event::Disconnect { key: k, .. } if k == key))
            .count()
    }

    /// Polls the recorded calls until `pred` holds; bounded by [`WAIT`].
    async fn wait_for(&self, what: &str, pred: impl Fn(&[Event]) -> bool) -> Result {
        timeout(WAIT, async {
            while !pred(&self.events()) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .with_context(|| format!("logic never saw {what}: {:?}", self.events()))
    }
}

#[tonic::async_trait]
impl Logic for Stub {
    async fn connect(&self, req: Request<ConnectReq>) -> Result<Response<ConnectReply>, Status> {
        let req = req.into_inner();
        let token = String::from_utf8_lossy(&req.token).into_owned();
        self.record(Event::Connect {
            token: token.clone(),
            server: req.server.clone(),
            cookie: req.cookie,
        });
        let v: serde_json::Value = serde_json::from_str(&token)
            .map_err(|_| Status::invalid_argument("token is not JSON"))?;
        if v["fail"].as_bool() == Some(true) {
            return Err(Status::unauthenticated("refused"));
        }
        let key = match v["key"].as_str() {
            Some(key) if !key.is_empty() => key.to_owned(),
            _ => format!("auto-{}", self.auto_key.fetch_add(1, Ordering::Relaxed)),
        };
        Ok(Response::new(ConnectReply {
            mid: v["mid"].as_i64().unwrap_or(0),
            key,
            room_id: v["room_id"].as_str().unwrap_or("").to_owned(),
            accepts: v["accepts"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_i64())
                        .map(|x| x as i32)
                        .collect()
                })
                .unwrap_or_default(),
            heartbeat: v["heartbeat_ms"].as_i64().unwrap_or(60_000) * 1_000_000,
        }))
    }

    async fn disconnect(
        &self,
        req: Request<DisconnectReq>,
    ) -> Result<Response<DisconnectReply>, Status> {
        let req = req.into_inner();
        if let Some(cost) = self.disconnect_cost {
            // One Disconnect at a time, like a logic bound by its Redis.
            let _serial = self.serial.lock().await;
            tokio::time::sleep(cost).await;
        }
        self.record(Event::Disconnect {
            mid: req.mid,
            key: req.key,
        });
        Ok(Response::new(DisconnectReply { has: true }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatReq>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        self.record(Event::Heartbeat {
            key: req.into_inner().key,
        });
        Ok(Response::new(HeartbeatReply {}))
    }

    async fn renew_online(&self, req: Request<OnlineReq>) -> Result<Response<OnlineReply>, Status> {
        self.record(Event::Renew {
            counts: req.into_inner().room_count,
        });
        Ok(Response::new(OnlineReply {
            all_room_count: self.online.clone(),
        }))
    }

    async fn receive(&self, req: Request<ReceiveReq>) -> Result<Response<ReceiveReply>, Status> {
        let req = req.into_inner();
        self.record(Event::Receive {
            mid: req.mid,
            proto: req.proto.unwrap_or_default(),
        });
        Ok(Response::new(ReceiveReply {}))
    }

    async fn nodes(&self, _req: Request<NodesReq>) -> Result<Response<NodesReply>, Status> {
        Err(Status::unimplemented("not in the stub"))
    }
}

// ------------------------------------------------------------------ harness

struct Harness {
    tcp: SocketAddr,
    ws: SocketAddr,
    grpc: SocketAddr,
    http: SocketAddr,
    wss: Option<SocketAddr>,
    stub: Stub,
    stop: Option<oneshot::Sender<()>>,
    comet: Option<JoinHandle<herald_comet::Result<()>>>,
}

impl Harness {
    async fn start(tweak: impl FnOnce(&mut Config)) -> Result<Harness> {
        Harness::start_with(Stub::default(), tweak).await
    }

    async fn start_with(stub: Stub, tweak: impl FnOnce(&mut Config)) -> Result<Harness> {
        let logic_listener = TcpListener::bind("127.0.0.1:0").await?;
        let logic_addr = logic_listener.local_addr()?;
        let server = LogicServer::new(stub.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(server)
                .serve_with_incoming(TcpListenerStream::new(logic_listener)),
        );
        let mut config = Config::new("comet-test", logic_addr.to_string());
        config.renew_online_interval = Duration::from_secs(3600);
        tweak(&mut config);
        Harness::start_comet(config, stub).await
    }

    async fn start_comet(config: Config, stub: Stub) -> Result<Harness> {
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

    async fn channel(&self) -> Result<Channel> {
        Ok(Channel::from_shared(format!("http://{}", self.grpc))?
            .connect()
            .await?)
    }

    async fn comet_client(&self) -> Result<CometClient<Channel>> {
        Ok(CometClient::new(self.channel().await?))
    }

    async fn admin_client(&self) -> Result<CometAdminClient<Channel>> {
        Ok(CometAdminClient::new(self.channel().await?))
    }

    async fn tcp_client(&self, token: &str) -> Result<TcpClient> {
        let mut client = TcpClient::connect(self.tcp).await?;
        client.auth(token).await?;
        Ok(client)
    }

    async fn ws_client(&self, token: &str) -> Result<WsClient> {
        let mut client = WsClient::connect(self.ws).await?;
        client.auth(token).await?;
        Ok(client)
    }

    /// `GET path` on the admin HTTP listener: (status line, body).
    async fn http_get(&self, path: &str) -> Result<(String, String)> {
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
    async fn wait_readyz(&self, expected: &str) -> Result {
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

    /// Stops the comet and waits for `run` to return (sessions included).
    async fn shutdown(&mut self) -> Result {
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

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(comet) = self.comet.take() {
            comet.abort();
        }
    }
}

fn auth_frame(token: &str) -> Frame {
    Frame {
        ver: 1,
        op: op::AUTH,
        seq: 1,
        body: Bytes::copy_from_slice(token.as_bytes()),
    }
}

fn raw_push(op: i32, body: &'static [u8]) -> Proto {
    ws::raw_proto(Frame::push(op, body).to_bytes())
}

struct TcpClient {
    stream: TcpStream,
    buf: BytesMut,
}

impl TcpClient {
    async fn connect(addr: SocketAddr) -> Result<TcpClient> {
        Ok(TcpClient {
            stream: TcpStream::connect(addr).await?,
            buf: BytesMut::new(),
        })
    }

    async fn send_raw(&mut self, bytes: &[u8]) -> Result {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    async fn send(&mut self, frame: &Frame) -> Result {
        self.send_raw(&frame.to_bytes()).await
    }

    async fn auth(&mut self, token: &str) -> Result {
        self.send(&auth_frame(token)).await?;
        let reply = self.recv().await?;
        if reply.op != op::AUTH_REPLY {
            bail!("expected op 8, got {reply:?}");
        }
        Ok(())
    }

    /// Exactly `n` bytes off the stream.
    async fn read_bytes(&mut self, n: usize) -> Result<Vec<u8>> {
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

    async fn recv(&mut self) -> Result<Frame> {
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
    async fn closed(&mut self) -> Result<Vec<Frame>> {
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

struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WsClient {
    async fn connect(addr: SocketAddr) -> Result<WsClient> {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/sub")).await?;
        Ok(WsClient { ws })
    }

    async fn send_raw(&mut self, bytes: Vec<u8>) -> Result {
        self.ws.send(Message::Binary(bytes.into())).await?;
        Ok(())
    }

    async fn send(&mut self, frame: &Frame) -> Result {
        self.send_raw(frame.to_bytes().to_vec()).await
    }

    async fn auth(&mut self, token: &str) -> Result {
        self.send(&auth_frame(token)).await?;
        let reply = Frame::from_message(self.recv_msg().await?, Limits::OUTBOUND)?;
        if reply.op != op::AUTH_REPLY {
            bail!("expected op 8, got {reply:?}");
        }
        Ok(())
    }

    /// The next data message.
    async fn recv_msg(&mut self) -> Result<Bytes> {
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
    async fn closed(&mut self) -> Result<Vec<Bytes>> {
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

fn token(key: &str, room: &str, accepts: &[i32]) -> String {
    serde_json::json!({"mid": 7, "key": key, "room_id": room, "accepts": accepts}).to_string()
}

// -------------------------------------------------------------------- tests

#[tokio::test]
async fn tcp_session_matches_spec_vectors() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let mut c = TcpClient::connect(h.tcp).await?;
    // A frame before op 7 is discarded without reply.
    c.send_raw(&hex(T3)).await?;
    c.send_raw(&hex(T1)).await?;
    assert_eq!(c.read_bytes(16).await?, hex(T2), "T2");
    let _b = h.tcp_client(&token("b", "live://1000", &[])).await?;
    let _d = h.ws_client(&token("d", "live://1000", &[])).await?;

    c.send_raw(&hex(T3)).await?;
    assert_eq!(
        c.read_bytes(20).await?,
        hex(T4),
        "T4: three members of live://1000"
    );

    c.send_raw(&hex(T8_REQ)).await?;
    assert_eq!(c.read_bytes(27).await?, hex(T8_REPLY), "T8");
    c.send_raw(&hex(T3)).await?;
    assert_eq!(
        c.read_bytes(20).await?[16..],
        [0, 0, 0, 1],
        "alone in live://1001"
    );

    c.send(&Frame {
        ver: 1,
        op: op::CHANGE_ROOM,
        seq: 9,
        body: Bytes::new(),
    })
    .await?;
    let reply = c.recv().await?;
    assert_eq!(
        (reply.op, reply.seq, reply.body.len()),
        (op::CHANGE_ROOM_REPLY, 9, 0)
    );
    c.send_raw(&hex(T3)).await?;
    assert_eq!(
        c.read_bytes(20).await?[16..],
        [0, 0, 0, 0],
        "no stale count outside a room"
    );

    c.send_raw(&hex(T10_REQ)).await?;
    assert_eq!(c.read_bytes(16).await?, hex(T10_REPLY), "T10");
    h.stub
        .wait_for("Receive of op 4", |events| {
            events.iter().any(|e| {
                matches!(e, Event::Receive { mid: 123, proto }
                    if proto.op == 4 && proto.seq == 5 && proto.body.as_ref() == b"hi")
            })
        })
        .await?;
    let connects = h
        .stub
        .events()
        .into_iter()
        .filter(|e| matches!(e, Event::Connect { .. }));
    assert_eq!(
        connects.count(),
        3,
        "the early heartbeat did not reach logic"
    );
    h.shutdown().await
}

#[tokio::test]
async fn ws_session_matches_spec_vectors() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let _b = h.tcp_client(&token("b", "live://1000", &[])).await?;
    let _c = h.tcp_client(&token("c", "live://1000", &[])).await?;
    let mut req = format!("ws://{}/sub", h.ws).into_client_request()?;
    req.headers_mut().insert("cookie", "sid=abc".parse()?);
    let (ws, _) = tokio_tungstenite::connect_async(req).await?;
    let mut w = WsClient { ws };
    w.send_raw(hex(T1)).await?;
    assert_eq!(w.recv_msg().await?.to_vec(), hex(T2), "T2");
    let connect = Event::Connect {
        token: String::from_utf8(hex(T1)[16..].to_vec())?,
        server: "comet-test".into(),
        cookie: "sid=abc".into(),
    };
    assert!(
        h.stub.events().contains(&connect),
        "server id and cookie reach logic"
    );
    w.send_raw(hex(T3)).await?;
    assert_eq!(w.recv_msg().await?.to_vec(), hex(T4), "T4");
    w.send_raw(hex(T8_REQ)).await?;
    assert_eq!(w.recv_msg().await?.to_vec(), hex(T8_REPLY), "T8");
    w.send_raw(hex(T10_REQ)).await?;
    assert_eq!(w.recv_msg().await?.to_vec(), hex(T10_REPLY), "T10");
    // Pings are answered.
    w.ws.send(Message::Ping(Bytes::from_static(b"p"))).await?;
    let pong = timeout(WAIT, w.ws.next()).await?.context("ended")??;
    assert_eq!(pong, Message::Pong(Bytes::from_static(b"p")));
    // Text messages carry frames too.
    w.ws.send(Message::Text(String::from_utf8(hex(T3))?.into()))
        .await?;
    assert_eq!(w.recv_msg().await?.to_vec()[..12], hex(T4)[..12]);
    h.shutdown().await
}

#[tokio::test]
async fn pushes_match_t5_t6_t7_on_each_transport() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let mut t = h.tcp_client(&token("k1", "live://1000", &[1000])).await?;
    let mut w = h.ws_client(&token("k2", "live://1000", &[1000])).await?;
    let mut grpc = h.comet_client().await?;

    grpc.push_msg(PushMsgReq {
        keys: vec!["k1".into(), "missing".into(), "k2".into()],
        proto: Some(ws::raw_proto(hex(T5).into())),
        proto_op: 1000,
    })
    .await?;
    assert_eq!(t.read_bytes(21).await?, hex(T5), "T5 on TCP");
    assert_eq!(w.recv_msg().await?.to_vec(), hex(T6), "T6 on WebSocket");

    grpc.broadcast_room(BroadcastRoomReq {
        room_id: "live://1000".into(),
        proto: Some(ws::raw_proto(hex(T7).into())),
    })
    .await?;
    assert_eq!(t.read_bytes(52).await?, hex(T7), "T7 on TCP");
    let mut expected = hex(T7_WS_HEADER);
    expected.extend(hex(T7));
    assert_eq!(w.recv_msg().await?.to_vec(), expected, "T7 on WebSocket");

    // A non-op-9 proto is framed as one frame.
    grpc.push_msg(PushMsgReq {
        keys: vec!["k1".into()],
        proto: Some(Proto {
            ver: 1,
            op: 1000,
            seq: 0,
            body: Bytes::from_static(b"hello"),
        }),
        proto_op: 1000,
    })
    .await?;
    assert_eq!(t.read_bytes(21).await?, hex(T5));

    let rooms = grpc.rooms(RoomsReq {}).await?.into_inner().rooms;
    assert_eq!(rooms, HashMap::from([("live://1000".to_owned(), true)]));
    h.shutdown().await
}

#[tokio::test]
async fn push_msgs_delivers_each_push_to_its_keys_in_order() -> Result {
    use herald_protocol::pb::push::PushMsgsReq;
    use herald_protocol::pb::push::comet_push_client::CometPushClient;
    let mut h = Harness::start(|_| {}).await?;
    let mut a = h.tcp_client(&token("a", "", &[1000])).await?;
    let mut b = h.ws_client(&token("b", "", &[1000])).await?;
    let mut batch = CometPushClient::new(h.channel().await?);
    let push = |keys: &[&str], body: &'static [u8]| PushMsgReq {
        keys: keys.iter().map(|k| (*k).to_owned()).collect(),
        proto: Some(raw_push(1000, body)),
        proto_op: 1000,
    };
    batch
        .push_msgs(PushMsgsReq {
            pushes: vec![
                push(&["a"], b"a1"),
                push(&["b", "missing"], b"b1"),
                push(&["a", "b"], b"ab"),
                push(&["a"], b"a2"),
            ],
        })
        .await?;
    for want in [&b"a1"[..], b"ab", b"a2"] {
        assert_eq!(&a.recv().await?.body[..], want);
    }
    for want in [&b"b1"[..], b"ab"] {
        let msg = b.recv_msg().await?;
        assert!(msg.ends_with(want), "{msg:?} for {want:?}");
    }
    // One bad push refuses the whole batch before any of it is delivered.
    let err = batch
        .push_msgs(PushMsgsReq {
            pushes: vec![push(&["a"], b"no"), push(&[], b"xx")],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("push 1"), "{}", err.message());
    h.comet_client()
        .await?
        .push_msg(push(&["a"], b"ok"))
        .await?;
    assert_eq!(
        &a.recv().await?.body[..],
        b"ok",
        "the refused batch sent nothing"
    );
    h.shutdown().await
}

#[tokio::test]
async fn invalid_push_requests_are_rejected() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let mut grpc = h.comet_client().await?;
    let proto = Some(raw_push(1000, b"x"));
    let err = grpc
        .push_msg(PushMsgReq {
            keys: vec![],
            proto: proto.clone(),
            proto_op: 1000,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = grpc
        .push_msg(PushMsgReq {
            keys: vec!["k".into()],
            proto: None,
            proto_op: 1000,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = grpc
        .broadcast_room(BroadcastRoomReq {
            room_id: String::new(),
            proto,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = grpc
        .broadcast_room(BroadcastRoomReq {
            room_id: "r".into(),
            proto: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    h.shutdown().await
}

#[tokio::test]
async fn key_and_broadcast_pushes_respect_accepted_ops() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let mut c = h.tcp_client(&token("f", "", &[1000])).await?;
    let mut grpc = h.comet_client().await?;
    let push = |op: i32, body: &'static [u8]| PushMsgReq {
        keys: vec!["f".into()],
        proto: Some(raw_push(op, body)),
        proto_op: op,
    };

    // 1001 is not accepted: the next frame seen is the 1000 marker.
    grpc.push_msg(push(1001, b"no")).await?;
    grpc.push_msg(push(1000, b"m1")).await?;
    assert_eq!(c.recv().await?, Frame::push(1000, &b"m1"[..]));

    c.send(&Frame {
        ver: 1,
        op: op::SUB,
        seq: 4,
        body: Bytes::from_static(b"1001,1002"),
    })
    .await?;
    let reply = c.recv().await?;
    assert_eq!(
        (reply.op, reply.seq, &reply.body[..]),
        (op::SUB_REPLY, 4, &b"1001,1002"[..])
    );
    grpc.push_msg(push(1001, b"yes")).await?;
    assert_eq!(c.recv().await?, Frame::push(1001, &b"yes"[..]));

    // A bad list changes nothing but is still echoed.
    c.send(&Frame {
        ver: 1,
        op: op::UNSUB,
        seq: 5,
        body: Bytes::from_static(b"1001,x"),
    })
    .await?;
    assert_eq!(c.recv().await?.op, op::UNSUB_REPLY);
    grpc.push_msg(push(1001, b"still")).await?;
    assert_eq!(c.recv().await?, Frame::push(1001, &b"still"[..]));

    c.send(&Frame {
        ver: 1,
        op: op::UNSUB,
        seq: 6,
        body: Bytes::from_static(b"1001"),
    })
    .await?;
    assert_eq!(c.recv().await?.op, op::UNSUB_REPLY);
    grpc.push_msg(push(1001, b"gone")).await?;
    grpc.broadcast(BroadcastReq {
        proto_op: 1001,
        proto: Some(raw_push(1001, b"gone")),
        speed: 0,
    })
    .await?;
    grpc.broadcast(BroadcastReq {
        proto_op: 1002,
        proto: Some(raw_push(1002, b"bc")),
        speed: 0,
    })
    .await?;
    assert_eq!(c.recv().await?, Frame::push(1002, &b"bc"[..]));
    h.shutdown().await
}

#[tokio::test]
async fn paced_broadcast_reaches_every_accepting_connection() -> Result {
    let mut h = Harness::start(|c| c.buckets = 4).await?;
    let mut clients = Vec::new();
    for i in 0..6 {
        clients.push(h.tcp_client(&token(&format!("p{i}"), "", &[1000])).await?);
    }
    let mut w = h.ws_client(&token("pw", "", &[1000])).await?;
    let mut grpc = h.comet_client().await?;
    grpc.broadcast(BroadcastReq {
        proto_op: 1000,
        proto: Some(raw_push(1000, b"all")),
        speed: 50,
    })
    .await?;
    for c in &mut clients {
        assert_eq!(c.recv().await?, Frame::push(1000, &b"all"[..]));
    }
    let msg = w.recv_msg().await?;
    assert_eq!(msg, ws::wrap(&Frame::push(1000, &b"all"[..]).to_bytes()));
    h.shutdown().await
}

#[tokio::test]
async fn same_key_replaces_and_each_connection_disconnects_once() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let mut old = h.tcp_client(&token("dup", "r", &[1000])).await?;
    let mut new = h.ws_client(&token("dup", "r", &[1000])).await?;
    assert!(
        old.closed().await?.is_empty(),
        "old connection closed without more frames"
    );
    let mut grpc = h.comet_client().await?;
    grpc.push_msg(PushMsgReq {
        keys: vec!["dup".into()],
        proto: Some(raw_push(1000, b"to-new")),
        proto_op: 1000,
    })
    .await?;
    let msg = new.recv_msg().await?;
    assert_eq!(msg, ws::wrap(&Frame::push(1000, &b"to-new"[..]).to_bytes()));
    h.stub
        .wait_for("old Disconnect", |_| h.stub.disconnects("dup") == 1)
        .await?;
    // The old Disconnect removed the route logic keeps per key and server; a
    // refresh for the successor must follow it to restore the route.
    h.stub
        .wait_for("route restored after the old Disconnect", |events| {
            let disconnect = events
                .iter()
                .position(|e| matches!(e, Event::Disconnect { .. }));
            let refresh = events
                .iter()
                .rposition(|e| *e == Event::Heartbeat { key: "dup".into() });
            matches!((disconnect, refresh), (Some(d), Some(r)) if r > d)
        })
        .await?;

    // An unauthenticated connection never causes a Disconnect.
    let mut anon = TcpClient::connect(h.tcp).await?;
    anon.send_raw(&hex(T3)).await?;
    drop(anon);

    new.ws.close(None).await?;
    h.stub
        .wait_for("new Disconnect", |_| h.stub.disconnects("dup") == 2)
        .await?;
    h.shutdown().await?;
    assert_eq!(h.stub.disconnects("dup"), 2, "exactly once per connection");
    let all = h
        .stub
        .events()
        .iter()
        .filter(|e| matches!(e, Event::Disconnect { .. }))
        .count();
    assert_eq!(all, 2);
    assert!(h.stub.events().contains(&Event::Disconnect {
        mid: 7,
        key: "dup".into()
    }));
    Ok(())
}

#[tokio::test]
async fn handshake_deadline_closes_silent_connections() -> Result {
    let mut h = Harness::start(|c| c.handshake_timeout = Duration::from_millis(300)).await?;
    let start = tokio::time::Instant::now();
    let mut tcp = TcpClient::connect(h.tcp).await?;
    tcp.send_raw(&hex(T3)).await?;
    assert!(
        tcp.closed().await?.is_empty(),
        "nothing answered before auth"
    );
    // A WebSocket-port client that never sends its upgrade is closed too.
    let mut raw = TcpClient::connect(h.ws).await?;
    assert!(raw.closed().await?.is_empty());
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(h.stub.events().is_empty(), "logic was never called");
    h.shutdown().await
}

#[tokio::test]
async fn idle_timeout_comes_from_connect_reply() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let token = serde_json::json!({"key": "idle", "heartbeat_ms": 600}).to_string();
    let mut c = h.tcp_client(&token).await?;
    // Heartbeats keep it alive past one idle period...
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        c.send_raw(&hex(T3)).await?;
        assert_eq!(c.recv().await?.op, op::HEARTBEAT_REPLY);
    }
    // ...and silence ends it.
    c.closed().await?;
    h.stub
        .wait_for("Disconnect", |_| h.stub.disconnects("idle") == 1)
        .await?;
    h.shutdown().await
}

#[tokio::test]
async fn invalid_frames_close_only_the_offender() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let mut healthy = h.tcp_client(&token("ok", "room", &[])).await?;
    let mut grpc = h.comet_client().await?;
    let mut check_healthy = async |body: &'static [u8]| -> Result {
        grpc.broadcast_room(BroadcastRoomReq {
            room_id: "room".into(),
            proto: Some(raw_push(1000, body)),
        })
        .await?;
        assert_eq!(healthy.recv().await?, Frame::push(1000, body));
        Ok(())
    };

    // TCP: pack_len 4113 (> 4112).
    let mut big = h.tcp_client(&token("big", "room", &[])).await?;
    let mut header = hex(T3);
    header[..4].copy_from_slice(&4113i32.to_be_bytes());
    big.send_raw(&header).await?;
    big.closed().await?;
    check_healthy(b"1").await?;

    // TCP: header_len 15.
    let mut bad = h.tcp_client(&token("hl", "room", &[])).await?;
    let mut header = hex(T3);
    header[4..6].copy_from_slice(&15i16.to_be_bytes());
    bad.send_raw(&header).await?;
    bad.closed().await?;
    check_healthy(b"2").await?;

    // WebSocket: a message shorter than its pack_len.
    let mut short = h.ws_client(&token("short", "room", &[])).await?;
    let mut msg = hex(T10_REQ);
    msg[..4].copy_from_slice(&32i32.to_be_bytes());
    short.send_raw(msg).await?;
    short.closed().await?;
    check_healthy(b"3").await?;

    // WebSocket: a message past the size limit.
    let mut huge = h.ws_client(&token("huge", "room", &[])).await?;
    let frame = Frame {
        ver: 1,
        op: 4,
        seq: 1,
        body: Bytes::from(vec![0u8; 9000]),
    };
    let _ = huge.send(&frame).await;
    huge.closed().await?;
    check_healthy(b"4").await?;

    for key in ["big", "hl", "short", "huge"] {
        h.stub
            .wait_for("Disconnect", |_| h.stub.disconnects(key) == 1)
            .await?;
    }
    h.shutdown().await
}

#[tokio::test]
async fn websocket_upgrade_checks_the_path() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let upgrade = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        )
    };
    for path in ["/foo", "/sub?x=1"] {
        let mut c = TcpClient::connect(h.ws).await?;
        c.send_raw(upgrade(path).as_bytes()).await?;
        let head = c.read_bytes(12).await?;
        assert_eq!(head, b"HTTP/1.1 400", "path {path}");
    }
    let mut c = TcpClient::connect(h.ws).await?;
    c.send_raw(upgrade("/sub").as_bytes()).await?;
    let head = c.read_bytes(12).await?;
    assert_eq!(head, b"HTTP/1.1 101");
    let mut rest = Vec::new();
    while !rest.ends_with(b"\r\n\r\n") {
        rest.extend(c.read_bytes(1).await?);
    }
    let rest = String::from_utf8(rest)?;
    assert!(
        rest.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "T11 accept value in {rest}"
    );
    h.shutdown().await
}

#[tokio::test]
async fn auth_failures_close_without_reply() -> Result {
    // Logic refuses the token.
    let mut h = Harness::start(|_| {}).await?;
    let mut c = TcpClient::connect(h.tcp).await?;
    c.send(&auth_frame(r#"{"key":"x","fail":true}"#)).await?;
    assert!(c.closed().await?.is_empty(), "no op 8");
    let mut w = WsClient::connect(h.ws).await?;
    w.send(&auth_frame("not json")).await?;
    assert!(w.closed().await?.is_empty(), "no op 8");
    h.shutdown().await?;
    assert_eq!(h.stub.disconnects("x"), 0);

    // Logic accepts TCP but never answers: the handshake deadline still holds.
    let black_hole = TcpListener::bind("127.0.0.1:0").await?;
    let mut config = Config::new("comet-test", black_hole.local_addr()?.to_string());
    config.handshake_timeout = Duration::from_millis(500);
    config.logic_timeout = Duration::from_secs(30);
    let mut h = Harness::start_comet(config, Stub::default()).await?;
    let start = tokio::time::Instant::now();
    let mut c = TcpClient::connect(h.tcp).await?;
    c.send(&auth_frame(&token("k", "", &[]))).await?;
    assert!(c.closed().await?.is_empty(), "no op 8");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "closed within the deadline"
    );

    // Logic's port refuses connections.
    drop(black_hole);
    let mut c = TcpClient::connect(h.tcp).await?;
    c.send(&auth_frame(&token("k", "", &[]))).await?;
    assert!(c.closed().await?.is_empty(), "no op 8");
    h.shutdown().await
}

#[tokio::test]
async fn slow_consumer_is_closed_and_others_still_receive() -> Result {
    const QUEUE: usize = 64 * 1024;
    const SEND_BUFFER: usize = 16 * 1024;
    let mut h = Harness::start(|c| {
        c.queue_bytes = QUEUE;
        c.send_buffer = Some(SEND_BUFFER);
    })
    .await?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut slow = TcpClient {
        stream: socket.connect(h.tcp).await?,
        buf: BytesMut::new(),
    };
    slow.auth(&token("slow", "", &[1000])).await?;
    let mut fast = h.ws_client(&token("fast", "", &[1000])).await?;
    let mut grpc = h.comet_client().await?;
    let mut admin = h.admin_client().await?;
    let big = Frame::push(1000, vec![7u8; 16 * 1024]).to_bytes();

    let mut pushes = 0;
    loop {
        grpc.push_msg(PushMsgReq {
            keys: vec!["slow".into()],
            proto: Some(ws::raw_proto(big.clone())),
            proto_op: 1000,
        })
        .await?;
        pushes += 1;
        let load = admin.load(LoadRequest {}).await?.into_inner();
        if load.connections == 1 {
            break;
        }
        assert!(pushes < 4000, "slow consumer never closed");
    }
    // What a non-reader can hold before it is closed: the queue, the kernel
    // send buffer (doubled by Linux), and its own small receive window.
    let held = pushes * big.len();
    println!("slow consumer closed after {pushes} pushes, {held} bytes");
    assert!(
        held <= QUEUE + 2 * SEND_BUFFER + 64 * 1024,
        "closed only after {held} bytes"
    );
    grpc.push_msg(PushMsgReq {
        keys: vec!["fast".into(), "slow".into()],
        proto: Some(raw_push(1000, b"still here")),
        proto_op: 1000,
    })
    .await?;
    let msg = fast.recv_msg().await?;
    assert_eq!(
        msg,
        ws::wrap(&Frame::push(1000, &b"still here"[..]).to_bytes())
    );
    h.stub
        .wait_for("slow Disconnect", |_| h.stub.disconnects("slow") == 1)
        .await?;
    // The slow client's socket ends after whatever was in flight.
    slow.closed().await?;
    h.shutdown().await
}

/// Room pushes that outrun comet's own writing (a hundred calls in flight at
/// once against a 1 KiB queue) fill the queue of a client that reads all the
/// time. That is comet falling behind, not a slow client: the pushes wait
/// for queue space and the client gets every one, in no particular order, and is
/// not closed. (Before, it was closed as a slow consumer.)
#[tokio::test]
async fn a_client_that_keeps_up_is_not_closed_when_comet_falls_behind() -> Result {
    const CALLS: usize = 100;
    let mut h = Harness::start(|c| c.queue_bytes = 1024).await?;
    let mut client = h.tcp_client(&token("busy", "live://busy", &[])).await?;
    let grpc = h.comet_client().await?;
    let calls = (0..CALLS).map(|i| {
        let mut grpc = grpc.clone();
        // ~300 bytes each: four fill the queue.
        let body = format!("{i:>300}");
        async move {
            grpc.broadcast_room(BroadcastRoomReq {
                room_id: "live://busy".into(),
                proto: Some(ws::raw_proto(
                    Frame::push(1000, body.into_bytes()).to_bytes(),
                )),
            })
            .await
        }
    });
    let (answers, frames) = tokio::join!(futures::future::join_all(calls), async {
        let mut frames = Vec::new();
        while frames.len() < CALLS {
            frames.push(client.recv().await?);
        }
        Result::<_>::Ok(frames)
    });
    for answer in answers {
        answer?;
    }
    let mut got: Vec<usize> = frames?
        .iter()
        .map(|f| String::from_utf8_lossy(&f.body).trim().parse())
        .collect::<std::result::Result<_, _>>()?;
    got.sort_unstable();
    assert_eq!(got, (0..CALLS).collect::<Vec<_>>(), "every push, once");
    assert!(
        h.metric("herald_comet_push_waits_total").await? > 0.0,
        "the queue never filled: this test did not make comet fall behind"
    );
    assert_eq!(
        h.metric("herald_comet_push_drops_total{reason=\"slow_consumer\"}")
            .await?,
        0.0
    );
    let mut admin = h.admin_client().await?;
    assert_eq!(
        admin.load(LoadRequest {}).await?.into_inner().connections,
        1
    );
    h.shutdown().await
}

#[tokio::test]
async fn heartbeat_prefers_the_cluster_count_and_refreshes_the_session() -> Result {
    let stub = Stub {
        online: HashMap::from([("live://1000".to_owned(), 42)]),
        ..Stub::default()
    };
    let mut h = Harness::start_with(stub, |c| {
        c.renew_online_interval = Duration::from_millis(100);
        c.session_refresh = Duration::from_millis(100);
    })
    .await?;
    let mut c = h.tcp_client(&token("hb", "live://1000", &[])).await?;
    h.stub
        .wait_for("RenewOnline with the local count", |events| {
            events.iter().any(
                |e| matches!(e, Event::Renew { counts } if counts.get("live://1000") == Some(&1)),
            )
        })
        .await?;
    // The reply is stored after logic records the call; poll a little.
    let count = timeout(WAIT, async {
        loop {
            c.send_raw(&hex(T3)).await?;
            let reply = c.recv().await?;
            let n = i32::from_be_bytes(reply.body[..4].try_into()?);
            if n == 42 {
                return anyhow::Ok(n);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await??;
    assert_eq!(count, 42);
    // The refresh rides on a client heartbeat once the interval has passed.
    let refreshed = |events: &[Event]| events.contains(&Event::Heartbeat { key: "hb".into() });
    timeout(WAIT, async {
        while !refreshed(&h.stub.events()) {
            c.send_raw(&hex(T3)).await?;
            c.recv().await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::Ok(())
    })
    .await
    .context("no session refresh")??;
    h.shutdown().await
}

#[tokio::test]
async fn load_and_drain_redirect_then_close_everything() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let redirect = serde_json::json!({
        "key": "r1", "room_id": "a", "herald": {"redirect": true}
    })
    .to_string();
    let mut w = h.ws_client(&redirect).await?;
    let mut t = h.tcp_client(&token("plain", "b", &[])).await?;
    let mut admin = h.admin_client().await?;

    let load = admin.load(LoadRequest {}).await?.into_inner();
    assert_eq!(load.server, "comet-test");
    assert_eq!((load.connections, load.client_ips, load.rooms), (2, 1, 2));
    assert!(!load.draining);
    assert_eq!(load.version, env!("CARGO_PKG_VERSION"));

    let drain = DrainRequest {
        deadline_ms: 2000,
        close_rate: 100,
        nodes: vec!["comet-b.example.com".into()],
        tcp_port: 3101,
        ws_port: 3102,
        wss_port: 3103,
        reconnect_within_ms: 1500,
    };
    let reply = admin.drain(drain.clone()).await?.into_inner();
    assert!(reply.started);
    assert_eq!(reply.connections, 2);

    let msgs = w.closed().await?;
    assert_eq!(msgs.len(), 1, "one op 18 before the close: {msgs:?}");
    let frame = Frame::from_message(msgs[0].clone(), Limits::OUTBOUND)?;
    assert_eq!(frame.op, op::REDIRECT, "op 18 unwrapped on WebSocket");
    let body: serde_json::Value = serde_json::from_slice(&frame.body)?;
    assert_eq!(
        body,
        serde_json::json!({"reason": "drain", "nodes": ["comet-b.example.com"],
            "tcp_port": 3101, "ws_port": 3102, "wss_port": 3103, "reconnect_within_ms": 1500})
    );
    assert!(
        t.closed().await?.is_empty(),
        "no redirect for a client that did not ask"
    );

    let load = admin.load(LoadRequest {}).await?.into_inner();
    assert!(load.draining);
    timeout(WAIT, async {
        while admin.load(LoadRequest {}).await?.into_inner().connections != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        anyhow::Ok(())
    })
    .await??;
    // New connections are refused while draining; a second drain changes nothing.
    let mut late = TcpClient::connect(h.tcp).await?;
    let _ = late.send(&auth_frame(&token("late", "", &[]))).await;
    assert!(late.closed().await?.is_empty());
    assert!(!admin.drain(drain).await?.into_inner().started);
    let (status, _) = h.http_get("/readyz").await?;
    assert!(
        status.contains("503"),
        "draining comet is not ready: {status}"
    );
    h.stub
        .wait_for("both Disconnects", |_| {
            h.stub.disconnects("r1") == 1 && h.stub.disconnects("plain") == 1
        })
        .await?;
    h.shutdown().await
}

#[tokio::test]
async fn shutdown_closes_connections_and_disconnects_them() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let mut t = h.tcp_client(&token("s1", "", &[])).await?;
    let mut w = h.ws_client(&token("s2", "", &[])).await?;
    h.shutdown().await?;
    t.closed().await?;
    w.closed().await?;
    assert_eq!((h.stub.disconnects("s1"), h.stub.disconnects("s2")), (1, 1));
    Ok(())
}

#[tokio::test]
async fn admin_http_serves_health_and_metrics() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let (status, body) = h.http_get("/healthz").await?;
    assert!(status.contains("200"), "{status}");
    assert_eq!(body, "ok");
    h.wait_readyz("200").await?;

    let mut c = h.tcp_client(&token("m", "r", &[1000])).await?;
    c.send_raw(&hex(T3)).await?;
    c.recv().await?;
    let mut refused = TcpClient::connect(h.tcp).await?;
    refused.send(&auth_frame(r#"{"fail":true}"#)).await?;
    refused.closed().await?;
    let mut grpc = h.comet_client().await?;
    grpc.broadcast_room(BroadcastRoomReq {
        room_id: "r".into(),
        proto: Some(raw_push(1000, b"x")),
    })
    .await?;
    c.recv().await?;

    let (status, body) = h.http_get("/metrics").await?;
    assert!(status.contains("200"), "{status}");
    for line in [
        r#"herald_comet_connections{transport="tcp"} 1"#,
        r#"herald_comet_auth_total{outcome="ok"} 1"#,
        r#"herald_comet_auth_total{outcome="refused"} 1"#,
        r#"herald_comet_frames_in_total{transport="tcp"} 1"#,
        r#"herald_comet_pushes_total{rpc="broadcast_room"} 1"#,
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "missing {line:?} in\n{body}"
        );
    }
    h.shutdown().await
}

#[tokio::test]
async fn wss_serves_the_same_protocol_over_tls() -> Result {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let dir = std::env::temp_dir().join(format!("herald-comet-wss-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem())?;
    std::fs::write(&key_path, cert.signing_key.serialize_pem())?;
    let mut h = Harness::start(|c| {
        c.tls_cert = Some(cert_path.clone());
        c.tls_key = Some(key_path.clone());
    })
    .await?;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = TcpStream::connect(h.wss.context("wss listener")?).await?;
    let stream = connector.connect("localhost".try_into()?, tcp).await?;
    let (mut ws, _) = tokio_tungstenite::client_async("wss://localhost/sub", stream).await?;

    ws.send(Message::Binary(hex(T1).into())).await?;
    let reply = timeout(WAIT, ws.next()).await?.context("ended")??;
    assert_eq!(reply.into_data().to_vec(), hex(T2), "T2 over WSS");
    let mut grpc = h.comet_client().await?;
    grpc.broadcast_room(BroadcastRoomReq {
        room_id: "live://1000".into(),
        proto: Some(ws::raw_proto(hex(T7).into())),
    })
    .await?;
    let mut expected = hex(T7_WS_HEADER);
    expected.extend(hex(T7));
    let push = timeout(WAIT, ws.next()).await?.context("ended")??;
    assert_eq!(push.into_data().to_vec(), expected, "T7 over WSS");
    // WSS is counted under its own transport label.
    assert_eq!(
        h.metric(r#"herald_comet_connections{transport="wss"}"#)
            .await?,
        1.0
    );
    assert_eq!(
        h.metric(r#"herald_comet_connections{transport="ws"}"#)
            .await?,
        0.0
    );
    h.shutdown().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test]
async fn connections_past_the_limit_are_refused() -> Result {
    let mut h = Harness::start(|c| c.max_connections = 1).await?;
    let mut first = h.tcp_client(&token("one", "", &[])).await?;
    let mut second = TcpClient::connect(h.tcp).await?;
    let _ = second.send(&auth_frame(&token("two", "", &[]))).await;
    assert!(second.closed().await?.is_empty(), "refused without op 8");
    // The held connection is unaffected, and its slot frees when it leaves.
    first.send_raw(&hex(T3)).await?;
    assert_eq!(first.recv().await?.op, op::HEARTBEAT_REPLY);
    drop(first);
    h.stub
        .wait_for("Disconnect", |_| h.stub.disconnects("one") == 1)
        .await?;
    timeout(WAIT, async {
        loop {
            let mut c = TcpClient::connect(h.tcp).await?;
            c.send(&auth_frame(&token("three", "", &[]))).await?;
            if c.recv().await.is_ok_and(|f| f.op == op::AUTH_REPLY) {
                return anyhow::Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await??;
    h.shutdown().await
}

#[tokio::test]
async fn drain_meets_its_deadline_even_at_a_slow_close_rate() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let mut clients = Vec::new();
    for i in 0..4 {
        clients.push(h.tcp_client(&token(&format!("d{i}"), "", &[])).await?);
    }
    let mut admin = h.admin_client().await?;
    let start = tokio::time::Instant::now();
    // One close per second would take 3 s; the 800 ms deadline wins.
    let reply = admin
        .drain(DrainRequest {
            deadline_ms: 800,
            close_rate: 1,
            ..DrainRequest::default()
        })
        .await?
        .into_inner();
    assert_eq!((reply.started, reply.connections), (true, 4));
    for c in &mut clients {
        assert!(
            c.closed().await?.is_empty(),
            "no op 18 without the herald opt-in"
        );
    }
    let took = start.elapsed();
    assert!(took < Duration::from_millis(1500), "drain took {took:?}");
    // ...yet the closes were spread out rather than all at once.
    assert!(took >= Duration::from_millis(400), "drain took {took:?}");
    h.shutdown().await
}

#[tokio::test]
async fn shutdown_drains_paced_with_redirects_then_returns() -> Result {
    let deadline = Duration::from_secs(5);
    let mut h = Harness::start(|c| {
        c.drain_deadline = deadline;
        c.drain_close_rate = 5;
    })
    .await?;
    h.wait_readyz("200").await?;
    let redirect = serde_json::json!({"key": "sr", "herald": {"redirect": true}}).to_string();
    let mut w = h.ws_client(&redirect).await?;
    let t1 = h.tcp_client(&token("st1", "", &[])).await?;
    let t2 = h.tcp_client(&token("st2", "", &[])).await?;

    // Each client records when it saw EOF (and what came before it).
    let ws_task = tokio::spawn(async move {
        let msgs = w.closed().await;
        (msgs, std::time::Instant::now())
    });
    let tcp_tasks = [t1, t2].map(|mut t| {
        tokio::spawn(async move {
            let frames = t.closed().await;
            (frames, std::time::Instant::now())
        })
    });

    let started = std::time::Instant::now();
    let _ = h.stop.take().context("stop")?.send(());
    // Draining: not ready, new connections refused.
    h.wait_readyz("503").await?;
    // (A refused TCP connect, should the drain already be over, is fine too.)
    if let Ok(mut late) = TcpClient::connect(h.tcp).await {
        let _ = late.send(&auth_frame(&token("late", "", &[]))).await;
        assert!(late.closed().await?.is_empty(), "refused while draining");
    }

    let comet = h.comet.take().context("comet")?;
    timeout(deadline + Duration::from_secs(2), comet)
        .await
        .context("run did not return")???;
    let took = started.elapsed();
    assert!(took < deadline, "run returned after the deadline: {took:?}");

    let (msgs, ws_closed) = ws_task.await?;
    let msgs = msgs?;
    assert_eq!(msgs.len(), 1, "one op 18 before EOF: {msgs:?}");
    let frame = Frame::from_message(msgs[0].clone(), Limits::OUTBOUND)?;
    assert_eq!(frame.op, op::REDIRECT);
    let body: serde_json::Value = serde_json::from_slice(&frame.body)?;
    assert_eq!(body["reason"], "drain");
    assert_eq!(body["nodes"], serde_json::json!([]), "no nodes configured");
    assert_eq!(body["ws_port"], i64::from(h.ws.port()));
    let mut closes = vec![ws_closed];
    for task in tcp_tasks {
        let (frames, closed) = task.await?;
        assert!(frames?.is_empty(), "no op 18 without the opt-in");
        closes.push(closed);
    }
    let first = closes.iter().min().context("closes")?;
    let last = closes.iter().max().context("closes")?;
    // 5/s spaces 3 closes 400 ms apart end to end; a loose lower bound.
    let span = last.duration_since(*first);
    assert!(
        span >= Duration::from_millis(250),
        "closes not paced: {span:?}"
    );
    for key in ["sr", "st1", "st2"] {
        assert_eq!(h.stub.disconnects(key), 1, "Disconnect of {key}");
    }
    let disconnects = h
        .stub
        .events()
        .iter()
        .filter(|e| matches!(e, Event::Disconnect { .. }))
        .count();
    assert_eq!(disconnects, 3);
    Ok(())
}

#[tokio::test]
async fn shutdown_waits_for_a_running_drain_within_the_deadline() -> Result {
    let deadline = Duration::from_millis(600);
    let mut h = Harness::start(|c| c.drain_deadline = deadline).await?;
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(h.tcp_client(&token(&format!("w{i}"), "", &[])).await?);
    }
    let mut admin = h.admin_client().await?;
    // An RPC drain far slower than the shutdown deadline.
    let reply = admin
        .drain(DrainRequest {
            deadline_ms: 60_000,
            close_rate: 1,
            ..DrainRequest::default()
        })
        .await?
        .into_inner();
    assert!(reply.started);
    let started = std::time::Instant::now();
    let _ = h.stop.take().context("stop")?.send(());
    let comet = h.comet.take().context("comet")?;
    timeout(WAIT, comet)
        .await
        .context("run did not return")???;
    let took = started.elapsed();
    // It waited for the running drain, but only until its own deadline.
    assert!(took >= Duration::from_millis(400), "did not wait: {took:?}");
    assert!(
        took < Duration::from_millis(3000),
        "waited too long: {took:?}"
    );
    for c in &mut clients {
        c.closed().await?;
    }
    for i in 0..3 {
        assert_eq!(h.stub.disconnects(&format!("w{i}")), 1);
    }
    Ok(())
}

#[tokio::test]
async fn readyz_waits_for_logic() -> Result {
    // A logic address nobody listens on.
    let closed = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let mut config = Config::new("comet-test", closed.to_string());
    config.renew_online_interval = Duration::from_secs(3600);
    let mut h = Harness::start_comet(config, Stub::default()).await?;
    for _ in 0..3 {
        let (status, body) = h.http_get("/readyz").await?;
        assert!(status.contains("503"), "{status}: {body}");
        let (status, _) = h.http_get("/healthz").await?;
        assert!(status.contains("200"), "{status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.shutdown().await?;

    let mut h = Harness::start(|_| {}).await?;
    h.wait_readyz("200").await?;
    h.shutdown().await
}

// ------------------------------------------------ limits, rates and metrics

impl Harness {
    /// The value of the metric line `series` (name with labels) on `/metrics`,
    /// 0 when absent.
    async fn metric(&self, series: &str) -> Result<f64> {
        let (_, body) = self.http_get("/metrics").await?;
        Ok(metric_value(&body, series))
    }

    /// Polls `series` until it equals `expected`; bounded by [`WAIT`].
    async fn wait_metric(&self, series: &str, expected: f64) -> Result {
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

fn metric_value(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}

/// Sends a raw HTTP request head to the WebSocket port and returns everything
/// the server answers until it closes.
async fn raw_upgrade(addr: SocketAddr, head: &[u8]) -> Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    // The server may answer and close before reading all of an oversized head.
    let _ = stream.write_all(head).await;
    let mut answer = Vec::new();
    let _ = timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .context("server never closed")?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

fn upgrade_head(extra: &str) -> String {
    format!(
        "GET /sub HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

#[tokio::test]
async fn websocket_upgrade_limits_answer_431_and_spare_healthy_clients() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let mut healthy = h.ws_client(&token("healthy", "room", &[])).await?;
    let mut grpc = h.comet_client().await?;
    let mut pushed = Vec::new();
    let mut push = async |body: &'static [u8]| -> Result {
        grpc.broadcast_room(BroadcastRoomReq {
            room_id: "room".into(),
            proto: Some(raw_push(1000, body)),
        })
        .await?;
        pushed.push(body);
        Ok(())
    };
    push(b"before").await?;

    // A head past 8 KiB: one 10 KiB header.
    let big = upgrade_head(&format!("X-Big: {}\r\n", "a".repeat(10 * 1024)));
    let answer = raw_upgrade(h.ws, big.as_bytes()).await?;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer:?}");
    push(b"after big head").await?;

    // 100 small headers (limit 64), a 2 KiB head in all.
    let many: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    let answer = raw_upgrade(h.ws, upgrade_head(&many).as_bytes()).await?;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer:?}");

    // Not HTTP at all, and HTTP without the upgrade headers.
    let answer = raw_upgrade(h.ws, b"\x00\x01garbage\r\n\r\n").await?;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");
    let answer = raw_upgrade(h.ws, b"GET /sub HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");
    push(b"after many headers").await?;

    // Just under both limits still upgrades: 60 headers of a real client.
    let mut req = format!("ws://{}/sub", h.ws).into_client_request()?;
    for i in 0..54 {
        req.headers_mut().insert(
            format!("x-pad-{i}").parse::<http::HeaderName>()?,
            "x".repeat(80).parse()?,
        );
    }
    assert!(req.headers().len() <= 60, "{}", req.headers().len());
    let (ws, _) = tokio_tungstenite::connect_async(req).await?;
    let mut padded = WsClient { ws };
    padded.auth(&token("padded", "room", &[])).await?;
    push(b"last").await?;

    for body in &pushed {
        let msg = healthy.recv_msg().await?;
        assert_eq!(
            msg,
            ws::push_for_ws(&raw_push(1000, body)),
            "healthy client lost {body:?}"
        );
    }
    let msg = padded.recv_msg().await?;
    assert_eq!(msg, ws::push_for_ws(&raw_push(1000, b"last")));
    for (reason, n) in [
        ("head_too_large", 1.0),
        ("too_many_headers", 1.0),
        ("malformed", 1.0),
        ("not_websocket", 1.0),
    ] {
        let series = format!(r#"herald_comet_ws_upgrade_refused_total{{reason="{reason}"}}"#);
        assert_eq!(h.metric(&series).await?, n, "{series}");
    }
    assert_eq!(
        h.metric(r#"herald_comet_connections{transport="ws"}"#)
            .await?,
        2.0
    );
    h.shutdown().await
}

/// A token with its own mid, so the stub's `Receive` calls tell clients apart.
fn token_mid(mid: i64, key: &str) -> String {
    serde_json::json!({"mid": mid, "key": key, "room_id": "", "accepts": []}).to_string()
}

impl Stub {
    fn receives(&self, of: i64) -> usize {
        self.events()
            .iter()
            .filter(|e| matches!(e, Event::Receive { mid, .. } if *mid == of))
            .count()
    }
}

/// `n` op-4 frames (T10) back to back, then one heartbeat (T3).
fn op4_burst_then_heartbeat(n: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    for _ in 0..n {
        bytes.extend(hex(T10_REQ));
    }
    bytes.extend(hex(T3));
    bytes
}

#[tokio::test]
async fn receive_is_rate_limited_per_connection() -> Result {
    let mut h = Harness::start(|c| {
        c.receive_rate = 5;
        c.receive_burst = 10;
        c.receive_flood_close = 0;
    })
    .await?;
    let mut flooder = h.tcp_client(&token_mid(31, "flooder")).await?;
    let mut quiet = h.tcp_client(&token_mid(32, "quiet")).await?;

    let started = std::time::Instant::now();
    flooder.send_raw(&op4_burst_then_heartbeat(50)).await?;
    // Frames are handled in order: the heartbeat reply comes after every
    // op 4 was either forwarded (and acknowledged) or dropped (no reply).
    let mut acknowledged = 0;
    loop {
        let frame = flooder.recv().await?;
        match frame.op {
            4 => acknowledged += 1,
            op::HEARTBEAT_REPLY => break,
            other => bail!("unexpected op {other}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ceiling = 10 + (5.0 * elapsed).ceil() as usize;
    assert!(
        (10..=ceiling).contains(&acknowledged),
        "{acknowledged} forwarded in {elapsed:.3}s, expected 10..={ceiling}"
    );
    h.stub
        .wait_for("the forwarded Receives", |_| {
            h.stub.receives(31) == acknowledged
        })
        .await?;

    // Another connection has its own bucket.
    quiet.send_raw(&op4_burst_then_heartbeat(8)).await?;
    for _ in 0..8 {
        assert_eq!(quiet.recv().await?.op, 4);
    }
    assert_eq!(quiet.recv().await?.op, op::HEARTBEAT_REPLY);
    h.stub
        .wait_for("8 Receives", |_| h.stub.receives(32) == 8)
        .await?;

    assert_eq!(
        h.metric(r#"herald_comet_receives_total{outcome="forwarded"}"#)
            .await?,
        (acknowledged + 8) as f64
    );
    assert_eq!(
        h.metric(r#"herald_comet_receives_total{outcome="rate_limited"}"#)
            .await?,
        (50 - acknowledged) as f64
    );
    // Dropping is not closing (flood close is off): the flooder still works.
    flooder.send_raw(&hex(T3)).await?;
    assert_eq!(flooder.recv().await?.op, op::HEARTBEAT_REPLY);
    h.shutdown().await
}

#[tokio::test]
async fn a_sustained_receive_flood_closes_the_connection() -> Result {
    let mut h = Harness::start(|c| {
        c.receive_rate = 5;
        c.receive_burst = 5;
        c.receive_flood_close = 20;
    })
    .await?;
    let mut healthy = h.tcp_client(&token_mid(41, "calm")).await?;
    let mut flooder = h.tcp_client(&token_mid(42, "flood")).await?;
    let _ = flooder.send_raw(&op4_burst_then_heartbeat(100)).await;
    let frames = flooder.closed().await?;
    assert!(
        frames.iter().all(|f| f.op == 4) && (5..=7).contains(&frames.len()),
        "only the burst is acknowledged before the close: {frames:?}"
    );
    h.stub
        .wait_for("Disconnect", |_| h.stub.disconnects("flood") == 1)
        .await?;
    assert_eq!(h.stub.receives(42), frames.len());
    assert_eq!(
        h.metric(r#"herald_comet_disconnects_total{reason="receive_flood"}"#)
            .await?,
        1.0
    );
    healthy.send_raw(&hex(T10_REQ)).await?;
    assert_eq!(healthy.recv().await?.op, 4);
    h.shutdown().await
}

#[tokio::test]
async fn push_to_write_latency_is_observed_for_pushes_only() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let mut tcp = h.tcp_client(&token("lat-tcp", "", &[1000])).await?;
    let mut web = h.ws_client(&token("lat-ws", "", &[1000])).await?;
    // Replies are not pushes: a heartbeat must not be observed.
    tcp.send_raw(&hex(T3)).await?;
    assert_eq!(tcp.recv().await?.op, op::HEARTBEAT_REPLY);
    let mut grpc = h.comet_client().await?;
    for _ in 0..3 {
        grpc.push_msg(PushMsgReq {
            keys: vec!["lat-tcp".into(), "lat-ws".into()],
            proto_op: 1000,
            proto: Some(raw_push(1000, b"hello")),
        })
        .await?;
        assert_eq!(tcp.recv().await?, Frame::push(1000, &b"hello"[..]));
        web.recv_msg().await?;
    }
    h.wait_metric("herald_comet_push_write_latency_seconds_count", 6.0)
        .await?;
    let (_, body) = h.http_get("/metrics").await?;
    let sum = metric_value(&body, "herald_comet_push_write_latency_seconds_sum");
    assert!(sum > 0.0 && sum < 6.0 * 5.0, "sum {sum}");
    assert_eq!(
        metric_value(
            &body,
            r#"herald_comet_push_write_latency_seconds_bucket{le="+Inf"}"#
        ),
        6.0
    );
    h.shutdown().await
}

/// T3 (heartbeat) with `pack_len` 10, shorter than its own header.
fn short_heartbeat() -> Vec<u8> {
    let mut frame = hex(T3);
    frame[..4].copy_from_slice(&10i32.to_be_bytes());
    frame
}

#[tokio::test]
async fn short_pack_len_is_lenient_by_default() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let mut c = h.tcp_client(&token("lenient", "", &[])).await?;
    c.send_raw(&short_heartbeat()).await?;
    assert_eq!(
        c.recv().await?.op,
        op::HEARTBEAT_REPLY,
        "goim reads it as no body"
    );
    let mut w = h.ws_client(&token("lenient-ws", "", &[])).await?;
    w.send_raw(short_heartbeat()).await?;
    let reply = Frame::from_message(w.recv_msg().await?, Limits::OUTBOUND)?;
    assert_eq!(reply.op, op::HEARTBEAT_REPLY);
    h.shutdown().await
}

#[tokio::test]
async fn strict_pack_len_closes_short_frames() -> Result {
    let mut h = Harness::start(|c| c.strict_pack_len = true).await?;
    let mut healthy = h.tcp_client(&token("fine", "", &[])).await?;
    let mut c = h.tcp_client(&token("strict", "", &[])).await?;
    c.send_raw(&short_heartbeat()).await?;
    assert!(c.closed().await?.is_empty(), "closed without a reply");
    let mut w = h.ws_client(&token("strict-ws", "", &[])).await?;
    w.send_raw(short_heartbeat()).await?;
    assert!(w.closed().await?.is_empty(), "closed without a reply");
    h.wait_metric(
        r#"herald_comet_disconnects_total{reason="short_pack_len"}"#,
        2.0,
    )
    .await?;
    healthy.send_raw(&hex(T3)).await?;
    assert_eq!(healthy.recv().await?.op, op::HEARTBEAT_REPLY);
    h.shutdown().await
}

// ------------------------------------------------------ a real browser client

/// What the page reported, in order: (what, JSON body).
type Reports = tokio::sync::mpsc::UnboundedReceiver<(String, String)>;

/// Serves the goim page, its `/config` and the `/report/{what}` endpoint on a
/// loopback port.
async fn serve_page(config: serde_json::Value) -> Result<(SocketAddr, Reports)> {
    use axum::extract::{Path, State};
    use axum::routing::{get, post};

    type Tx = tokio::sync::mpsc::UnboundedSender<(String, String)>;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let page = || async { axum::response::Html(include_str!("fixtures/goim-page.html")) };
    let app = axum::Router::new()
        .route("/page.html", get(page))
        .route("/config", get(move || async move { axum::Json(config) }))
        .route(
            "/report/{what}",
            post(
                |State(tx): State<Tx>, Path(what): Path<String>, body: String| async move {
                    let _ = tx.send((what, body));
                },
            ),
        )
        .with_state(tx);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((addr, rx))
}

/// Headless Chromium on one URL; stopped by its pid when dropped.
struct Browser {
    child: std::process::Child,
    profile: std::path::PathBuf,
}

impl Browser {
    fn open(url: &str) -> Result<Browser> {
        let binary = herald_e2e::testbed_var("HERALD_CHROMIUM");
        let profile = std::env::temp_dir().join(format!(
            "herald-chromium-{}-{}",
            std::process::id(),
            NEXT_PROFILE.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&profile)?;
        let log = std::fs::File::create(profile.join("chromium.log"))?;
        let child = std::process::Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                "--disable-extensions",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--mute-audio",
                // Every name fails to resolve: nothing leaves loopback.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting chromium")?;
        Ok(Browser { child, profile })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.profile.join("chromium.log")).unwrap_or_default()
    }
}

static NEXT_PROFILE: AtomicU64 = AtomicU64::new(0);

impl Drop for Browser {
    fn drop(&mut self) {
        // TERM lets chromium end its renderer and helper processes; KILL if
        // it has not exited in 5 s.
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// The next report from the page, failing on `/report/error`.
async fn next_report(reports: &mut Reports, browser: &Browser) -> Result<(String, String)> {
    // Chromium starts slowly on a loaded machine.
    let report = timeout(Duration::from_secs(60), reports.recv())
        .await
        .with_context(|| {
            format!(
                "the page reported nothing; chromium's log:\n{}",
                browser.log()
            )
        })?
        .context("report channel closed")?;
    if report.0 == "error" {
        bail!("the page failed: {}", report.1);
    }
    Ok(report)
}

#[tokio::test]
async fn a_browser_page_authenticates_and_receives_key_and_room_pushes() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let (page, mut reports) = serve_page(serde_json::json!({
        "ws": format!("ws://{}/sub", h.ws),
        "token": token("browser", "live://browser", &[1000]),
    }))
    .await?;
    let browser = Browser::open(&format!("http://{page}/page.html"))?;

    let (what, _) = next_report(&mut reports, &browser).await?;
    assert_eq!(what, "authed");
    let mut grpc = h.comet_client().await?;
    grpc.push_msg(PushMsgReq {
        keys: vec!["browser".into()],
        proto_op: 1000,
        proto: Some(raw_push(1000, b"to the key")),
    })
    .await?;
    grpc.broadcast_room(BroadcastRoomReq {
        room_id: "live://browser".into(),
        proto: Some(raw_push(1000, b"to the room")),
    })
    .await?;
    let (what, body) = next_report(&mut reports, &browser).await?;
    assert_eq!(what, "result");
    let body: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(
        body["pushes"],
        serde_json::json!(["to the key", "to the room"]),
        "{body}"
    );
    // The page closed its WebSocket: the comet saw a browser session end.
    h.stub
        .wait_for("Disconnect", |_| h.stub.disconnects("browser") == 1)
        .await?;
    drop(browser);
    h.shutdown().await
}

#[tokio::test]
async fn bytes_sent_right_after_the_upgrade_head_are_not_lost() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    // The upgrade request and a masked binary WebSocket message carrying T1,
    // in one write: the frame arrives in the same read as the head.
    let mut bytes = upgrade_head("").into_bytes();
    let payload = hex(T1);
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    bytes.push(0x82);
    bytes.push(0x80 | u8::try_from(payload.len())?);
    bytes.extend(mask);
    bytes.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    let mut c = TcpClient::connect(h.ws).await?;
    c.send_raw(&bytes).await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.extend(c.read_bytes(1).await?);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    // An unmasked binary message from the server: T2, the auth reply.
    assert_eq!(c.read_bytes(2).await?, [0x82, 16]);
    assert_eq!(c.read_bytes(16).await?, hex(T2));
    h.shutdown().await
}

/// Thousands of clients closing at once: comet queues their `Disconnect`s
/// (at most `logic_max_in_flight` in flight) and every one reaches logic.
/// Unbounded, a mass close sent every `Disconnect` at once and those logic
/// could not answer within the deadline were lost (216 of 2,000 arrived
/// here), leaving their routes in Redis until the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mass_close_disconnects_every_connection() -> Result {
    const N: usize = 2_000;
    // Logic serves 1,000 Disconnects a second: the burst takes it 2 s, four
    // times the calls' deadline, so only calls queued in comet (not sent)
    // can wait that long.
    let stub = Stub {
        disconnect_cost: Some(Duration::from_millis(1)),
        ..Stub::default()
    };
    let h = Harness::start_with(stub, |config| {
        config.logic_max_in_flight = 64;
        config.logic_timeout = Duration::from_millis(500);
    })
    .await?;
    let mut clients = Vec::with_capacity(N);
    let tokens: Vec<String> = (0..N)
        .map(|i| token(&format!("mass{i}"), "", &[]))
        .collect();
    for chunk in tokens.chunks(250) {
        let opened =
            futures::future::try_join_all(chunk.iter().map(|token| h.tcp_client(token))).await?;
        clients.extend(opened);
    }
    drop(clients);
    let disconnects = |events: &[Event]| {
        events
            .iter()
            .filter(|e| matches!(e, Event::Disconnect { key, .. } if key.starts_with("mass")))
            .count()
    };
    let start = std::time::Instant::now();
    timeout(Duration::from_secs(30), async {
        while disconnects(&h.stub.events()) < N {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .with_context(|| {
        format!(
            "logic saw {} of {N} Disconnects",
            disconnects(&h.stub.events())
        )
    })?;
    eprintln!("{N} Disconnects in {:?}", start.elapsed());
    assert_eq!(
        h.metric(r#"herald_comet_logic_call_failures_total{rpc="disconnect"}"#)
            .await?,
        0.0
    );
    Ok(())
}
