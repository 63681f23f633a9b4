//! The reconcile of one `PushCluster`, as a short pipeline:
//! fetch (Secrets, comet pods, current children) → validate → poll comet load
//! → scaling and drain decision → build → apply (server-side, one field
//! manager, forced) → node list → status (patched only when it changed).
//!
//! A PushCluster being deleted takes another, short path (`teardown`): its
//! comets are drained before its finalizer lets the children go.
//!
//! A spec error (what admission refuses) stops the pipeline before polling.
//! A referenced Secret that is missing does not: the running cluster is
//! still polled, scaled, drained and reported, and only the apply step
//! shrinks to the comet replicas until the Secret exists.
//!
//! A pass that changes nothing writes nothing: server-side apply of an
//! unchanged object is a no-op in the apiserver, the node list is written only
//! when its content moves, and the status only when it differs.
//!
//! This file holds the pipeline ([`reconcile`]), its [`Context`] and the
//! controller loop ([`run`]); each step lives in its own module: `fetch`,
//! `observe` (load poll and node list), `autoscale`, `drain`, `apply`,
//! `status` (status, conditions, Events, `Degraded`), `events` (publishing
//! them), `teardown` (the finalizer) and `error` (the step errors and the
//! error policy).

mod apply;
mod autoscale;
mod dependencies;
mod drain;
mod error;
mod events;
mod fetch;
mod observe;
mod rollout;
mod status;
mod teardown;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};

use self::apply::{apply_base, apply_workloads, scale_only};
use self::autoscale::autoscale;
use self::error::error_policy;
pub use self::error::{Error, Result};
use self::fetch::fetch;
use self::observe::{poll, write_node_list};
use self::status::{Observed, compute_status, degrade, report_degraded, write_status};
pub use self::teardown::FINALIZER;
use self::teardown::{ensure_finalizer, teardown};
use crate::build::{self, MANAGER, Names, ServiceAddresses};
use crate::crd::PushCluster;
use crate::metrics::Metrics;
use crate::scale::DownWindow;
use crate::validate;

/// Annotation on a comet pod the operator is draining: unix seconds of start.
pub const DRAIN_ANNOTATION: &str = "herald.dev/drain-started";
/// Kubernetes' hint to the ReplicaSet controller of which pod to remove first.
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
/// [`DELETION_COST`] of a drained comet: the one the ReplicaSet removes.
const DRAINED_COST: &str = "-2147483648";

/// Shared by every reconcile.
pub struct Context {
    client: Client,
    events: events::Events,
    metrics: Arc<Metrics>,
    poll_interval: Duration,
    service_addresses: ServiceAddresses,
    call_timeout: Duration,
    /// Scale-down windows per PushCluster (`namespace/name`). In memory: a new
    /// leader starts the window afresh, which only delays a scale-down.
    windows: Mutex<HashMap<String, DownWindow>>,
    /// The uid of each child last applied (`namespace/Kind/name`), to tell a
    /// recreated child in the log. In memory: a new leader knows none yet.
    children: Mutex<HashMap<String, String>>,
    /// The comet count last acted on per PushCluster (`namespace/name`), so a
    /// pass that gets the PushCluster one write behind (its own `/scale` or
    /// status not yet in the watch cache) neither undoes nor re-announces it.
    scaled: Mutex<HashMap<String, autoscale::Handled>>,
    /// The `Degraded` reason and message last reported per PushCluster, for
    /// the same reason.
    degraded: Mutex<HashMap<String, Option<(String, String)>>>,
}

impl std::fmt::Debug for Context {
    // Client and Events have no Debug; the settings are what matters in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("poll_interval", &self.poll_interval)
            .field("call_timeout", &self.call_timeout)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context for reconciles made through `client`.
    pub fn new(
        client: Client,
        identity: &str,
        metrics: Arc<Metrics>,
        poll_interval: Duration,
        service_addresses: ServiceAddresses,
    ) -> Self {
        Self {
            events: events::Events::new(client.clone(), MANAGER, identity),
            client,
            metrics,
            poll_interval,
            service_addresses,
            call_timeout: Duration::from_secs(2),
            windows: Mutex::new(HashMap::new()),
            children: Mutex::new(HashMap::new()),
            scaled: Mutex::new(HashMap::new()),
            degraded: Mutex::new(HashMap::new()),
        }
    }
}

impl Context {
    /// Drops what is remembered per PushCluster in `namespace` (all with
    /// `None`).
    fn forget(&self, namespace: Option<&str>) {
        let prefix = namespace.map(|ns| format!("{ns}/"));
        let keep = |key: &String| prefix.as_ref().is_some_and(|p| !key.starts_with(p));
        fn retain<V>(map: &Mutex<HashMap<String, V>>, keep: impl Fn(&String) -> bool) {
            map.lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|key, _| keep(key));
        }
        retain(&self.windows, keep);
        retain(&self.children, keep);
        retain(&self.scaled, keep);
        retain(&self.degraded, keep);
    }
}

