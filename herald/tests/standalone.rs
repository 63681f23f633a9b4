//! `herald standalone` as a user runs it: the built binary on 127.0.0.1
//! ports, a raw TCP client and a WebSocket client with goim tokens, and
//! pushes through the HTTP API. No Redis or Kafka involved.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use herald_client::{Client, Frame, Limits, Token, op};
use herald_testkit::{HeraldProcess, http};

mod common;

use common::roles::{self, StandalonePorts};

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
    _process: HeraldProcess,
    tcp: SocketAddr,
    ws: SocketAddr,
    grpc: SocketAddr,
    http: SocketAddr,
    /// The comet's admin HTTP (`/metrics`).
    comet_http: SocketAddr,
}

impl Standalone {
    async fn start(extra: &[String]) -> Result<Standalone> {
        let ports = StandalonePorts::free();
        let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let (tcp, ws, grpc, http, comet_http) = (
            at(ports.tcp),
            at(ports.ws),
            at(ports.grpc),
            at(ports.http),
            at(ports.comet_http),
        );
        // The test bed's HERALD_* variables are kept out: they would switch
        // backends on. Killed without a chance to clean up, its node-list
        // file stays in its own TMPDIR under the target dir.
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("standalone");
        let mut process = roles::herald("standalone", &format!("standalone-{}", tcp.port()), &dir)
            .args(ports.args())
            .args(extra)
            .start()?;
        for addr in [tcp, ws, http, comet_http] {
            process.wait_for_port(addr, WAIT).await?;
        }
        Ok(Standalone {
            _process: process,
            tcp,
            ws,
            grpc,
            http,
            comet_http,
        })
    }

    /// `POST path` with `body`; returns the response body.
    async fn post(&self, path: &str, body: &[u8]) -> Result<String> {
        Ok(http::post(self.http, path, body).await?.ok()?.body)
    }
}

async fn tcp_client(addr: SocketAddr, token: &Token) -> Result<Client> {
    let mut client = Client::connect_tcp(addr).await?.with_timeout(WAIT);
    client.auth(token).await?;
    Ok(client)
}

async fn ws_client(addr: SocketAddr, token: &Token) -> Result<Client> {
    let mut client = Client::connect_ws(format!("ws://{addr}/sub"))
        .await?
        .with_timeout(WAIT);
    client.auth(token).await?;
    Ok(client)
}

#[tokio::test]
async fn standalone_pushes_to_tcp_and_websocket_clients() -> Result {
    let herald = Standalone::start(&[]).await?;
    pushes_reach_both_clients(&herald, "tcp-key", "ws-key").await
}

/// With `--grpc-token` the roles in the process send it to each other, so
/// pushes still arrive, and the comet's gRPC port refuses a push without it.
#[tokio::test]
async fn standalone_with_a_grpc_token_pushes_and_refuses_calls_without_it() -> Result {
    use herald_protocol::pb::{CometClient, PushMsgReq};

    let herald = Standalone::start(&["--grpc-token".into(), "standalone-token".into()]).await?;
    pushes_reach_both_clients(&herald, "tcp-key", "ws-key").await?;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", herald.grpc))?
        .connect()
        .await?;
    let refused = CometClient::new(channel)
        .push_msg(PushMsgReq {
            keys: vec!["tcp-key".into()],
            proto_op: 1000,
            proto: Some(herald_protocol::ws::raw_proto(hex(T5).into())),
        })
        .await
        .expect_err("a push without the token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    Ok(())
}

/// `herald probe`, what the chart's `helm test` runs: against standalone
/// with an API key it reports both pushes received; with a wrong key it
/// fails with logic's 401, and with a dead comet address it fails naming it.
/// The same standalone's client listener serves the node list without the
/// key and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_reports_both_pushes_and_fails_clearly() -> Result {
    let client_api = SocketAddr::from(([127, 0, 0, 1], herald_e2e::free_port()));
    let herald = Standalone::start(&[
        "--api-key".to_owned(),
        "k3y".to_owned(),
        "--client-addr".to_owned(),
        client_api.to_string(),
    ])
    .await?;
    // The client-facing listener: the node list without the push key, and
    // no push route at all.
    let nodes = http::get(client_api, "/goim/nodes/weighted?platform=web").await?;
    assert_eq!(nodes.status, 200, "{nodes:?}");
    let push = http::post(client_api, "/goim/push/all?operation=1000", b"x").await?;
    assert_eq!(push.status, 404, "{push:?}");
    let keyless = http::get(herald.http, "/goim/nodes/weighted?platform=web").await?;
    assert_eq!(keyless.status, 401, "{keyless:?}");
    let probe = |comet: String, key: &str| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("probe");
        let command = roles::herald("probe", "probe", &dir)
            .args(["--comet", &comet, "--logic", &herald.http.to_string()])
            .args(["--api-key", key, "--timeout-secs", "5"]);
        tokio::task::spawn_blocking(move || command.output())
    };
    let ok = probe(herald.tcp.to_string(), "k3y").await??;
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success()
            && stdout.contains("received a member-id push")
            && stdout.contains("a room push"),
        "probe failed: {stdout}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let refused = probe(herald.tcp.to_string(), "wrong").await??;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("FAILED: push through logic") && stderr.contains("401"),
        "{stderr}"
    );
    let nowhere = SocketAddr::from(([127, 0, 0, 1], herald_e2e::free_port()));
    let unreachable = probe(nowhere.to_string(), "k3y").await??;
    let stderr = String::from_utf8_lossy(&unreachable.stderr);
    assert_eq!(unreachable.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("client at comet {nowhere}")),
        "{stderr}"
    );
    Ok(())
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
    common::create_topic(&brokers, &topic, 2).await?;
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
    let mut tcp = tcp_client(
        herald.tcp,
        &Token::new(1, tcp_key)
            .room(room)
            .platform("android")
            .accepts([1000]),
    )
    .await?;
    let mut ws = ws_client(
        herald.ws,
        &Token::new(2, ws_key)
            .room(room)
            .platform("web")
            .accepts([1000]),
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
        tcp.next_message().await?.to_bytes().to_vec(),
        hex(T5),
        "TCP gets the bare frame"
    );
    assert_eq!(
        ws.next_message().await?.to_bytes().to_vec(),
        hex(T6),
        "WS gets it in op 9"
    );

    let reply = herald
        .post(
            "/goim/push/room?operation=1000&type=live&room=1000",
            b"to the room",
        )
        .await?;
    assert!(reply.contains("\"code\":0"), "{reply}");
    let frame = tcp.next_message().await?;
    assert_eq!((frame.op, &frame.body[..]), (1000, &b"to the room"[..]));
    let outer = ws.next_message().await?;
    assert_eq!(outer.op, op::RAW);
    let inner = Frame::from_message(outer.body, Limits::OUTBOUND)?;
    assert_eq!((inner.op, &inner.body[..]), (1000, &b"to the room"[..]));
    Ok(())
}

