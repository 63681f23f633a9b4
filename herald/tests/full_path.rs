//! The whole distributed push path with separate processes: the real `herald`
//! binary runs as `logic`, `job` and `comet`, against the test bed's Redis and
//! Kafka. Clients connect to comet over raw TCP and WebSocket, a push goes in
//! at logic's HTTP API, through Redis routing and a Kafka topic, out of job
//! over gRPC to comet, and arrives at the clients.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, ensure};
use herald_client::{Client, Frame, Limits, Token, Transport, op};
use herald_e2e::{testbed_var, unique_name};
use herald_protocol::ws;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

mod common;

use common::roles::{self, CometPorts, LogicPorts, Procs, loopback as addr};

/// Every wait in these tests is bounded by this.
const WAIT: Duration = Duration::from_secs(30);
/// The push operation the clients accept.
const PUSH_OP: i32 = 1000;
/// Room pushes sent back to back in the ordering test.
const ORDERED: usize = 200;

// ---------------------------------------------------------------- processes

/// Logic, comet and job running against one fresh Kafka topic.
#[derive(Debug)]
struct Cluster {
    procs: Procs,
    topic: String,
    logic_http: u16,
    comet_tcp: u16,
    comet_ws: u16,
    comet_grpc: u16,
    comet_http: u16,
    /// Passed to every role as `--grpc-token-file` when set.
    grpc_token_file: Option<String>,
}

impl Cluster {
    async fn start(label: &str) -> anyhow::Result<Cluster> {
        Cluster::start_with_token(label, None).await
    }

    /// As [`Cluster::start`]; with `grpc_token`, every role gets it in a
    /// `--grpc-token-file`.
    async fn start_with_token(label: &str, grpc_token: Option<&str>) -> anyhow::Result<Cluster> {
        Cluster::start_on(label, grpc_token, Backends::plain()).await
    }

    /// As [`Cluster::start_with_token`], logic and job reaching Redis and
    /// Kafka as `backends` says.
    async fn start_on(
        label: &str,
        grpc_token: Option<&str>,
        backends: Backends,
    ) -> anyhow::Result<Cluster> {
        // Topics are made on the plain listener (same broker).
        let brokers = testbed_var("HERALD_KAFKA_BROKERS");
        let topic = unique_name(&format!("fullpath-{label}"));
        let group = unique_name(&format!("fullpath-{label}-job"));
        let server_id = unique_name(&format!("comet-{label}"));
        common::create_topic(&brokers, &topic, 3).await?;

        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("full_path")
            .join(&topic);
        std::fs::create_dir_all(&dir)?;

        let (logic, comet) = (LogicPorts::free(), CometPorts::free());
        let job_http = herald_e2e::free_port();

        let nodes = dir.join("nodes.json");
        let list = serde_json::json!({
            "generation": 1,
            "updated": "2026-11-27T10:00:00Z",
            "nodes": [{
                "name": server_id,
                "grpc": addr(comet.grpc),
                "hosts": ["127.0.0.1"],
                "addrs": ["127.0.0.1"],
                "tcp_port": comet.tcp,
                "ws_port": comet.ws,
                "wss_port": 0,
                "weight": 10,
                "connections": 0,
                "client_ips": 0,
                "draining": false
            }]
        });
        std::fs::write(&nodes, serde_json::to_vec_pretty(&list)?)?;
        let nodes = nodes.display().to_string();
        let grpc_token_file = match grpc_token {
            Some(token) => {
                let file = dir.join("grpc-token");
                std::fs::write(&file, format!("{token}\n"))?;
                Some(file.display().to_string())
            }
            None => None,
        };

        let mut cluster = Cluster {
            procs: Procs::default(),
            topic,
            logic_http: logic.http,
            comet_tcp: comet.tcp,
            comet_ws: comet.ws,
            comet_grpc: comet.grpc,
            comet_http: comet.http,
            grpc_token_file,
        };
        let result = cluster
            .spawn_all(
                &dir,
                &backends,
                (&group, &server_id, &nodes),
                (logic, comet, job_http),
            )
            .await;
        if let Err(err) = result {
            cluster.print_logs();
            return Err(err);
        }
        Ok(cluster)
    }

