//! Operator: reconciles `PushCluster` resources into comet, logic and job
//! deployments, scales comets by connections and drains them before removal.
//!
//! `§N` refers to docs/protocol.md.
//!
//! # Layout
//! - [`crd`]: the resource types (source of the CRD, `herald crdgen`); the
//!   status types in `crd::status`.
//! - [`validate`] → [`build`] → [`controller`]: the reconcile pipeline;
//!   `controller` holds the pipeline, one submodule per step (fetch,
//!   observe comets and node list, dependencies (what unready pods say),
//!   autoscale, drain, apply, status, events, teardown on deletion, error
//!   policy); `build` keeps the Deployments in `build::workloads`.
//! - [`load`]: the comet admin calls and the node-list document.
//! - [`scale`]: pure scaling and drain decisions.
//! - [`metrics`]: what `/metrics` reports.
//! - [`run`] / [`lead`]: leader election (a coordination.k8s.io Lease) around the
//!   controllers, so that of several replicas only one ever acts.

pub mod build;
mod config;
pub mod controller;
pub mod crd;
pub mod load;
pub mod metrics;
pub mod rollout;
pub mod scale;
pub mod validate;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use herald_runtime::{Shutdown, admin, listen};
use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tracing::{Instrument, info, info_span, warn};

pub use build::ServiceAddresses;
pub use config::{Args, Config};
pub use metrics::Metrics;

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable kubeconfig or in-cluster config.
    #[error("cannot build a Kubernetes client")]
    Client(#[source] kube::Error),
    /// The Lease could not be read or created.
    #[error("cannot set up leader election")]
    Lease(#[source] kube_lease_manager::LeaseManagerError),
    /// The metrics listener could not be bound.
    #[error(transparent)]
    Bind(#[from] listen::BindError),
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

/// What the operator listens on; bound before [`run`] so tests can use port 0.
#[derive(Debug)]
pub struct Listeners {
    /// `/metrics`, `/healthz`, `/readyz`.
    pub metrics: tokio::net::TcpListener,
}

impl Listeners {
    /// Binds the metrics address.
    ///
    /// # Errors
    /// The bind failing.
    pub async fn bind(metrics: SocketAddr) -> Result<Self> {
        Ok(Listeners {
            metrics: listen::bind(metrics).await?,
        })
    }
}

/// Serves `/metrics` and runs the operator until `shutdown`.
///
/// # Errors
/// See [`Error`].
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let client = Client::try_default().await.map_err(Error::Client)?;
    crd_installed(&client, &config.namespaces).await?;
    if let Ok(addr) = listeners.metrics.local_addr() {
        info!(%addr, "metrics listening");
    }
    let metrics = Arc::new(Metrics::default());
    let shutdown = Shutdown::on(shutdown);
    let server = tokio::spawn(
        admin::serve(listeners.metrics, metrics.clone(), shutdown.wait())
            .instrument(info_span!("metrics")),
    );
    let result = lead(client, config, metrics, shutdown.wait()).await;
    // Also when leading failed (no Lease) without a shutdown: the metrics
    // server would otherwise keep `run` from returning.
    shutdown.trigger();
    match server.await {
        Ok(Err(err)) => warn!(cause = %err, "metrics listener failed"),
        Err(err) => warn!(cause = %err, "metrics task failed"),
        Ok(Ok(())) => {}
    }
    result
}

/// Fails fast when PushClusters are not served: a controller started without
/// its CRD waits for a store that never fills, and would not even stop.
/// Lists where the operator will watch (the first of `namespaces`, or all
/// namespaces when none is given), so it needs no right beyond its watches:
/// with namespaced Roles a cluster-wide list is forbidden, and an unknown
/// resource answers 404 in a namespace too.
async fn crd_installed(client: &Client, namespaces: &[String]) -> Result<()> {
    let api: kube::Api<crd::PushCluster> = match namespaces.first() {
        Some(namespace) => kube::Api::namespaced(client.clone(), namespace),
        None => kube::Api::all(client.clone()),
    };
    match api.list(&kube::api::ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Err(Error::CrdMissing),
        Err(err) => Err(Error::Probe(err)),
    }
}

/// How long stopping controllers may take before they are aborted: in-flight
/// reconciles are short API calls, a drain waits across passes, not within one.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Runs the controllers while this instance holds the Lease, until
/// `shutdown`; [`run`] without the metrics server, for tests that read
/// `metrics` directly.
/// On losing the Lease the controllers stop (after in-flight passes) and the
/// instance waits to win it again.
///
/// # Errors
/// [`Error::Lease`] when the Lease cannot be set up.
pub async fn lead(
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
        metrics_addr: _,
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
