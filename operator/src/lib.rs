//! Operator: reconciles `PushCluster` resources into comet, logic and job
//! deployments, scales comets by connections and drains them before removal.
//!
//! `§N` refers to docs/protocol.md.
//!
//! # Layout
//! - [`crd`]: the resource types (source of the CRD, `herald crdgen`).
//! - [`validate`] → [`build`] → [`controller`]: the reconcile pipeline;
//!   `controller` holds the pipeline, one submodule per step (fetch,
//!   observe comets and node list, autoscale, drain, apply, status and
//!   Events, error policy).
//! - [`load`]: the comet admin calls and the node-list document.
//! - [`scale`]: pure scaling and drain decisions.
//! - [`metrics`]: `/metrics` and `/healthz`.
//! - [`run`]: leader election (a coordination.k8s.io Lease) around the
//!   controllers, so that of several replicas only one ever acts.

pub mod build;
pub mod controller;
pub mod crd;
pub mod load;
pub mod metrics;
pub mod scale;
pub mod validate;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tracing::{Instrument, info, info_span, warn};

pub use build::ServiceAddresses;
pub use metrics::Metrics;

/// `herald operator` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Namespaces whose PushClusters are reconciled (repeat or comma-separate);
    /// none means every namespace.
    #[arg(
        long = "namespace",
        env = "HERALD_OPERATOR_NAMESPACES",
        value_delimiter = ','
    )]
    pub namespaces: Vec<String>,
    /// HTTP listener for `/metrics` and `/healthz`.
    #[arg(
        long,
        env = "HERALD_OPERATOR_METRICS_ADDR",
        default_value = "0.0.0.0:3180"
    )]
    pub metrics_addr: SocketAddr,
    /// Name of the coordination.k8s.io Lease that elects the acting replica.
    #[arg(
        long,
        env = "HERALD_OPERATOR_LEASE_NAME",
        default_value = "herald-operator"
    )]
    pub lease_name: String,
    /// Namespace of the Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Lease holder identity; defaults to the pod name, else a random one.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Lease duration in seconds: how long a dead leader blocks a successor.
    #[arg(long, env = "HERALD_OPERATOR_LEASE_SECS", default_value_t = 15)]
    pub lease_secs: u64,
    /// How often each PushCluster's comets are polled for load, in milliseconds.
    #[arg(long, env = "HERALD_OPERATOR_POLL_MS", default_value_t = 5000)]
    pub poll_interval_ms: u64,
    /// How comet pods are given the logic Service's address: `dns` (its
    /// name) or `cluster-ip` (for clusters without DNS for pods).
    #[arg(
        long,
        env = "HERALD_OPERATOR_SERVICE_ADDRESSES",
        value_enum,
        default_value_t = ServiceAddresses::Dns
    )]
    pub service_addresses: ServiceAddresses,
}

/// Runtime settings of [`run`].
#[derive(Clone, Debug)]
pub struct Config {
    /// Namespaces watched; empty = all.
    pub namespaces: Vec<String>,
    /// Lease name.
    pub lease_name: String,
    /// Lease namespace.
    pub lease_namespace: String,
    /// Holder identity.
    pub identity: String,
    /// Lease duration.
    pub lease_secs: u64,
    /// Load poll interval.
    pub poll_interval: Duration,
    /// How pods are told Service addresses.
    pub service_addresses: ServiceAddresses,
}