/// Runs the controller for one namespace (or all, with `None`) until
/// `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    // What an earlier term of leadership remembered may be outdated by
    // another leader's passes since.
    ctx.forget(namespace.as_deref());
    let client = ctx.client.clone();
    fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let ns = namespace.as_deref();
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=herald-operator");
    let controller = Controller::new(api::<PushCluster>(&client, ns), watcher::Config::default())
        .owns(api::<Deployment>(&client, ns), owned.clone())
        .owns(api::<ReplicaSet>(&client, ns), owned.clone())
        .owns(api::<NetworkPolicy>(&client, ns), owned.clone())
        .owns(api::<Service>(&client, ns), owned.clone())
        .owns(api::<ConfigMap>(&client, ns), owned.clone())
        .owns(api::<Secret>(&client, ns), owned.clone())
        .owns(api::<ServiceAccount>(&client, ns), owned.clone())
        .owns(api::<Role>(&client, ns), owned.clone())
        .owns(api::<RoleBinding>(&client, ns), owned.clone())
        .owns(api::<PodDisruptionBudget>(&client, ns), owned)
        .graceful_shutdown_on(shutdown);
    // A cluster deleted without a teardown pass (no finalizer yet, or one
    // removed by hand) still loses its series: checked against the
    // controller's own cache every poll.
    let store = controller.store();
    let (metrics, every) = (ctx.metrics.clone(), ctx.poll_interval);
    let prune = async move {
        if store.wait_until_ready().await.is_err() {
            return futures::future::pending().await;
        }
        loop {
            tokio::time::sleep(every).await;
            metrics.retain_clusters(|namespace, name| {
                store
                    .get(&kube::runtime::reflector::ObjectRef::new(name).within(namespace))
                    .is_some()
            });
        }
    };
    let run = controller
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()));
    tokio::select! {
        () = run => {}
        () = prune => {}
    }
}

/// One reconcile pass; see the module doc for the pipeline.
///
/// # Errors
/// Apiserver errors; the error policy requeues them.
#[tracing::instrument(skip_all, fields(cluster = %cluster.name_any()))]
pub async fn reconcile(cluster: Arc<PushCluster>, ctx: Arc<Context>) -> Result<Action> {
    let _pass = ctx.metrics.reconcile_started(&cluster);
    let names = Names::of(&cluster)?;
    let spec = &cluster.spec;
    let previous = cluster.status.clone().unwrap_or_default();
    if cluster.metadata.deletion_timestamp.is_some() {
        let action = teardown(&ctx, &cluster, &names).await?;
        ctx.metrics.reconcile_ok();
        return Ok(action);
    }
    ensure_finalizer(&ctx, &cluster, &names).await;

    let fetched = fetch(&ctx.client, &names, spec).await?;
    if let Err(invalid) = validate::check_spec(spec) {
        return degrade(&ctx, &cluster, &names, &previous, invalid).await;
    }
    // Missing Secrets keep the spec from being applied, not the running
    // cluster from being observed, scaled and reported.
    let missing = validate::missing_secrets(spec, &fetched.secrets);
    let mut polled = poll(&ctx, spec, &fetched.pods, &fetched.grpc_token).await;
    let findings =
        dependencies::probe(&ctx, spec, &fetched.cluster_pods, &fetched.replica_sets).await;
    let scaled = autoscale(&ctx, &cluster, &names, &previous, &polled).await?;
    let children = match &missing {
        None => Some(apply_base(&ctx, &cluster, &names, &fetched, scaled.replicas).await?),
        Some(_) => None,
    };
    let revision = children
        .as_ref()
        .and_then(|c| c.comet_replica_set.as_ref())
        .and_then(|rs| rs.labels().get(build::REVISION_LABEL).cloned());
    let comets = rollout::plan(
        &ctx,
        &cluster,
        &names,
        &fetched,
        &mut polled,
        scaled.replicas,
        revision.as_deref(),
    )
    .await?;
    let deployments = match children {
        Some(children) => apply_workloads(&ctx, &names, children, &comets).await?,
        None => scale_only(&ctx, &names, &fetched, &comets).await?,
    };
    let node_list = write_node_list(&ctx, &names, spec, &fetched, &polled).await?;

    let observed = Observed {
        deployments: &deployments,
        polled: &polled,
        scaled: &scaled,
        comets: &comets,
        node_list_generation: node_list.generation,
        missing: missing.as_ref(),
        findings: &findings,
    };
    let status = compute_status(&cluster, &names, &previous, &observed);
    let stuck = comets.stuck(spec);
    report_degraded(
        &ctx,
        &cluster,
        &previous,
        missing.as_ref().or(stuck.as_ref()),
    )
    .await;
    write_status(&ctx.client, &names, &previous, status).await?;
    ctx.metrics.reconcile_ok();
    Ok(Action::requeue(ctx.poll_interval))
}

/// Merge patches (pod annotations, `/scale`) carry the same field manager as
/// the server-side applies, so `managedFields` names one writer.
fn merge_params() -> PatchParams {
    PatchParams {
        field_manager: Some(MANAGER.to_owned()),
        ..PatchParams::default()
    }
}

/// Wall-clock time since the Unix epoch (zero on a clock set before it).
fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

fn now_secs() -> u64 {
    since_epoch().as_secs()
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}