    /// Starts logic, the comet and job (`group` consuming, comet
    /// `server_id`, node list file `nodes`) on the given ports.
    async fn spawn_all(
        &mut self,
        dir: &Path,
        backends: &Backends,
        (group, server_id, nodes): (&str, &str, &str),
        (logic, comet, job_http): (LogicPorts, CometPorts, u16),
    ) -> anyhow::Result<()> {
        let topic = self.topic.clone();
        let (redis, brokers) = (&backends.redis, &backends.brokers);
        let node_list = ["--node-list".to_owned(), nodes.to_owned()];
        let mut logic_args = logic.args(redis, brokers, &topic);
        logic_args.extend(
            node_list
                .iter()
                .chain(&backends.redis_args)
                .chain(&backends.kafka_args)
                .cloned(),
        );
        self.spawn("logic", dir, logic_args, &[logic.http, logic.grpc])
            .await?;
        self.spawn(
            "comet",
            dir,
            comet.args(server_id, logic.grpc),
            &comet.all(),
        )
        .await?;
        let mut job = roles::job_args(brokers, &topic, group, job_http);
        job.extend(node_list.iter().chain(&backends.kafka_args).cloned());
        self.spawn("job", dir, job, &[job_http]).await?;
        self.procs.check_running()
    }

    /// Starts `herald role args` and waits until each of `ports` accepts,
    /// failing early if any child exits.
    async fn spawn(
        &mut self,
        role: &str,
        dir: &Path,
        args: Vec<String>,
        ports: &[u16],
    ) -> anyhow::Result<()> {
        self.procs.check_running()?;
        let mut herald = roles::herald(role, role, dir).args(args);
        if let Some(file) = &self.grpc_token_file {
            herald = herald.args(["--grpc-token-file", file]);
        }
        self.procs.start(herald, ports, WAIT).await?;
        Ok(())
    }

    fn print_logs(&self) {
        self.procs.print_logs();
    }

    /// Runs a scenario; on failure prints every child's output.
    async fn run<F, Fut>(mut self, scenario: F) -> anyhow::Result<()>
    where
        F: FnOnce(u16, u16, u16) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let result = scenario(self.logic_http, self.comet_tcp, self.comet_ws).await;
        let result = result.and_then(|()| self.procs.check_running());
        if result.is_err() {
            self.print_logs();
        }
        let topic = self.topic.clone();
        // Stop the processes before the topic goes away.
        self.procs.0.clear();
        if let Ok(admin) = admin(&testbed_var("HERALD_KAFKA_BROKERS")) {
            let _ = admin.delete_topics(&[&topic], &AdminOptions::new()).await;
        }
        result
    }
}

/// Where logic and job reach Redis and Kafka, and the flags that say how.
#[derive(Debug)]
struct Backends {
    redis: String,
    brokers: String,
    /// Extra logic flags for Redis.
    redis_args: Vec<String>,
    /// Extra logic and job flags for Kafka.
    kafka_args: Vec<String>,
}

impl Backends {
    /// The test bed's plain Redis port and PLAINTEXT listener.
    fn plain() -> Backends {
        Backends {
            redis: testbed_var("HERALD_REDIS_URL"),
            brokers: testbed_var("HERALD_KAFKA_BROKERS"),
            redis_args: Vec::new(),
            kafka_args: Vec::new(),
        }
    }

    /// Redis's TLS port as its ACL user and Kafka's SASL_SSL listener with
    /// SCRAM-SHA-256, each trusting the test bed's CA.
    fn secure() -> Backends {
        let flags = |pairs: &[(&str, String)]| {
            pairs
                .iter()
                .flat_map(|(flag, value)| [format!("--{flag}"), value.clone()])
                .collect()
        };
        Backends {
            redis: testbed_var("HERALD_REDIS_TLS_URL"),
            brokers: testbed_var("HERALD_KAFKA_SASL_SSL_BROKERS"),
            redis_args: flags(&[
                ("redis-username", testbed_var("HERALD_REDIS_TLS_USER")),
                ("redis-password", testbed_var("HERALD_REDIS_TLS_PASSWORD")),
                ("redis-ca-file", testbed_var("HERALD_REDIS_TLS_CA")),
            ]),
            kafka_args: flags(&[
                ("kafka-security-protocol", "SASL_SSL".to_owned()),
                ("kafka-sasl-mechanism", "SCRAM-SHA-256".to_owned()),
                ("kafka-username", testbed_var("HERALD_KAFKA_SASL_USER")),
                ("kafka-password", testbed_var("HERALD_KAFKA_SASL_PASSWORD")),
                ("kafka-ca-file", testbed_var("HERALD_KAFKA_TLS_CA")),
            ]),
        }
    }
}

fn admin(brokers: &str) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?)
}

// ---------------------------------------------------------------- clients

fn token(mid: i64, key: &str) -> Token {
    Token::new(mid, key)
        .room("live://1000")
        .platform("web")
        .accepts([PUSH_OP])
}

/// A raw TCP goim client, authenticated.
async fn tcp_client(port: u16, mid: i64, key: &str) -> anyhow::Result<Client> {
    let mut client = Client::connect_tcp(addr(port)).await?.with_timeout(WAIT);
    client.auth(&token(mid, key)).await.context("tcp auth")?;
    Ok(client)
}

