//! The whole distributed push path with separate processes: the real `herald`
//! binary runs as `logic`, `job` and `comet`, against the test bed's Redis and
//! Kafka. Clients connect to comet over raw TCP and WebSocket, a push goes in
//! at logic's HTTP API, through Redis routing and a Kafka topic, out of job
//! over gRPC to comet, and arrives at the clients.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use herald_e2e::{testbed_var, unique_name};
use herald_protocol::frame::{Frame, Limits};
use herald_protocol::{op, ws};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Every wait in these tests is bounded by this.
const WAIT: Duration = Duration::from_secs(30);
/// The push operation the clients accept.
const PUSH_OP: i32 = 1000;
/// Room pushes sent back to back in the ordering test.
const ORDERED: usize = 200;

// ---------------------------------------------------------------- processes

/// The `herald` binary cargo built for this test, with the same features.
fn herald_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_herald"))
}

fn addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// One child process, killed and reaped when dropped.
#[derive(Debug)]
struct Proc {
    name: &'static str,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, dir: &Path, args: &[String]) -> anyhow::Result<Proc> {
        let stdout = dir.join(format!("{name}.out"));
        let stderr = dir.join(format!("{name}.err"));
        let mut command = Command::new(herald_bin());
        command
            .arg(name)
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout)?)
            .stderr(File::create(&stderr)?)
            .env("RUST_LOG", "warn");
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("HERALD_") {
                command.env_remove(key);
            }
        }
        let child = command
            .spawn()
            .with_context(|| format!("spawn herald {name}"))?;
        Ok(Proc {
            name,
            child,
            stdout,
            stderr,
        })
    }

    /// Fails when the process has already exited.
    fn check_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            Some(status) => bail!("herald {} exited early: {status}", self.name),
            None => Ok(()),
        }
    }

    fn print_logs(&self) {
        for path in [&self.stdout, &self.stderr] {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            eprintln!("----- {} -----\n{text}", path.display());
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Ends this child only, by its pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Logic, comet and job running against one fresh Kafka topic.
#[derive(Debug)]
struct Cluster {
    procs: Vec<Proc>,
    topic: String,
    logic_http: u16,
    comet_tcp: u16,
    comet_ws: u16,
}

impl Cluster {
    async fn start(label: &str) -> anyhow::Result<Cluster> {
        let redis = testbed_var("HERALD_REDIS_URL");
        let brokers = testbed_var("HERALD_KAFKA_BROKERS");
        let topic = unique_name(&format!("fullpath-{label}"));
        let group = unique_name(&format!("fullpath-{label}-job"));
        let server_id = unique_name(&format!("comet-{label}"));
        create_topic(&brokers, &topic).await?;

        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("full_path")
            .join(&topic);
        std::fs::create_dir_all(&dir)?;

        let logic_http = herald_e2e::free_port();
        let logic_grpc = herald_e2e::free_port();
        let comet_tcp = herald_e2e::free_port();
        let comet_ws = herald_e2e::free_port();
        let comet_grpc = herald_e2e::free_port();
        let comet_http = herald_e2e::free_port();
        let job_http = herald_e2e::free_port();

        let nodes = dir.join("nodes.json");
        let list = serde_json::json!({
            "generation": 1,
            "updated": "2026-11-27T10:00:00Z",
            "nodes": [{
                "name": server_id,
                "grpc": addr(comet_grpc),
                "hosts": ["127.0.0.1"],
                "addrs": ["127.0.0.1"],
                "tcp_port": comet_tcp,
                "ws_port": comet_ws,
                "wss_port": 0,
                "weight": 10,
                "connections": 0,
                "client_ips": 0,
                "draining": false
            }]
        });
        std::fs::write(&nodes, serde_json::to_vec_pretty(&list)?)?;
        let nodes = nodes.display().to_string();

        let mut cluster = Cluster {
            procs: Vec::new(),
            topic,
            logic_http,
            comet_tcp,
            comet_ws,
        };
        let result = cluster
            .spawn_all(
                &dir,
                &redis,
                &brokers,
                &group,
                &server_id,
                &nodes,
                [logic_grpc, comet_grpc, comet_http, job_http],
            )
            .await;
        if let Err(err) = result {
            cluster.print_logs();
            return Err(err);
        }
        Ok(cluster)
    }

    #[allow(clippy::too_many_arguments)]
    async fn spawn_all(
        &mut self,
        dir: &Path,
        redis: &str,
        brokers: &str,
        group: &str,
        server_id: &str,
        nodes: &str,
        [logic_grpc, comet_grpc, comet_http, job_http]: [u16; 4],
    ) -> anyhow::Result<()> {
        let topic = self.topic.clone();
        let args = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();

        self.procs.push(Proc::spawn(
            "logic",
            dir,
            &args(&[
                "--http-addr",
                &addr(self.logic_http),
                "--grpc-addr",
                &addr(logic_grpc),
                "--redis-url",
                redis,
                "--kafka-brokers",
                brokers,
                "--kafka-topic",
                &topic,
                "--node-list",
                nodes,
            ]),
        )?);
        self.wait_accepts(self.logic_http).await?;
        self.wait_accepts(logic_grpc).await?;

        self.procs.push(Proc::spawn(
            "comet",
            dir,
            &args(&[
                "--server-id",
                server_id,
                "--logic-addr",
                &addr(logic_grpc),
                "--tcp-addr",
                &addr(self.comet_tcp),
                "--ws-addr",
                &addr(self.comet_ws),
                "--grpc-addr",
                &addr(comet_grpc),
                "--http-addr",
                &addr(comet_http),
            ]),
        )?);
        for port in [self.comet_tcp, self.comet_ws, comet_grpc, comet_http] {
            self.wait_accepts(port).await?;
        }

        self.procs.push(Proc::spawn(
            "job",
            dir,
            &args(&[
                "--kafka-brokers",
                brokers,
                "--kafka-topic",
                &topic,
                "--kafka-group",
                group,
                "--node-list",
                nodes,
                "--http-addr",
                &addr(job_http),
            ]),
        )?);
        self.wait_accepts(job_http).await?;
        self.check_running()
    }

    fn check_running(&mut self) -> anyhow::Result<()> {
        for proc in &mut self.procs {
            proc.check_running()?;
        }
        Ok(())
    }

    /// Polls until `port` accepts a connection, failing early if a child exits.
    async fn wait_accepts(&mut self, port: u16) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        let target: SocketAddr = addr(port).parse()?;
        loop {
            self.check_running()?;
            if TcpStream::connect(target).await.is_ok() {
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "nothing accepts on {target}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn print_logs(&self) {
        for proc in &self.procs {
            proc.print_logs();
        }
    }

    /// Runs a scenario; on failure prints every child's output.
    async fn run<F, Fut>(mut self, scenario: F) -> anyhow::Result<()>
    where
        F: FnOnce(u16, u16, u16) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let result = scenario(self.logic_http, self.comet_tcp, self.comet_ws).await;
        let result = result.and_then(|()| self.check_running());
        if result.is_err() {
            self.print_logs();
        }
        let topic = self.topic.clone();
        // Stop the processes before the topic goes away.
        self.procs.clear();
        if let Ok(admin) = admin(&testbed_var("HERALD_KAFKA_BROKERS")) {
            let _ = admin.delete_topics(&[&topic], &AdminOptions::new()).await;
        }
        result
    }
}

fn admin(brokers: &str) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?)
}

