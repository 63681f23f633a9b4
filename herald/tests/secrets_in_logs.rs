//! Secrets stay out of logs (issue 20): an API key, a JWT secret, a gRPC
//! token, client tokens, a Redis and a Kafka password, each a distinct
//! random canary, never appear in anything a role writes, at any level.
//!
//! Every role runs as a process with `RUST_LOG=trace` (every crate's events,
//! librdkafka's, and the `log` records of tungstenite and others that
//! tracing-subscriber forwards): `herald logic` in JWT mode with `herald
//! comet` and `herald job` on the test bed's Redis and Kafka, a second logic
//! and job whose Redis and Kafka cannot be reached, and `herald standalone`.
//! They are driven through good and bad paths: clients authenticating on TCP
//! and WebSocket with good, badly signed and garbage tokens, pushes with the
//! right and a wrong API key, gRPC calls with a wrong token, pushes that
//! fail on the unreachable backends. Then every line of every output is
//! searched for each canary as is and as it could be logged encoded: hex
//! (lower and upper case, as tungstenite prints frame payloads), base64
//! (standard and URL-safe, at each of the three alignments) and
//! percent-encoded (the canaries are letters and digits, so that is the
//! plain form).
//!
//! Left out: `--check-config`, which prints a role's settings when asked
//! rather than logging (logic shows its API key and JWT secret there, which
//! the operator's contract test reads), and the operator, which needs the
//! test bed's kube-apiserver.

use std::collections::HashSet;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use herald_client::{Client, Token};
use herald_e2e::{free_port, testbed_var, unique_name};
use herald_runtime::grpc_auth::TokenSource;
use herald_testkit::{Herald, HeraldProcess};

mod common;

use common::roles::{self, CometPorts, LogicPorts, StandalonePorts, loopback as addr};

const WAIT: Duration = Duration::from_secs(30);
const PUSH_OP: i32 = 1000;
/// Pushes sent with the right key (each kind in turn).
const PUSHES: usize = 120;

/// A random string of letters and digits, distinct per call, starting with
/// `label` so a hit names what leaked.
fn canary(label: &str) -> String {
    let random = |salt: u64| RandomState::new().hash_one(salt);
    format!("{label}{:016x}{:016x}", random(1), random(2))
}

/// The secrets under test.
struct Canaries {
    api_key: String,
    jwt_secret: String,
    grpc_token: String,
    /// A member of the goim JSON client token standalone gets.
    client_member: String,
    /// Presented, refused: must not be logged either.
    wrong_api_key: String,
    wrong_grpc_token: String,
    garbage_client_token: String,
    redis_password: String,
    kafka_password: String,
    /// Signed client tokens (JWTs) given to clients, added as they are made.
    tokens: Vec<(String, String)>,
}

impl Canaries {
    fn new() -> Canaries {
        Canaries {
            api_key: canary("apikey"),
            jwt_secret: canary("jwtsecret"),
            grpc_token: canary("grpctoken"),
            client_member: canary("clienttoken"),
            wrong_api_key: canary("wrongapikey"),
            wrong_grpc_token: canary("wronggrpctoken"),
            garbage_client_token: canary("garbagetoken"),
            redis_password: canary("redispassword"),
            kafka_password: canary("kafkapassword"),
            tokens: Vec::new(),
        }
    }