/// A WebSocket goim client, authenticated.
async fn ws_client(port: u16, mid: i64, key: &str) -> anyhow::Result<Client> {
    let url = format!("ws://127.0.0.1:{port}/sub");
    let mut client = tokio::time::timeout(WAIT, Client::connect_ws(url))
        .await
        .context("websocket upgrade took too long")??
        .with_timeout(WAIT);
    client.auth(&token(mid, key)).await.context("ws auth")?;
    Ok(client)
}

/// The bodies of the next [`ORDERED`] pushes of [`PUSH_OP`], as text.
async fn receive(mut client: Client, label: &str) -> anyhow::Result<Vec<String>> {
    let mut got = Vec::with_capacity(ORDERED);
    while got.len() < ORDERED {
        let body = next_push(&mut client)
            .await
            .with_context(|| format!("{label} client had {} of {ORDERED} pushes", got.len()))?;
        got.push(String::from_utf8(body.to_vec())?);
    }
    Ok(got)
}

/// The body of the next push of [`PUSH_OP`], skipping anything else.
async fn next_push(client: &mut Client) -> anyhow::Result<bytes::Bytes> {
    loop {
        let push = client.next_push().await?;
        // On WebSocket pushes must arrive in op 9.
        ensure!(
            push.batched || client.transport() == Transport::Tcp,
            "a push reached the websocket outside op 9: {push:?}"
        );
        if push.op == PUSH_OP {
            return Ok(push.body);
        }
    }
}

// ---------------------------------------------------------------- logic HTTP

/// POSTs `body` to logic's HTTP API and checks the answer is 200 with code 0.
async fn push(http: u16, path_and_query: &str, body: &[u8]) -> anyhow::Result<()> {
    common::logic_call(addr(http), None, "POST", path_and_query, body)
        .await
        .map(drop)
}

// ---------------------------------------------------------------- tests

/// Keys, mids, room and broadcast pushes each reach the right clients, on
/// TCP byte for byte as goim sends them and on WebSocket wrapped in op 9.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_push_kind_crosses_logic_kafka_job_and_comet() -> anyhow::Result<()> {
    let cluster = Cluster::start("kinds").await?;
    cluster
        .run(|http, tcp, ws| every_push_kind((http, tcp, ws), "", (1, 2)))
        .await
}

/// The same with logic on Redis's TLS port as an ACL user and logic and job
/// on Kafka's SASL_SSL listener (SCRAM-SHA-256): the plain port and listener
/// are not given to any role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_push_kind_crosses_tls_redis_and_sasl_ssl_kafka() -> anyhow::Result<()> {
    let cluster = Cluster::start_on("secure", None, Backends::secure()).await?;
    cluster
        .run(|http, tcp, ws| every_push_kind((http, tcp, ws), "-secure", (31, 32)))
        .await
}

