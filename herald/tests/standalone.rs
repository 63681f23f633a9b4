//! `herald standalone` as a user runs it: the built binary on 127.0.0.1
//! ports, a raw TCP client and a WebSocket client with goim tokens, and
//! pushes through the HTTP API. No Redis or Kafka involved.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use herald_protocol::{Frame, Limits, op};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Result<T = (), E = anyhow::Error> = std::result::Result<T, E>;

const WAIT: Duration = Duration::from_secs(10);

fn hex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
        .collect()
}

const T5: &str = "00 00 00 15 00 10 00 01 00 00 03 e8 00 00 00 00 68 65 6c 6c 6f";
const T6: &str = "00 00 00 25 00 10 00 01 00 00 00 09 00 00 00 00
00 00 00 15 00 10 00 01 00 00 03 e8 00 00 00 00 68 65 6c 6c 6f";

/// The running binary; killed by pid when dropped, also on failure.
struct Standalone {
    child: Child,
    tcp: SocketAddr,
    ws: SocketAddr,
    http: SocketAddr,
}

impl Drop for Standalone {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Free loopback ports (see [`herald_e2e::free_port`]).
fn free_addrs(n: usize) -> Vec<SocketAddr> {
    (0..n)
        .map(|_| SocketAddr::from(([127, 0, 0, 1], herald_e2e::free_port())))
        .collect()
}

impl Standalone {
    async fn start(extra: &[String]) -> Result<Standalone> {
        let addrs = free_addrs(5);
        let (tcp, ws, grpc, http, logic_grpc) = (addrs[0], addrs[1], addrs[2], addrs[3], addrs[4]);
        let child = Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("standalone")
            .args(["--tcp-addr", &tcp.to_string()])
            .args(["--ws-addr", &ws.to_string()])
            .args(["--grpc-addr", &grpc.to_string()])
            .args(["--http-addr", &http.to_string()])
            .args(["--logic-grpc-addr", &logic_grpc.to_string()])
            .args(extra)
            // The test bed's variables must not switch backends on.
            .env_remove("HERALD_REDIS_URL")
            .env_remove("HERALD_KAFKA_BROKERS")
            .env("RUST_LOG", "warn")
            // Killed without a chance to clean up: keep its node-list file
            // out of the system temp dir.
            .env("TMPDIR", env!("CARGO_TARGET_TMPDIR"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting herald standalone")?;
        let mut standalone = Standalone {
            child,
            tcp,
            ws,
            http,
        };
        timeout(WAIT, async {
            for addr in [tcp, ws, http] {
                while TcpStream::connect(addr).await.is_err() {
                    if let Some(status) = standalone.child.try_wait()? {
                        bail!("herald standalone exited early: {status}");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            anyhow::Ok(())
        })
        .await
        .context("herald standalone did not start listening")??;
        Ok(standalone)
    }

    /// `POST path` with `body`; returns the response body.
    async fn post(&self, path: &str, body: &[u8]) -> Result<String> {
        let mut stream = TcpStream::connect(self.http).await?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        let mut resp = Vec::new();
        timeout(WAIT, stream.read_to_end(&mut resp)).await??;
        let resp = String::from_utf8(resp)?;
        let (head, body) = resp.split_once("\r\n\r\n").context("no body")?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("{path}: {head}\n{body}");
        }
        Ok(body.to_owned())
    }
}

fn auth_frame(token: &serde_json::Value) -> Frame {
    Frame {
        ver: 1,
        op: op::AUTH,
        seq: 1,
        body: Bytes::from(token.to_string()),
    }
}

struct TcpClient {
    stream: TcpStream,
    buf: BytesMut,
}

impl TcpClient {
    async fn connect(addr: SocketAddr, token: &serde_json::Value) -> Result<TcpClient> {
        let mut client = TcpClient {
            stream: TcpStream::connect(addr).await?,
            buf: BytesMut::new(),
        };
        client
            .stream
            .write_all(&auth_frame(token).to_bytes())
            .await?;
        let reply = client.recv().await?;
        if reply.op != op::AUTH_REPLY {
            bail!("expected op 8, got {reply:?}");
        }
        Ok(client)
    }

    async fn fill(&mut self) -> Result {
        let read = timeout(WAIT, self.stream.read_buf(&mut self.buf))
            .await
            .context("timed out waiting for bytes")??;
        if read == 0 {
            bail!("connection closed");
        }
        Ok(())
    }

    async fn read_bytes(&mut self, n: usize) -> Result<Vec<u8>> {
        while self.buf.len() < n {
            self.fill().await?;
        }
        Ok(self.buf.split_to(n).to_vec())
    }

    async fn recv(&mut self) -> Result<Frame> {
        loop {
            if let Some(frame) = Frame::decode(&mut self.buf, Limits::OUTBOUND)? {
                return Ok(frame);
            }
            self.fill().await?;
        }
    }
}

struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WsClient {
    async fn connect(addr: SocketAddr, token: &serde_json::Value) -> Result<WsClient> {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/sub")).await?;
        let mut client = WsClient { ws };
        let auth = auth_frame(token).to_bytes();
        client.ws.send(Message::Binary(auth)).await?;
        let reply = Frame::from_message(client.recv().await?, Limits::OUTBOUND)?;
        if reply.op != op::AUTH_REPLY {
            bail!("expected op 8, got {reply:?}");
        }
        Ok(client)
    }

    async fn recv(&mut self) -> Result<Bytes> {
        loop {
            let msg = timeout(WAIT, self.ws.next())
                .await
                .context("timed out waiting for a message")?
                .context("stream ended")??;
            match msg {
                Message::Binary(b) => return Ok(b),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => bail!("unexpected message {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn standalone_pushes_to_tcp_and_websocket_clients() -> Result {
    let herald = Standalone::start(&[]).await?;
    pushes_reach_both_clients(&herald, "tcp-key", "ws-key").await
}

#[tokio::test]
async fn standalone_on_the_real_redis_and_kafka() -> Result {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!(
                "{name} is not set: start the test bed \
                 (bash e2e/services/up.sh redis kafka; source $HERALD_RUN/env)"
            )
        })
    };
    let (redis, brokers) = (var("HERALD_REDIS_URL"), var("HERALD_KAFKA_BROKERS"));
    let id = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );
    let topic = format!("standalone-{id}");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    for result in admin
        .create_topics(
            &[NewTopic::new(&topic, 2, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?
    {
        result.map_err(|(name, code)| anyhow::anyhow!("create topic {name}: {code}"))?;
    }
    let herald = Standalone::start(&[
        "--redis".to_owned(),
        redis,
        "--kafka".to_owned(),
        brokers,
        "--kafka-topic".to_owned(),
        topic,
        "--kafka-group".to_owned(),
        format!("standalone-group-{id}"),
        "--server-id".to_owned(),
        format!("standalone-{id}"),
    ])
    .await?;
    pushes_reach_both_clients(&herald, &format!("tcp-{id}"), &format!("ws-{id}")).await
}

async fn pushes_reach_both_clients(herald: &Standalone, tcp_key: &str, ws_key: &str) -> Result {
    let room = "live://1000";
    let mut tcp = TcpClient::connect(
        herald.tcp,
        &serde_json::json!({"mid": 1, "key": tcp_key, "room_id": room, "platform": "android", "accepts": [1000]}),
    )
    .await?;
    let mut ws = WsClient::connect(
        herald.ws,
        &serde_json::json!({"mid": 2, "key": ws_key, "room_id": room, "platform": "web", "accepts": [1000]}),
    )
    .await?;

    let reply = herald
        .post(
            &format!("/goim/push/keys?operation=1000&keys={tcp_key}&keys={ws_key}"),
            b"hello",
        )
        .await?;
    assert!(reply.contains("\"code\":0"), "{reply}");
    assert_eq!(
        tcp.read_bytes(21).await?,
        hex(T5),
        "TCP gets the bare frame"
    );
    assert_eq!(ws.recv().await?.to_vec(), hex(T6), "WS gets it in op 9");

    let reply = herald
        .post(
            "/goim/push/room?operation=1000&type=live&room=1000",
            b"to the room",
        )
        .await?;
    assert!(reply.contains("\"code\":0"), "{reply}");
    let frame = tcp.recv().await?;
    assert_eq!((frame.op, &frame.body[..]), (1000, &b"to the room"[..]));
    let message = ws.recv().await?;
    let outer = Frame::from_message(message, Limits::OUTBOUND)?;
    assert_eq!(outer.op, op::RAW);
    let inner = Frame::from_message(outer.body, Limits::OUTBOUND)?;
    assert_eq!((inner.op, &inner.body[..]), (1000, &b"to the room"[..]));
    Ok(())
}
