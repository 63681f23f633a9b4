//! The shared gRPC token between roles in this process: the operator's
//! admin calls to a comet whose gRPC port wants it
//! (`herald_operator::load::{load, drain}`, the functions its reconcile
//! passes poll load and start drains with, each given its cluster's
//! token), and a comet whose token logic refuses.

use std::sync::Arc;
use std::time::Duration;

use herald_operator::load;
use herald_protocol::pb::admin::DrainRequest;
use herald_runtime::grpc_auth::{self, TokenSource};
use tokio::net::TcpListener;

mod common;

use common::LocalComet;

const WAIT: Duration = Duration::from_secs(10);
const SECRET: &str = "operator-grpc-token";

/// Without the token the comet refuses `Load`; with its cluster's token (as
/// the operator reads it from Secret `<cluster>-grpc-token`), `Load`
/// answers and `Drain` starts a drain that the next `Load` reports.
#[tokio::test]
async fn the_operators_load_poll_and_drain_carry_the_shared_token() -> anyhow::Result<()> {
    let mut comet = LocalComet::start_with("comet-token", |config| {
        config.grpc_token = TokenSource::literal(SECRET);
    })
    .await?;
    let addr = comet.grpc.to_string();

    let off = grpc_auth::Token::off();
    let refused = load::load(&addr, WAIT, &off).await.unwrap_err();
    assert!(
        matches!(&refused, load::Error::Call { status, .. } if grpc_auth::is_refusal(status)),
        "{refused:?}"
    );

    let token = TokenSource::literal(SECRET).start()?;
    let reply = load::load(&addr, WAIT, &token).await?;
    assert_eq!(reply.server, "comet-token");
    assert!(!reply.draining);
    let request = DrainRequest {
        deadline_ms: 1000,
        ..DrainRequest::default()
    };
    assert!(
        load::drain(&addr, request, WAIT, &token).await?,
        "drain started"
    );
    assert!(
        load::load(&addr, WAIT, &token).await?.draining,
        "draining after Drain"
    );

    comet.task.stop(WAIT).await
}

/// A real logic (in-memory routes and queue) that wants token `A`: a comet
/// with token `B` stays unready, saying why, and its clients cannot
/// authenticate (each try counted as a failed call to logic); a comet with
/// `A` turns ready and authenticates its clients.
#[tokio::test]
async fn a_comet_whose_token_logic_refuses_stays_unready() -> anyhow::Result<()> {
    let mut config = herald_logic::Config::new("", "", "unused");
    config.grpc_token = TokenSource::literal("token-a");
    let listeners = herald_logic::Listeners {
        http: TcpListener::bind("127.0.0.1:0").await?,
        grpc: TcpListener::bind("127.0.0.1:0").await?,
        client: None,
    };
    let logic_grpc = listeners.grpc.local_addr()?;
    let store = Arc::new(herald_logic::store::memory::MemoryStore::new(
        Duration::from_secs(600),
    ));
    let (queue, _records) = herald_logic::queue::memory::MemoryQueue::new(16);
    let (stop_logic, logic_stopped) = tokio::sync::oneshot::channel::<()>();
    let logic = tokio::spawn(herald_logic::run_with(
        config,
        store,
        Arc::new(queue),
        listeners,
        async {
            let _ = logic_stopped.await;
        },
    ));

    let wrong = TestComet::start(logic_grpc, "token-b").await?;
    let body = wrong
        .readyz_until(503, "refuses this comet's gRPC token")
        .await?;
    assert!(body.starts_with("LogicUnreachable: "), "{body}");
    assert!(
        !body.contains("token-b") && !body.contains("token-a"),
        "{body}"
    );
    let mut client = herald_client::Client::connect_tcp(wrong.tcp)
        .await?
        .with_timeout(WAIT);
    let token = herald_client::Token::new(1, "k-wrong").accepts([1000]);
    assert!(client.auth(&token).await.is_err(), "authenticated anyway");
    let failures = "herald_comet_logic_call_failures_total{rpc=\"connect\"} 1";
    let metrics = herald_testkit::http::get(wrong.http, "/metrics")
        .await?
        .body;
    assert!(metrics.contains(failures), "{metrics}");

    let right = TestComet::start(logic_grpc, "token-a").await?;
    right.readyz_until(200, "ready").await?;
    let mut client = herald_client::Client::connect_tcp(right.tcp)
        .await?
        .with_timeout(WAIT);
    client
        .auth(&herald_client::Token::new(2, "k-right").accepts([1000]))
        .await?;

    wrong.stop().await?;
    right.stop().await?;
    let _ = stop_logic.send(());
    tokio::time::timeout(WAIT, logic).await???;
    Ok(())
}

/// A comet in this process with gRPC token `token`, calling logic at `logic`.
struct TestComet {
    tcp: std::net::SocketAddr,
    http: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<herald_comet::Result<()>>,
}

impl TestComet {
    async fn start(logic: std::net::SocketAddr, token: &str) -> anyhow::Result<TestComet> {
        let mut config = herald_comet::Config::new(token, logic.to_string());
        config.grpc_token = TokenSource::literal(token);
        let listeners = herald_comet::Listeners {
            tcp: TcpListener::bind("127.0.0.1:0").await?,
            ws: TcpListener::bind("127.0.0.1:0").await?,
            wss: None,
            grpc: TcpListener::bind("127.0.0.1:0").await?,
            http: Some(TcpListener::bind("127.0.0.1:0").await?),
        };
        let tcp = listeners.tcp.local_addr()?;
        let http = listeners
            .http
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(herald_comet::run(config, listeners, async {
            let _ = stopped.await;
        }));
        Ok(TestComet {
            tcp,
            http: http.expect("bound above"),
            stop,
            task,
        })
    }

    /// Polls `/readyz` until it answers `status` with a body containing
    /// `text`; that body.
    async fn readyz_until(&self, status: u16, text: &str) -> anyhow::Result<String> {
        let mut last = None;
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::time::Instant::now() < deadline {
            if let Ok(answer) = herald_testkit::http::get(self.http, "/readyz").await {
                if answer.status == status && answer.body.contains(text) {
                    return Ok(answer.body);
                }
                last = Some((answer.status, answer.body));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("/readyz never answered {status} with {text:?}; last {last:?}")
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT, self.task).await???;
        Ok(())
    }
}