/// Job with a SASL password the brokers refuse is not ready, and its
/// `/readyz` says why (`KafkaAuthFailed`, librdkafka's reason) rather than
/// only "not assigned".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_sasl_password_leaves_job_unready_with_kafka_auth_failed() -> anyhow::Result<()> {
    let secure = Backends::secure();
    let mut args: Vec<String> = secure.kafka_args.clone();
    let password = args
        .iter()
        .position(|a| a == "--kafka-password")
        .context("password flag")?;
    args[password + 1] = "not-the-password".to_owned();
    let job_http = herald_e2e::free_port();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(unique_name("job-wrong-sasl"));
    std::fs::create_dir_all(&dir)?;
    let name = unique_name("job-wrong-sasl");
    let mut job = roles::herald("job", "job", &dir)
        .args(roles::job_args(&secure.brokers, &name, &name, job_http))
        .args(&args)
        .start()?;
    job.wait_for_port(("127.0.0.1", job_http), WAIT).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let answer = herald_testkit::http::get(addr(job_http), "/readyz").await?;
        ensure!(answer.status != 200, "job ready with a wrong password");
        if answer.body.starts_with("KafkaAuthFailed: ") {
            ensure!(answer.body.contains("SASL"), "{}", answer.body);
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            job.print_logs();
            anyhow::bail!("job's /readyz never named the refusal: {}", answer.body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The same with the shared gRPC token on every role (a token file): comet's
/// `Connect`s to logic, job's pushes (and `Rooms` polls) to comet all carry
/// it, so nothing is refused, while a call without it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_push_kind_crosses_with_the_grpc_token_on_every_role() -> anyhow::Result<()> {
    use herald_protocol::pb::{CometClient, PushMsgReq};

    let cluster = Cluster::start_with_token("token", Some("full-path-grpc-token")).await?;
    let (comet_grpc, comet_http, logic_http) =
        (cluster.comet_grpc, cluster.comet_http, cluster.logic_http);
    cluster
        .run(|http, tcp_port, ws_port| async move {
            every_push_kind((http, tcp_port, ws_port), "-token", (21, 22)).await?;
            let refusals = |port: u16, role: &'static str, reason: &'static str| async move {
                let series =
                    format!("herald_{role}_grpc_auth_refusals_total{{reason=\"{reason}\"}}");
                let metrics = herald_testkit::http::get(addr(port), "/metrics")
                    .await?
                    .body;
                let value = metrics
                    .lines()
                    .find_map(|line| line.strip_prefix(&series)?.trim().parse::<f64>().ok());
                value.with_context(|| format!("no {series} in {metrics}"))
            };
            for reason in ["missing", "wrong"] {
                ensure!(
                    refusals(comet_http, "comet", reason).await? == 0.0,
                    "comet refused a call"
                );
                ensure!(
                    refusals(logic_http, "logic", reason).await? == 0.0,
                    "logic refused a call"
                );
            }

            let mut anonymous = CometClient::new(
                tonic::transport::Channel::from_shared(format!("http://{}", addr(comet_grpc)))?
                    .connect()
                    .await?,
            );
            let refused = anonymous
                .push_msg(PushMsgReq {
                    keys: vec!["k-tcp-token".into()],
                    proto_op: PUSH_OP,
                    proto: Some(ws::raw_proto(
                        Frame::push(PUSH_OP, &b"anonymous"[..]).to_bytes(),
                    )),
                })
                .await
                .err()
                .context("comet took a push without the token")?;
            ensure!(
                refused.code() == tonic::Code::Unauthenticated,
                "{refused:?}"
            );
            ensure!(
                refusals(comet_http, "comet", "missing").await? == 1.0,
                "refusal not counted"
            );
            Ok(())
        })
        .await
}

/// Keys, mids, room and broadcast pushes through `http` reach a TCP client
/// (key `k-tcp<tag>`) and a WebSocket client (mid `ws_mid`) of the comet.
/// Tests running at once share Redis: each gives its own tag and mids.
async fn every_push_kind(
    (http, tcp_port, ws_port): (u16, u16, u16),
    tag: &str,
    (tcp_mid, ws_mid): (i64, i64),
) -> anyhow::Result<()> {
    let mut tcp = tcp_client(tcp_port, tcp_mid, &format!("k-tcp{tag}")).await?;
    let mut ws = ws_client(ws_port, ws_mid, &format!("k-ws{tag}")).await?;

    // Keys: exactly the T5 bytes on the TCP stream.
    let keys = format!("/goim/push/keys?operation=1000&keys=k-tcp{tag}");
    push(http, &keys, b"hello").await?;
    let t5: &[u8] = &[
        0x00, 0x00, 0x00, 0x15, 0x00, 0x10, 0x00, 0x01, 0x00, 0x00, 0x03, 0xe8, 0x00, 0x00, 0x00,
        0x00, 0x68, 0x65, 0x6c, 0x6c, 0x6f,
    ];
    let got = tcp.next_message().await?.to_bytes();
    ensure!(&got[..] == t5, "keys push on tcp: {:02x?}", &got[..]);

    // Mids: one op-9 message carrying the push frame (T6 shape).
    let mids = format!("/goim/push/mids?operation=1000&mids={ws_mid}");
    push(http, &mids, b"to-mid").await?;
    let message = ws.next_message().await?;
    ensure!(
        message.op == op::RAW && message.ver == 1 && message.seq == 0,
        "mids push on ws: {message:?}"
    );
    let inner: Vec<Frame> = ws::frames(message.body, Limits::OUTBOUND).collect::<Result<_, _>>()?;
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
    ensure!(next_push(&mut tcp).await? == "to-room", "room push on tcp");
    ensure!(next_push(&mut ws).await? == "to-room", "room push on ws");

    // Broadcast: both clients.
    push(http, "/goim/push/all?operation=1000", b"to-all").await?;
    ensure!(next_push(&mut tcp).await? == "to-all", "broadcast on tcp");
    ensure!(next_push(&mut ws).await? == "to-all", "broadcast on ws");
    Ok(())
}

/// 200 room pushes sent back to back reach both clients complete and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_pushes_keep_their_order_end_to_end() -> anyhow::Result<()> {
    let cluster = Cluster::start("order").await?;
    cluster
        .run(|http, tcp_port, ws_port| async move {
            let tcp = tcp_client(tcp_port, 11, "k-tcp-order").await?;
            let ws = ws_client(ws_port, 12, "k-ws-order").await?;

            let expected: Vec<String> = (0..ORDERED).map(|n| format!("{{\"seq\":{n}}}")).collect();
            let receive_tcp = tokio::spawn(receive(tcp, "tcp"));
            let receive_ws = tokio::spawn(receive(ws, "ws"));

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