    /// Every secret with its name.
    fn all(&self) -> Vec<(String, String)> {
        let mut all: Vec<(String, String)> = [
            ("API key", &self.api_key),
            ("JWT secret", &self.jwt_secret),
            ("gRPC token", &self.grpc_token),
            ("client token member", &self.client_member),
            ("wrong API key", &self.wrong_api_key),
            ("wrong gRPC token", &self.wrong_grpc_token),
            ("garbage client token", &self.garbage_client_token),
            ("Redis password", &self.redis_password),
            ("Kafka password", &self.kafka_password),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value.clone()))
        .collect();
        all.extend(self.tokens.iter().cloned());
        all
    }

    /// A client token signed with `secret` (the JWT secret, or a wrong one);
    /// the whole token is a canary, and so is its signature alone.
    fn jwt(&mut self, mid: i64, key: &str, secret: &str, what: &str) -> anyhow::Result<Bytes> {
        let token = Token::new(mid, key)
            .room("live://secrets")
            .platform("web")
            .accepts([PUSH_OP]);
        let jwt = herald_bench::probe::sign(&token, secret)?;
        let signature = jwt.rsplit('.').next().unwrap_or_default().to_owned();
        self.tokens
            .push((format!("{what} client JWT"), jwt.clone()));
        self.tokens
            .push((format!("{what} client JWT signature"), signature));
        Ok(jwt.into())
    }
}

/// The forms a secret could be logged in.
fn forms(secret: &str) -> Vec<(&'static str, String)> {
    let bytes = secret.as_bytes();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut forms = vec![
        ("plain", secret.to_owned()),
        ("hex", hex.clone()),
        ("HEX", hex.to_uppercase()),
        (
            "percent-encoded",
            form_urlencoded::byte_serialize(bytes).collect(),
        ),
    ];
    // Inside a longer base64 text the secret starts at one of three
    // alignments; the characters that depend only on it are the middle.
    for shift in 0..3 {
        let mut shifted = vec![b'x'; shift];
        shifted.extend_from_slice(bytes);
        for (name, engine) in [("base64", STANDARD_NO_PAD), ("base64url", URL_SAFE_NO_PAD)] {
            let text = engine.encode(&shifted);
            let skip = (shift * 4).div_ceil(3);
            let core = &text[skip..text.len().saturating_sub(4)];
            forms.push((name, core.to_owned()));
        }
    }
    forms
}

/// Where each process's output goes.
fn dir(label: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("secrets_in_logs")
        .join(unique_name(label))
}

