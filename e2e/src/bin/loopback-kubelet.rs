//! Runs the loopback kubelet and the Service proxy by hand against the test
//! bed, to try the chart, the operator and a PushCluster with kubectl and
//! helm: `source target/testbed/env` first, then e.g.
//! `loopback-kubelet --herald target/debug/herald --namespace herald --namespace demo`.
//! Pods get API access as their ServiceAccount (as in a cluster) and every
//! ClusterIP Service of the namespaces answers on its ClusterIP.
//! Stops (and stops every process it started) on Ctrl-C or SIGTERM.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use herald_e2e::kubelet::{Config, IpPool, Kubelet, current_cluster};
use herald_e2e::service_proxy::ServiceProxy;
use tracing_subscriber::EnvFilter;

/// A stand-in kubelet + scheduler: pods become herald processes on 127.0.0.0/8 IPs.
#[derive(Debug, Parser)]
struct Args {
    /// Node name to register.
    #[arg(long, default_value = "loopback-0")]
    node: String,
    /// The herald binary every container runs.
    #[arg(long)]
    herald: PathBuf,
    /// Per-pod directories with container logs.
    #[arg(long, default_value = "target/loopback-kubelet")]
    run_dir: PathBuf,
    /// First and last pod IP (both inside 127.0.0.0/8).
    #[arg(long, default_value = "127.0.20.1")]
    first_ip: Ipv4Addr,
    #[arg(long, default_value = "127.0.20.254")]
    last_ip: Ipv4Addr,
    /// Schedule unbound pods of this namespace (repeatable).
    #[arg(long = "namespace")]
    namespaces: Vec<String>,
    /// Schedule unbound pods matching this label selector, in any namespace.
    #[arg(long)]
    selector: Option<String>,
    /// Give pods no API access (by default each gets a kubeconfig with a
    /// token of its ServiceAccount, so RBAC applies as in a cluster).
    #[arg(long)]
    no_api: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let Args {
        node,
        herald,
        run_dir,
        first_ip,
        last_ip,
        namespaces,
        selector,
        no_api,
    } = Args::parse();
    let pool = IpPool::new(first_ip, last_ip)?;
    let mut config = Config::new(&node, herald, run_dir, pool);
    config.namespaces = namespaces.clone();
    config.label_selector = selector;
    if !no_api {
        config.api_cluster = Some(current_cluster().map_err(anyhow::Error::msg)?);
    }
    let client = kube::Client::try_default()
        .await
        .context("no cluster: source the test bed's env (KUBECONFIG) first")?;
    let kubelet = Kubelet::start(client.clone(), config).await?;
    let proxy = ServiceProxy::start(client, namespaces);
    shutdown().await;
    proxy.stop().await;
    let exits = kubelet.stop().await;
    tracing::info!(processes = exits.len(), "stopped");
    Ok(())
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