/// The internal gRPC ports listen on loopback unless told otherwise, and
/// the comet's admin HTTP on its usual port (`--check-config` shows what
/// standalone would bind, without binding it).
#[test]
fn standalone_binds_its_internal_ports_to_loopback_by_default() -> Result {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["--check-config", "standalone"])
        .env_remove("HERALD_COMET_GRPC_ADDR")
        .env_remove("HERALD_LOGIC_GRPC_ADDR")
        .env_remove("HERALD_COMET_HTTP_ADDR")
        .output()?;
    let shown = String::from_utf8(output.stdout)?;
    assert!(output.status.success(), "{shown}");
    for line in [
        "grpc_addr: 127.0.0.1:3109,",
        "logic_grpc_addr: 127.0.0.1:3119,",
        "0.0.0.0:3190",
    ] {
        assert!(shown.contains(line), "no {line:?} in {shown}");
    }
    Ok(())
}

/// The comet's metrics are served in standalone too: a reserved op from a
/// client shows in its refusal counter, and the client is still served.
#[tokio::test]
async fn standalone_serves_the_comet_metrics_and_refusal_counters() -> Result {
    let herald = Standalone::start(&[]).await?;
    let mut client = tcp_client(herald.tcp, &Token::new(1, "metrics-key")).await?;
    client
        .send(Frame {
            ver: 1,
            op: op::REDIRECT,
            seq: 1,
            body: Default::default(),
        })
        .await?;
    // Answered in order: no echo of op 18 comes before the heartbeat's reply.
    client.heartbeat().await?;
    let series = r#"herald_comet_refusals_total{reason="client_reserved_op"} 1"#;
    let metrics = http::get(herald.comet_http, "/metrics").await?;
    assert!(
        metrics.body.lines().any(|line| line == series),
        "{series} not in {}",
        metrics.body
    );
    assert_eq!(http::get(herald.comet_http, "/healthz").await?.status, 200);
    Ok(())
}

/// `--token-mode jwt` works in standalone as in `herald logic`: a token
/// signed with the secret connects and gets pushes, one signed with another
/// secret and goim's unsigned JSON are refused.
#[tokio::test]
async fn standalone_checks_signed_client_tokens() -> Result {
    let secret = "standalone-jwt-secret";
    let herald = Standalone::start(&[
        "--token-mode".into(),
        "jwt".into(),
        "--jwt-secret".into(),
        secret.into(),
    ])
    .await?;
    let token = Token::new(5, "jwt-key").accepts([1000]);
    let signed = herald_bench::probe::sign(&token, secret)?;
    let mut client = Client::connect_tcp(herald.tcp).await?.with_timeout(WAIT);
    client.auth(signed).await?;
    herald
        .post("/goim/push/keys?operation=1000&keys=jwt-key", b"hello")
        .await?;
    assert_eq!(client.next_message().await?.to_bytes(), hex(T5));

    let forged = herald_bench::probe::sign(&token, "some-other-secret")?;
    for refused in [forged, serde_json::to_string(&token)?] {
        let mut client = Client::connect_tcp(herald.tcp).await?.with_timeout(WAIT);
        let outcome = client.auth(refused).await;
        assert!(
            matches!(outcome, Err(herald_client::Error::AuthRefused)),
            "{outcome:?}"
        );
    }
    Ok(())
}