impl Args {
    /// Splits the flags into the metrics address and the run settings.
    pub fn into_config(self) -> (SocketAddr, Config) {
        // Destructured so that a new flag cannot be silently ignored.
        let Args {
            namespaces,
            metrics_addr,
            lease_name,
            lease_namespace,
            identity,
            lease_secs,
            poll_interval_ms,
            service_addresses,
        } = self;
        let identity =
            identity.unwrap_or_else(|| format!("herald-operator-{:016x}", rand::random::<u64>()));
        (
            metrics_addr,
            Config {
                namespaces,
                lease_name,
                lease_namespace,
                identity,
                lease_secs,
                poll_interval: Duration::from_millis(poll_interval_ms),
                service_addresses,
            },
        )
    }
}

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable kubeconfig or in-cluster config.
    #[error("cannot build a Kubernetes client")]
    Client(#[source] kube::Error),
    /// The Lease could not be read or created.
    #[error("cannot set up leader election")]
    Lease(#[source] kube_lease_manager::LeaseManagerError),
    /// The metrics listener failed.
    #[error("metrics listener")]
    Metrics(#[source] std::io::Error),
    /// The API server does not serve PushClusters: the CRD is not installed.
    #[error(
        "the PushCluster CRD (pushclusters.herald.dev) is not installed: \
         kubectl apply --server-side -f crds/pushcluster.yaml (the Helm chart installs it)"
    )]
    CrdMissing,
    /// Checking for the CRD failed for another reason.
    #[error("cannot list PushClusters")]
    Probe(#[source] kube::Error),
}

/// Result of this crate's entry points.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Binds the metrics listener and runs the operator until `shutdown`.
///
/// # Errors
/// See [`Error`].
pub async fn main(
    args: Args,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (metrics_addr, config) = args.into_config();
    let client = Client::try_default().await.map_err(Error::Client)?;
    crd_installed(&client).await?;
    let listener = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .map_err(Error::Metrics)?;
    info!(addr = %metrics_addr, "metrics listening");
    let metrics = Arc::new(Metrics::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(
        metrics::serve(listener, metrics.clone(), {
            let mut stop = stop_rx.clone();
            async move {
                let _ = stop.wait_for(|s| *s).await;
            }
        })
        .instrument(info_span!("metrics")),
    );
    let result = run(client, config, metrics, async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    })
    .await;
    match server.await {
        Ok(Err(err)) => warn!(cause = %err, "metrics listener failed"),
        Err(err) => warn!(cause = %err, "metrics task failed"),
        Ok(Ok(())) => {}
    }
    result
}

/// Fails fast when PushClusters are not served: a controller started without
/// its CRD waits for a store that never fills, and would not even stop.
async fn crd_installed(client: &Client) -> Result<()> {
    let api: kube::Api<crd::PushCluster> = kube::Api::all(client.clone());
    match api.list(&kube::api::ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Err(Error::CrdMissing),
        Err(err) => Err(Error::Probe(err)),
    }
}

/// How long stopping controllers may take before they are aborted: in-flight
/// reconciles are short API calls, a drain waits across passes, not within one.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Runs the controllers while this instance holds the Lease, until `shutdown`.
/// On losing the Lease the controllers stop (after in-flight passes) and the
/// instance waits to win it again.
///
/// # Errors
/// [`Error::Lease`] when the Lease cannot be set up.
pub async fn run(
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let Config {
        namespaces,
        lease_name,
        lease_namespace,
        identity,
        lease_secs,
        poll_interval,
        service_addresses,
    } = config;
    let manager = LeaseManagerBuilder::new(client.clone(), lease_name)
        .with_namespace(lease_namespace)
        .with_identity(identity.clone())
        .with_duration(lease_secs.max(2))
        // Renew well before expiry: a third of the lease.
        .with_grace((lease_secs / 3).max(1))
        .build()
        .await
        .map_err(Error::Lease)?;
    let (mut leader, lease_task) = manager.watch().await;
    let ctx = Arc::new(controller::Context::new(
        client,
        &identity,
        metrics.clone(),
        poll_interval,
        service_addresses,
    ));
    let namespaces: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    let mut shutdown = std::pin::pin!(shutdown.fuse());
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            won = leader.wait_for(|l| *l) => if won.is_err() { break },
        }
        info!(%identity, "won the lease; reconciling");
        metrics.set_leader(true);
        let mut stops = Vec::new();
        let mut tasks = tokio::task::JoinSet::new();
        for namespace in &namespaces {
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            stops.push(stop);
            let span = info_span!(
                "controller",
                namespace = namespace.as_deref().unwrap_or("*")
            );
            tasks.spawn(
                controller::run(ctx.clone(), namespace.clone(), stopped.map(|_| ()))
                    .instrument(span),
            );
        }
        let stopping = tokio::select! {
            () = &mut shutdown => true,
            _ = leader.wait_for(|l| !*l) => false,
        };
        drop(stops);
        let joined = tokio::time::timeout(STOP_GRACE, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if joined.is_err() {
            warn!(grace = ?STOP_GRACE, "controllers did not stop in time; aborting them");
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        metrics.set_leader(false);
        if stopping {
            break;
        }
        warn!(%identity, "lost the lease; waiting to win it again");
    }
    // Dropping the receiver makes the lease task release the Lease, so a
    // successor need not wait for it to expire.
    drop(leader);
    match lease_task.await {
        Ok(Ok(_)) => {}
        Ok(Err(err)) => warn!(cause = %err, "releasing the lease failed"),
        Err(err) => warn!(cause = %err, "lease task failed"),
    }
    Ok(())
}
