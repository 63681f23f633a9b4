//! `herald operator` and `herald crdgen` as a user runs them: the binary
//! against the test bed's kube-apiserver serves `/healthz` and `/metrics`,
//! wins its Lease, and stops cleanly on SIGTERM; crdgen prints the committed CRD.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The running binary; killed by pid when dropped, also on failure.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn get(addr: std::net::SocketAddr, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

#[test]
fn crdgen_prints_the_committed_crd() -> Result<()> {
    let output = Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("crdgen")
        .output()?;
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
    let addr = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let lease = herald_e2e::unique_name("herald-operator-bin");
    let child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("operator")
        .args(["--namespace", "default", "--lease-namespace", "default"])
        .args(["--lease-name", &lease, "--metrics-addr", &addr.to_string()])
        .args(["--poll-interval-ms", "500"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting herald operator")?;
    let mut running = Running(child);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        if let Some(status) = running.0.try_wait()? {
            bail!("herald operator exited early: {status}");
        }
        if let Ok(metrics) = get(addr, "/metrics").await
            && metrics.contains("herald_operator_leader 1")
        {
            break metrics;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "never became leader"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(metrics.starts_with("HTTP/1.0 200"), "{metrics}");
    assert!(
        metrics.contains("herald_operator_reconciles_total"),
        "{metrics}"
    );
    let health = get(addr, "/healthz").await?;
    assert!(
        health.starts_with("HTTP/1.0 200") && health.ends_with("ok"),
        "{health}"
    );

    // SIGTERM by pid: the operator releases its Lease and exits 0.
    let status = Command::new("kill")
        .args(["-TERM", &running.0.id().to_string()])
        .status()?;
    assert!(status.success());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = running.0.try_wait()? {
            break exit;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(exit.success(), "{exit}");
    Ok(())
}