async fn create_topic(brokers: &str, topic: &str) -> anyhow::Result<()> {
    let results = admin(brokers)?
        .create_topics(
            &[NewTopic::new(topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    for result in results {
        result.map_err(|(name, code)| anyhow!("create topic {name}: {code}"))?;
    }
    Ok(())
}

// ---------------------------------------------------------------- clients

fn token(mid: i64, key: &str) -> Bytes {
    let token = serde_json::json!({
        "mid": mid,
        "key": key,
        "room_id": "live://1000",
        "platform": "web",
        "accepts": [PUSH_OP],
    });
    Bytes::from(token.to_string())
}

fn auth_frame(mid: i64, key: &str) -> Frame {
    Frame {
        ver: 1,
        op: op::AUTH,
        seq: 1,
        body: token(mid, key),
    }
}

/// A raw TCP goim client.
#[derive(Debug)]
struct TcpClient {
    stream: TcpStream,
    buf: BytesMut,
}

impl TcpClient {
    async fn connect(port: u16, mid: i64, key: &str) -> anyhow::Result<TcpClient> {
        let stream = TcpStream::connect(addr(port)).await?;
        let mut client = TcpClient {
            stream,
            buf: BytesMut::new(),
        };
        client
            .stream
            .write_all(&auth_frame(mid, key).to_bytes())
            .await?;
        let reply = client.next_frame().await?;
        ensure!(reply.op == op::AUTH_REPLY, "tcp auth answered {reply:?}");
        Ok(client)
    }

    /// Reads until at least `n` bytes are buffered.
    async fn fill(&mut self, n: usize) -> anyhow::Result<()> {
        while self.buf.len() < n {
            let read = tokio::time::timeout(WAIT, self.stream.read_buf(&mut self.buf))
                .await
                .context("tcp client waited too long")??;
            ensure!(read > 0, "comet closed the tcp connection");
        }
        Ok(())
    }

    /// The next `n` raw bytes from the stream.
    async fn next_bytes(&mut self, n: usize) -> anyhow::Result<Bytes> {
        self.fill(n).await?;
        Ok(self.buf.split_to(n).freeze())
    }

    async fn next_frame(&mut self) -> anyhow::Result<Frame> {
        loop {
            if let Some(frame) = Frame::decode(&mut self.buf, Limits::OUTBOUND)? {
                return Ok(frame);
            }
            let need = self.buf.len() + 1;
            self.fill(need).await?;
        }
    }

    /// The body of the next push of [`PUSH_OP`], skipping anything else.
    async fn next_push(&mut self) -> anyhow::Result<Bytes> {
        loop {
            let frame = self.next_frame().await?;
            if frame.op == PUSH_OP {
                return Ok(frame.body);
            }
        }
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket goim client.
#[derive(Debug)]
struct WsClient {
    ws: Ws,
    /// Frames unwrapped from an op-9 message and not yet taken.
    pending: std::collections::VecDeque<Frame>,
}

impl WsClient {
    async fn connect(port: u16, mid: i64, key: &str) -> anyhow::Result<WsClient> {
        let url = format!("ws://127.0.0.1:{port}/sub");
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .context("websocket upgrade took too long")??;
        let mut client = WsClient {
            ws,
            pending: Default::default(),
        };
        client
            .ws
            .send(Message::Binary(auth_frame(mid, key).to_bytes()))
            .await?;
        let reply = client.next_message().await?;
        ensure!(reply.op == op::AUTH_REPLY, "ws auth answered {reply:?}");
        Ok(client)
    }

    /// The next whole frame a binary message carries, unwrapped or not.
    async fn next_message(&mut self) -> anyhow::Result<Frame> {
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .context("ws client waited too long")?
                .ok_or_else(|| anyhow!("comet closed the websocket"))??;
            match message {
                Message::Binary(data) => return Ok(Frame::from_message(data, Limits::OUTBOUND)?),
                Message::Close(close) => bail!("comet closed the websocket: {close:?}"),
                _ => {}
            }
        }
    }

    /// The body of the next push of [`PUSH_OP`]; pushes must arrive in op 9.
    async fn next_push(&mut self) -> anyhow::Result<Bytes> {
        loop {
            if let Some(frame) = self.pending.pop_front() {
                if frame.op == PUSH_OP {
                    return Ok(frame.body);
                }
                continue;
            }
            let message = self.next_message().await?;
            ensure!(
                message.op == op::RAW,
                "a push reached the websocket outside op 9: {message:?}"
            );
            ensure!(
                message.ver == 1 && message.seq == 0,
                "op 9 header: {message:?}"
            );
            for frame in ws::frames(message.body, Limits::OUTBOUND) {
                self.pending.push_back(frame?);
            }
        }
    }
}

// ---------------------------------------------------------------- logic HTTP

/// POSTs `body` to logic's HTTP API and checks the answer is 200 with code 0.
async fn push(http: u16, path_and_query: &str, body: &[u8]) -> anyhow::Result<()> {
    let mut stream = tokio::time::timeout(WAIT, TcpStream::connect(addr(http)))
        .await
        .context("connect to logic http")??;
    let head = format!(
        "POST {path_and_query} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .context("logic http answer took too long")??;
    let response = String::from_utf8_lossy(&response);
    ensure!(
        response.starts_with("HTTP/1.1 200"),
        "POST {path_and_query}: {response}"
    );
    ensure!(
        response.contains("\"code\":0"),
        "POST {path_and_query}: {response}"
    );
    Ok(())
}

// ---------------------------------------------------------------- tests

/// Keys, mids, room and broadcast pushes each reach the right clients, on
/// TCP byte for byte as goim sends them and on WebSocket wrapped in op 9.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_push_kind_crosses_logic_kafka_job_and_comet() -> anyhow::Result<()> {
    let cluster = Cluster::start("kinds").await?;
    cluster
        .run(|http, tcp_port, ws_port| async move {
            let mut tcp = TcpClient::connect(tcp_port, 1, "k-tcp").await?;
            let mut ws = WsClient::connect(ws_port, 2, "k-ws").await?;

            // Keys: exactly the T5 bytes on the TCP stream.
            push(http, "/goim/push/keys?operation=1000&keys=k-tcp", b"hello").await?;
            let t5: &[u8] = &[
                0x00, 0x00, 0x00, 0x15, 0x00, 0x10, 0x00, 0x01, 0x00, 0x00, 0x03, 0xe8, 0x00, 0x00,
                0x00, 0x00, 0x68, 0x65, 0x6c, 0x6c, 0x6f,
            ];
            let got = tcp.next_bytes(t5.len()).await?;
            ensure!(&got[..] == t5, "keys push on tcp: {:02x?}", &got[..]);

            // Mids: one op-9 message carrying the push frame (T6 shape).
            push(http, "/goim/push/mids?operation=1000&mids=2", b"to-mid").await?;
            let message = ws.next_message().await?;
            ensure!(
                message.op == op::RAW && message.ver == 1 && message.seq == 0,
                "mids push on ws: {message:?}"
            );
            let inner: Vec<Frame> =
                ws::frames(message.body, Limits::OUTBOUND).collect::<Result<_, _>>()?;
            ensure!(
                inner == [Frame::push(PUSH_OP, &b"to-mid"[..])],
                "mids push inside op 9: {inner:?}"
            );

            // Room: both clients.
            push(
                http,
                "/goim/push/room?operation=1000&type=live&room=1000",
                b"to-room",
            )
            .await?;
            ensure!(tcp.next_push().await? == "to-room", "room push on tcp");
            ensure!(ws.next_push().await? == "to-room", "room push on ws");

            // Broadcast: both clients.
            push(http, "/goim/push/all?operation=1000", b"to-all").await?;
            ensure!(tcp.next_push().await? == "to-all", "broadcast on tcp");
            ensure!(ws.next_push().await? == "to-all", "broadcast on ws");
            Ok(())
        })
        .await
}

/// 200 room pushes sent back to back reach both clients complete and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_pushes_keep_their_order_end_to_end() -> anyhow::Result<()> {
    let cluster = Cluster::start("order").await?;
    cluster
        .run(|http, tcp_port, ws_port| async move {
            let mut tcp = TcpClient::connect(tcp_port, 11, "k-tcp-order").await?;
            let mut ws = WsClient::connect(ws_port, 12, "k-ws-order").await?;

            let expected: Vec<String> = (0..ORDERED).map(|n| format!("{{\"seq\":{n}}}")).collect();
            let receive_tcp = tokio::spawn(async move {
                let mut got = Vec::with_capacity(ORDERED);
                while got.len() < ORDERED {
                    let body = tcp.next_push().await.with_context(|| {
                        format!("tcp client had {} of {ORDERED} pushes", got.len())
                    })?;
                    got.push(String::from_utf8(body.to_vec())?);
                }
                anyhow::Ok(got)
            });
            let receive_ws = tokio::spawn(async move {
                let mut got = Vec::with_capacity(ORDERED);
                while got.len() < ORDERED {
                    let body = ws.next_push().await.with_context(|| {
                        format!("ws client had {} of {ORDERED} pushes", got.len())
                    })?;
                    got.push(String::from_utf8(body.to_vec())?);
                }
                anyhow::Ok(got)
            });

            for body in &expected {
                push(
                    http,
                    "/goim/push/room?operation=1000&type=live&room=1000",
                    body.as_bytes(),
                )
                .await?;
            }

            let tcp_got = receive_tcp.await??;
            let ws_got = receive_ws.await??;
            ensure!(tcp_got == expected, "tcp order: {tcp_got:?}");
            ensure!(ws_got == expected, "ws order: {ws_got:?}");
            Ok(())
        })
        .await
}
