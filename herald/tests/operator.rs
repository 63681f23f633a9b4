//! `herald operator` and `herald crdgen` as a user runs them: the binary
//! against the test bed's kube-apiserver serves `/healthz` and `/metrics`,
//! wins its Lease, and stops cleanly on SIGTERM; crdgen prints the committed CRD.
//! (A scale-down drain of `herald standalone` comets is in
//! `operator_scaling.rs`.)

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use herald_testkit::{Herald, http};
use tokio::net::TcpListener;

fn herald(role: &str) -> Herald {
    Herald::new(env!("CARGO_BIN_EXE_herald"), role)
        .dir(Path::new(env!("CARGO_TARGET_TMPDIR")).join("operator"))
}

#[test]
fn crdgen_prints_the_committed_crd() -> Result<()> {
    let output = herald("crdgen").output()?;
    assert!(output.status.success());
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crds/pushcluster.yaml"
    ))?;
    assert_eq!(String::from_utf8(output.stdout)?, committed);
    Ok(())
}

#[tokio::test]
async fn operator_serves_health_and_metrics_and_stops_on_sigterm() -> Result<()> {
    herald_e2e::testbed_var("KUBECONFIG");
    // Self-contained: a fresh test bed has no CRD until some test applies it.
    herald_e2e::install_pushcluster_crd(&kube::Client::try_default().await?).await?;
    let addr = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let lease = herald_e2e::unique_name("herald-operator-bin");
    let mut running = herald("operator")
        .args(["--namespace", "default", "--lease-namespace", "default"])
        .args(["--lease-name", &lease, "--metrics-addr", &addr.to_string()])
        .args(["--poll-interval-ms", "500"])
        .name(lease.clone())
        .start()?;

    let metrics = running
        .wait_until(Duration::from_secs(30), "leadership", || async {
            Ok(http::get(addr, "/metrics")
                .await
                .ok()
                .filter(|m| m.body.contains("herald_operator_leader 1")))
        })
        .await?;
    assert_eq!(metrics.status, 200, "{metrics:?}");
    assert!(
        metrics.body.contains("herald_operator_reconciles_total"),
        "{metrics:?}"
    );
    let health = http::get(addr, "/healthz").await?;
    assert!(
        health.status == 200 && health.body.ends_with("ok"),
        "{health:?}"
    );

    // SIGTERM by pid: the operator releases its Lease and exits 0.
    let exit = running.stop(Duration::from_secs(20)).await?;
    assert!(exit.success(), "{exit}");
    Ok(())
}