/// `herald role` logging everything (`RUST_LOG=trace`) into `dir`.
fn herald(role: &str, name: &str, dir: &Path, args: &[String]) -> Herald {
    roles::herald(role, name, dir)
        .env("RUST_LOG", "trace")
        .args(args)
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

/// POSTs a push with `key` as the API key; the HTTP status.
async fn push(http: u16, key: &str, path: &str, body: &[u8]) -> anyhow::Result<u16> {
    let bearer = format!("Bearer {key}");
    let answer = herald_testkit::http::request_with(
        addr(http),
        "POST",
        path,
        &[("Authorization", bearer.as_str())],
        body,
    )
    .await?;
    Ok(answer.status)
}

/// `PUSHES` pushes of every kind to `key` / mid `mid` / the room / all,
/// each with the right API key, one in ten with a wrong one too.
async fn push_load(
    http: u16,
    canaries: &Canaries,
    key: &str,
    mid: i64,
    room: &str,
) -> anyhow::Result<()> {
    for n in 0..PUSHES {
        let path = match n % 4 {
            0 => format!("/goim/push/keys?operation={PUSH_OP}&keys={key}"),
            1 => format!("/goim/push/mids?operation={PUSH_OP}&mids={mid}"),
            2 => format!("/goim/push/room?operation={PUSH_OP}&type=live&room={room}"),
            _ => format!("/goim/push/all?operation={PUSH_OP}"),
        };
        let status = push(
            http,
            &canaries.api_key,
            &path,
            format!("push {n}").as_bytes(),
        )
        .await?;
        ensure!(status == 200, "push {n}: {status}");
        if n.is_multiple_of(10) {
            let refused = push(http, &canaries.wrong_api_key, &path, b"refused").await?;
            ensure!(refused == 401, "a wrong API key got {refused}");
        }
    }
    Ok(())
}

/// Reads pushes until one with `body` arrives.
async fn receive(client: &mut Client, body: &[u8]) -> anyhow::Result<()> {
    loop {
        let push = client.next_push().await?;
        if push.op == PUSH_OP && push.body == body {
            return Ok(());
        }
    }
}

/// A call to a gRPC port with a wrong token, refused.
async fn wrong_grpc_call(grpc: u16, canaries: &Canaries) -> anyhow::Result<()> {
    let wrong = TokenSource::literal(&canaries.wrong_grpc_token).start()?;
    let refused = herald_operator::load::load(&addr(grpc), WAIT, &wrong).await;
    ensure!(refused.is_err(), "a wrong gRPC token was accepted");
    Ok(())
}

/// Clients on `tcp` and `ws` with good, badly signed and garbage tokens.
async fn clients(
    tcp: u16,
    ws: u16,
    canaries: &mut Canaries,
    tag: &str,
    good: impl Fn(&mut Canaries, i64, &str) -> anyhow::Result<Bytes>,
) -> anyhow::Result<(Client, Client)> {
    let tcp_addr = SocketAddr::from(([127, 0, 0, 1], tcp));
    let mut on_tcp = Client::connect_tcp(tcp_addr).await?.with_timeout(WAIT);
    on_tcp
        .auth(good(canaries, 1, &format!("{tag}-tcp"))?)
        .await
        .context("tcp auth")?;
    let mut on_ws = Client::connect_ws(format!("ws://127.0.0.1:{ws}/sub"))
        .await?
        .with_timeout(WAIT);
    on_ws
        .auth(good(canaries, 2, &format!("{tag}-ws"))?)
        .await
        .context("ws auth")?;
    // Refused tokens, on both transports: badly signed and garbage.
    let bad = canaries.jwt(
        3,
        &format!("{tag}-bad"),
        &canary("notthesecret"),
        "badly signed",
    )?;
    let garbage = Bytes::from(canaries.garbage_client_token.clone());
    for token in [bad, garbage] {
        let mut client = Client::connect_tcp(tcp_addr).await?.with_timeout(WAIT);
        let _ = client.auth(token.clone()).await;
        let mut client = Client::connect_ws(format!("ws://127.0.0.1:{ws}/sub"))
            .await?
            .with_timeout(WAIT);
        let _ = client.auth(token).await;
    }
    Ok((on_tcp, on_ws))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_any_log_line_at_trace_level() -> anyhow::Result<()> {
    let mut canaries = Canaries::new();
    let mut outputs: Vec<(String, String)> = Vec::new();
    let mut procs: Vec<HeraldProcess> = Vec::new();
    let result = run_everything(&mut canaries, &mut procs).await;
    // SIGTERM: shutdown paths log too.
    for process in &mut procs {
        let _ = process.stop(Duration::from_secs(15)).await;
        outputs.push((process.name().to_owned(), process.logs()));
    }
    result?;

    let traced = outputs
        .iter()
        .filter(|(_, text)| text.contains("TRACE"))
        .count();
    ensure!(
        traced >= procs.len(),
        "only {traced} outputs hold TRACE lines: is RUST_LOG=trace honoured?"
    );
    let mut hits = Vec::new();
    for (secret_name, secret) in canaries.all() {
        let mut searched = HashSet::new();
        for (form, text) in forms(&secret) {
            if !searched.insert(text.clone()) {
                continue;
            }
            for (output, log) in &outputs {
                for line in log.lines().filter(|line| line.contains(&text)) {
                    let shown: String = line.chars().take(300).collect();
                    hits.push(format!("{secret_name} ({form}) in {output}: {shown}"));
                }
            }
        }
    }
    let lines: usize = outputs.iter().map(|(_, log)| log.lines().count()).sum();
    eprintln!(
        "secrets in logs: {} outputs, {lines} lines, {} secrets searched, {} hits",
        outputs.len(),
        canaries.all().len(),
        hits.len()
    );
    ensure!(hits.is_empty(), "secrets in logs:\n{}", hits.join("\n"));
    Ok(())
}

async fn run_everything(
    canaries: &mut Canaries,
    procs: &mut Vec<HeraldProcess>,
) -> anyhow::Result<()> {
    let redis = testbed_var("HERALD_REDIS_URL");
    let brokers = testbed_var("HERALD_KAFKA_BROKERS");
    let topic = unique_name("secrets");
    common::create_topic(&brokers, &topic, 1).await?;
    let dir = dir("full");
    std::fs::create_dir_all(&dir)?;
    let token_file = dir.join("grpc-token");
    std::fs::write(&token_file, format!("{}\n", canaries.grpc_token))?;
    let token_file = token_file.display().to_string();

    // The full path, logic in JWT mode.
    let logic = LogicPorts::free();
    let comet = CometPorts::free();
    let job_http = free_port();
    let server = unique_name("secrets-comet");
    let token = strings(&["--grpc-token-file", &token_file]);
    let jwt_mode = strings(&[
        "--api-key",
        &canaries.api_key,
        "--token-mode",
        "jwt",
        "--jwt-secret",
        &canaries.jwt_secret,
    ]);
    let mut logic_args = logic.args(&redis, &brokers, &topic);
    logic_args.extend(jwt_mode.iter().chain(&token).cloned());
    let mut comet_args = comet.args(&server, logic.grpc);
    comet_args.extend(token.iter().cloned());
    let mut job_args = roles::job_args(&brokers, &topic, &unique_name("secrets-job"), job_http);
    job_args.extend(strings(&[
        "--comet",
        &format!("{server}={}", addr(comet.grpc)),
    ]));
    job_args.extend(token.iter().cloned());
    procs.push(herald("logic", "logic", &dir, &logic_args).start()?);
    procs[0]
        .wait_for_port(("127.0.0.1", logic.grpc), WAIT)
        .await?;
    procs.push(herald("comet", "comet", &dir, &comet_args).start()?);
    procs[1]
        .wait_for_port(("127.0.0.1", comet.tcp), WAIT)
        .await?;
    procs.push(herald("job", "job", &dir, &job_args).start()?);
    procs[2]
        .wait_for_port(("127.0.0.1", job_http), WAIT)
        .await?;
    let (logic_http, logic_grpc, tcp, ws, comet_grpc) =
        (logic.http, logic.grpc, comet.tcp, comet.ws, comet.grpc);

    let secret = canaries.jwt_secret.clone();
    let (mut on_tcp, mut on_ws) = clients(tcp, ws, canaries, "secrets", |c, mid, key| {
        c.jwt(mid, key, &secret, "signed")
    })
    .await?;
    push_load(logic_http, canaries, "secrets-tcp", 2, "secrets").await?;
    let last = format!("push {}", PUSHES - 1);
    receive(&mut on_tcp, last.as_bytes())
        .await
        .context("tcp client")?;
    receive(&mut on_ws, last.as_bytes())
        .await
        .context("ws client")?;
    wrong_grpc_call(comet_grpc, canaries).await?;
    wrong_grpc_call(logic_grpc, canaries).await?;

    // Logic and job whose Redis and Kafka cannot be reached, with
    // passwords: every push fails, librdkafka and redis retry.
    let dead = dir.join("unreachable");
    let nowhere = free_port();
    let dead_job_http = free_port();
    let kafka_sasl = strings(&[
        "--kafka-security-protocol",
        "SASL_PLAINTEXT",
        "--kafka-sasl-mechanism",
        "SCRAM-SHA-256",
        "--kafka-username",
        "herald",
        "--kafka-password",
        &canaries.kafka_password,
    ]);
    let dead_logic_ports = LogicPorts::free();
    let (dead_http, dead_grpc) = (dead_logic_ports.http, dead_logic_ports.grpc);
    let mut dead_logic = dead_logic_ports.args(
        &format!("redis://:{}@127.0.0.1:{nowhere}", canaries.redis_password),
        &addr(nowhere),
        "goim-push-topic",
    );
    dead_logic.extend(jwt_mode.iter().chain(&token).cloned());
    dead_logic.extend(kafka_sasl.iter().cloned());
    let mut dead_job = roles::job_args(
        &addr(nowhere),
        "goim-push-topic",
        "goim-push-group-job",
        dead_job_http,
    );
    dead_job.extend(strings(&[
        "--comet",
        &format!("{server}={}", addr(comet_grpc)),
    ]));
    dead_job.extend(token.iter().cloned());
    dead_job.extend(kafka_sasl.iter().cloned());
    procs.push(herald("logic", "logic-unreachable", &dead, &dead_logic).start()?);
    procs[3]
        .wait_for_port(("127.0.0.1", dead_http), WAIT)
        .await?;
    procs.push(herald("job", "job-unreachable", &dead, &dead_job).start()?);
    for n in 0..10 {
        let path = format!("/goim/push/keys?operation={PUSH_OP}&keys=k{n}");
        let status = push(dead_http, &canaries.api_key, &path, b"to nowhere").await?;
        ensure!(status != 200, "a push went through unreachable backends");
        let _ = push(dead_http, &canaries.wrong_api_key, &path, b"refused").await?;
    }
    // A client whose comet's logic cannot reach Redis.
    let dead_comet_ports = CometPorts::free();
    let dead_tcp = dead_comet_ports.tcp;
    let mut dead_comet = dead_comet_ports.args("secrets-dead-comet", dead_grpc);
    dead_comet.extend(token.iter().cloned());
    procs.push(herald("comet", "comet-unreachable", &dead, &dead_comet).start()?);
    procs[5]
        .wait_for_port(("127.0.0.1", dead_tcp), WAIT)
        .await?;
    let jwt = canaries.jwt(9, "secrets-dead", &secret, "signed (Redis down)")?;
    let mut client = Client::connect_tcp(addr(dead_tcp))
        .await?
        .with_timeout(WAIT);
    ensure!(
        client.auth(jwt).await.is_err(),
        "authenticated with Redis unreachable"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Standalone: goim JSON tokens (with a canary member), API key, gRPC
    // token given as a flag.
    let alone = dir.join("standalone");
    let ports = StandalonePorts::free();
    let (s_tcp, s_ws, s_grpc, s_http, s_logic) = (
        ports.tcp,
        ports.ws,
        ports.grpc,
        ports.http,
        ports.logic_grpc,
    );
    let mut standalone = ports.args();
    standalone.extend(strings(&[
        "--api-key",
        &canaries.api_key,
        "--grpc-token",
        &canaries.grpc_token,
    ]));
    procs.push(herald("standalone", "standalone", &alone, &standalone).start()?);
    procs[6].wait_for_port(("127.0.0.1", s_http), WAIT).await?;
    procs[6].wait_for_port(("127.0.0.1", s_tcp), WAIT).await?;
    let member = canaries.client_member.clone();
    let (mut on_tcp, mut on_ws) = clients(s_tcp, s_ws, canaries, "alone", |_, mid, key| {
        // goim's JSON token with one more member, which goim ignores.
        let mut json: serde_json::Value = serde_json::from_str(
            &Token::new(mid, key)
                .room("live://secrets")
                .platform("web")
                .accepts([PUSH_OP])
                .to_json(),
        )?;
        json["secret"] = member.clone().into();
        Ok(Bytes::from(json.to_string()))
    })
    .await?;
    push_load(s_http, canaries, "alone-tcp", 2, "secrets").await?;
    receive(&mut on_tcp, last.as_bytes())
        .await
        .context("standalone tcp client")?;
    receive(&mut on_ws, last.as_bytes())
        .await
        .context("standalone ws client")?;
    wrong_grpc_call(s_grpc, canaries).await?;
    wrong_grpc_call(s_logic, canaries).await?;
    Ok(())
}
