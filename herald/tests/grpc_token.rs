//! The operator's admin calls to a comet whose gRPC port wants the shared
//! token: `herald_operator::load::{load, drain}`, the functions its reconcile
//! passes poll load and start drains with, against a real comet in this
//! process. One test in this binary: the operator's token is process-wide.

use std::time::Duration;

use herald_operator::load;
use herald_protocol::pb::admin::DrainRequest;
use herald_runtime::grpc_auth::{self, TokenSource};
use herald_testkit::stub::StubLogic;
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(10);
const SECRET: &str = "operator-grpc-token";

/// Without the token (the default) the comet refuses `Load`; once the
/// operator uses it (as `herald operator --grpc-token-file` does at start),
/// `Load` answers and `Drain` starts a drain that the next `Load` reports.
#[tokio::test]
async fn the_operators_load_poll_and_drain_carry_the_shared_token() -> anyhow::Result<()> {
    let logic = StubLogic::recording();
    let logic_addr = logic.serve().await?;
    let mut config = herald_comet::Config::new("comet-token", logic_addr.to_string());
    config.grpc_token = TokenSource::literal(SECRET);
    let listeners = herald_comet::Listeners {
        tcp: TcpListener::bind("127.0.0.1:0").await?,
        ws: TcpListener::bind("127.0.0.1:0").await?,
        wss: None,
        grpc: TcpListener::bind("127.0.0.1:0").await?,
        http: None,
    };
    let addr = listeners.grpc.local_addr()?.to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let comet = tokio::spawn(herald_comet::run(config, listeners, async {
        let _ = stopped.await;
    }));

    let refused = load::load(&addr, WAIT).await.unwrap_err();
    assert!(
        matches!(&refused, load::Error::Call { status, .. } if grpc_auth::is_refusal(status)),
        "{refused:?}"
    );

    load::use_grpc_token(TokenSource::literal(SECRET).start()?);
    let reply = load::load(&addr, WAIT).await?;
    assert_eq!(reply.server, "comet-token");
    assert!(!reply.draining);
    let request = DrainRequest {
        deadline_ms: 1000,
        ..DrainRequest::default()
    };
    assert!(load::drain(&addr, request, WAIT).await?, "drain started");
    assert!(
        load::load(&addr, WAIT).await?.draining,
        "draining after Drain"
    );

    let _ = stop.send(());
    tokio::time::timeout(WAIT, comet).await???;
    Ok(())
}
