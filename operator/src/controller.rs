//! The reconcile of one `PushCluster`, as a short pipeline:
//! fetch (Secrets, comet pods, current children) → validate → poll comet load
//! → scaling and drain decision → build → apply (server-side, one field
//! manager, forced) → node list → status (patched only when it changed).
//!
//! A pass that changes nothing writes nothing: server-side apply of an
//! unchanged object is a no-op in the apiserver, the node list is written only
//! when its content moves, and the status only when it differs.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use herald_protocol::pb::admin::{DrainRequest, LoadReply};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::{info, warn};

use crate::build::{self, MANAGER, Names, ServiceAddresses};
use crate::crd::{
    CometPodStatus, ComponentStatus, Condition, PushCluster, PushClusterSpec, PushClusterStatus,
};
use crate::load::{self, Node, NodeList};
use crate::metrics::Metrics;
use crate::scale::{self, CometPod, DownWindow, DrainStep};
use crate::validate;

/// Annotation on a comet pod the operator is draining: unix seconds of start.
pub const DRAIN_ANNOTATION: &str = "herald.dev/drain-started";
/// Kubernetes' hint to the ReplicaSet controller of which pod to remove first.
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

/// A reconcile step that failed; named for metrics and Events.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Building children failed (a bug).
    #[error("building children")]
    Build(#[from] build::Error),
    /// Reading from the apiserver failed.
    #[error("reading {what}")]
    Fetch {
        /// What was read.
        what: &'static str,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// Writing to the apiserver failed.
    #[error("writing {what}")]
    Apply {
        /// What was written.
        what: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// Serialising the node list or status failed (a bug).
    #[error("encoding")]
    Encode(#[from] serde_json::Error),
    /// `--service-addresses=cluster-ip`, but the Service has no ClusterIP.
    #[error("Service {0} has no ClusterIP")]
    NoClusterIp(String),
}

impl Error {
    /// Low-cardinality label for the error counter.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Build(_) => "build",
            Self::Fetch { .. } => "fetch",
            Self::Apply { .. } => "apply",
            Self::Encode(_) => "encode",
            Self::NoClusterIp(_) => "no_cluster_ip",
        }
    }
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shared by every reconcile.
pub struct Context {
    client: Client,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    poll_interval: Duration,
    service_addresses: ServiceAddresses,
    call_timeout: Duration,
    /// Scale-down windows per PushCluster (`namespace/name`). In memory: a new
    /// leader starts the window afresh, which only delays a scale-down.
    windows: Mutex<HashMap<String, DownWindow>>,
}

impl std::fmt::Debug for Context {
    // Client and Recorder have no Debug; the settings are what matters in logs.
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
        let reporter = Reporter {
            controller: MANAGER.to_owned(),
            instance: Some(identity.to_owned()),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            poll_interval,
            service_addresses,
            call_timeout: Duration::from_secs(2),
            windows: Mutex::new(HashMap::new()),
        }
    }
}

/// Runs the controller for one namespace (or all, with `None`) until
/// `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
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
    Controller::new(api::<PushCluster>(&client, ns), watcher::Config::default())
        .owns(api::<Deployment>(&client, ns), owned.clone())
        .owns(api::<Service>(&client, ns), owned.clone())
        .owns(api::<ConfigMap>(&client, ns), owned.clone())
        .owns(api::<Secret>(&client, ns), owned.clone())
        .owns(api::<ServiceAccount>(&client, ns), owned.clone())
        .owns(api::<Role>(&client, ns), owned.clone())
        .owns(api::<RoleBinding>(&client, ns), owned.clone())
        .owns(api::<PodDisruptionBudget>(&client, ns), owned)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

fn error_policy(cluster: Arc<PushCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(cluster = %cluster.name_any(), cause = %error, kind = error.label(), "reconcile failed");
    ctx.metrics.reconcile_error(error.label());
    // Transient (apiserver, network): look again soon; the controller's own
    // backoff stretches this when the same object keeps failing.
    Action::requeue(Duration::from_secs(5))
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

/// What reconcile reads before deciding.
struct Fetched {
    secrets: BTreeMap<String, Vec<String>>,
    comet_deployment: Option<Deployment>,
    pods: Vec<Pod>,
    node_list: Option<NodeList>,
    api_key_exists: bool,
}

async fn get_opt<K>(api: &Api<K>, name: &str, what: &'static str) -> Result<Option<K>>
where
    K: Clone + DeserializeOwned + std::fmt::Debug,
{
    api.get_opt(name)
        .await
        .map_err(|source| Error::Fetch { what, source })
}

async fn fetch(client: &Client, names: &Names, spec: &PushClusterSpec) -> Result<Fetched> {
    let ns = &names.namespace;
    let secret_api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut secrets = BTreeMap::new();
    for reference in validate::referenced_secrets(spec) {
        if let Some(secret) = get_opt(&secret_api, &reference.name, "a referenced Secret").await? {
            let mut keys: Vec<String> = secret.data.unwrap_or_default().into_keys().collect();
            keys.extend(secret.string_data.unwrap_or_default().into_keys());
            secrets.insert(reference.name.clone(), keys);
        }
    }
    let api_key_exists = get_opt(&secret_api, &names.api_key(), "the API-key Secret")
        .await?
        .is_some();
    let comet_deployment = get_opt(
        &Api::<Deployment>::namespaced(client.clone(), ns),
        &names.component("comet"),
        "the comet Deployment",
    )
    .await?;
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&names.selector("comet")))
        .await
        .map_err(|source| Error::Fetch {
            what: "comet pods",
            source,
        })?
        .items;
    let node_list = get_opt(
        &Api::<ConfigMap>::namespaced(client.clone(), ns),
        &names.nodes(),
        "the node list",
    )
    .await?
    .and_then(|cm| cm.data?.remove(build::NODES_KEY))
    .and_then(|body| serde_json::from_str(&body).ok());
    Ok(Fetched {
        secrets,
        comet_deployment,
        pods,
        node_list,
        api_key_exists,
    })
}

/// A comet pod with its address and the answer to `Load`, if any.
struct Polled {
    name: String,
    ip: Option<String>,
    ready: bool,
    terminating: bool,
    drain_started: Option<u64>,
    load: Option<LoadReply>,
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

async fn poll(ctx: &Context, spec: &PushClusterSpec, pods: &[Pod]) -> Vec<Polled> {
    let port = spec.comet.ports.grpc;
    let calls = pods.iter().map(|pod| async move {
        let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
        let ready = pod_ready(pod) && ip.is_some();
        // Unready pods are polled too: a draining comet reports itself unready
        // while it still holds clients.
        let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        let load = match (&ip, running) {
            (Some(ip), true) => match load::load(&format!("{ip}:{port}"), ctx.call_timeout).await {
                Ok(reply) => Some(reply),
                Err(err) => {
                    warn!(pod = %pod.name_any(), cause = %err, "comet load poll failed");
                    ctx.metrics.poll_error();
                    None
                }
            },
            _ => None,
        };
        Polled {
            name: pod.name_any(),
            ip,
            ready,
            terminating: pod.metadata.deletion_timestamp.is_some(),
            drain_started: pod
                .annotations()
                .get(DRAIN_ANNOTATION)
                .and_then(|v| v.parse().ok()),
            load,
        }
    });
    futures::future::join_all(calls).await
}

async fn publish(
    ctx: &Context,
    cluster: &PushCluster,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: reason.to_owned(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&event, &cluster.object_ref(&())).await {
        warn!(cause = %err, reason, "cannot publish event");
    }
}

async fn apply<K>(client: &Client, namespace: &str, object: &K) -> Result<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let name = object.name_any();
    Api::<K>::namespaced(client.clone(), namespace)
        .patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(object),
        )
        .await
        .map_err(|source| Error::Apply {
            what: format!("{} {name}", K::kind(&())),
            source,
        })
}

/// One reconcile pass; see the module doc for the pipeline.
///
/// # Errors
/// Apiserver errors; the error policy requeues them.
#[tracing::instrument(skip_all, fields(cluster = %cluster.name_any()))]
pub async fn reconcile(cluster: Arc<PushCluster>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconcile_started();
    let names = Names::of(&cluster)?;
    let spec = &cluster.spec;
    let previous = cluster.status.clone().unwrap_or_default();

    let fetched = fetch(&ctx.client, &names, spec).await?;
    if let Err(invalid) = validate::check(spec, &fetched.secrets) {
        return degrade(&ctx, &cluster, &names, &previous, invalid).await;
    }
    let polled = poll(&ctx, spec, &fetched.pods).await;
    let spec_replicas = autoscale(&ctx, &cluster, &names, &polled).await?;
    let comet_replicas = drain(&ctx, &cluster, &names, &fetched, &polled, spec_replicas).await?;
    let deployments = apply_children(&ctx, &cluster, &names, &fetched, comet_replicas).await?;
    let node_list = write_node_list(&ctx, &names, spec, &fetched, &polled).await?;

    let status = compute_status(
        &cluster,
        &names,
        &previous,
        &deployments,
        &polled,
        spec_replicas,
        node_list.generation,
    );
    let was_degraded = previous
        .conditions
        .iter()
        .any(|c| c.type_ == "Degraded" && c.status == "True");
    if was_degraded {
        publish(
            &ctx,
            &cluster,
            EventType::Normal,
            "Recovered",
            "spec is valid again".to_owned(),
        )
        .await;
    }
    write_status(&ctx.client, &names, &previous, status).await?;
    ctx.metrics.reconcile_ok();
    Ok(Action::requeue(ctx.poll_interval))
}

/// An invalid spec: `Degraded` with the reason, nothing built. Only a spec
/// change can fix a spec error; a missing Secret is looked for again.
async fn degrade(
    ctx: &Context,
    cluster: &PushCluster,
    names: &Names,
    previous: &PushClusterStatus,
    invalid: validate::Invalid,
) -> Result<Action> {
    let mut status = previous.clone();
    status.observed_generation = cluster.metadata.generation;
    status.selector = Some(names.selector("comet"));
    set_condition(
        &mut status.conditions,
        "Degraded",
        true,
        invalid.reason,
        &invalid.message,
    );
    set_condition(
        &mut status.conditions,
        "Available",
        false,
        "Degraded",
        &invalid.message,
    );
    if !condition_is(&previous.conditions, "Degraded", true, invalid.reason) {
        publish(
            ctx,
            cluster,
            EventType::Warning,
            invalid.reason,
            invalid.message.clone(),
        )
        .await;
    }
    write_status(&ctx.client, names, previous, status).await?;
    ctx.metrics.reconcile_ok();
    Ok(if invalid.spec_only {
        Action::await_change()
    } else {
        // A Secret appearing is not watched: look again every few polls.
        Action::requeue(ctx.poll_interval * 4)
    })
}

/// The operator's own autoscaler: writes its decision through `/scale` (as
/// an HPA would) and returns the comet count the spec now asks for.
async fn autoscale(
    ctx: &Context,
    cluster: &PushCluster,
    names: &Names,
    polled: &[Polled],
) -> Result<i32> {
    let current = cluster.spec.comet.replicas;
    let auto = &cluster.spec.comet.autoscaling;
    if !auto.enabled {
        return Ok(current);
    }
    let total: u64 = polled
        .iter()
        .filter_map(|p| p.load.as_ref().map(|l| l.connections))
        .sum();
    let wanted = scale::wanted(
        total,
        auto.target_connections_per_replica,
        auto.min_replicas,
        auto.max_replicas,
    );
    let next = {
        let mut windows = ctx.windows.lock().unwrap_or_else(|e| e.into_inner());
        let window = windows
            .entry(format!("{}/{}", names.namespace, names.cluster))
            .or_default();
        let stabilization =
            Duration::from_secs(u64::try_from(auto.scale_down_stabilization_seconds).unwrap_or(0));
        scale::next_replicas(current, wanted, stabilization, since_epoch(), window)
    };
    if next != current {
        Api::<PushCluster>::namespaced(ctx.client.clone(), &names.namespace)
            .patch_scale(
                &names.cluster,
                &merge_params(),
                &Patch::Merge(json!({"spec": {"replicas": next}})),
            )
            .await
            .map_err(|source| Error::Apply {
                what: "PushCluster /scale".to_owned(),
                source,
            })?;
        publish(
            ctx,
            cluster,
            EventType::Normal,
            "ScaledComets",
            format!("comets {current} -> {next} for {total} connections"),
        )
        .await;
    }
    Ok(next)
}

/// Drain before removal, whoever lowered the count; returns the replicas the
/// comet Deployment gets on this pass.
async fn drain(
    ctx: &Context,
    cluster: &PushCluster,
    names: &Names,
    fetched: &Fetched,
    polled: &[Polled],
    spec_replicas: i32,
) -> Result<i32> {
    let deployed = fetched
        .comet_deployment
        .as_ref()
        .and_then(|d| d.spec.as_ref()?.replicas)
        .unwrap_or(spec_replicas);
    let comet_pods: Vec<CometPod> = polled
        .iter()
        .map(|p| CometPod {
            name: p.name.clone(),
            ready: p.ready,
            connections: p.load.as_ref().map(|l| l.connections),
            drain_started: p.drain_started,
            terminating: p.terminating,
        })
        .collect();
    let deadline =
        Duration::from_secs(u64::try_from(cluster.spec.comet.drain.deadline_seconds).unwrap_or(0));
    let step = scale::drain_step(spec_replicas, deployed, &comet_pods, deadline, now_secs());
    carry_out(ctx, cluster, names, &cluster.spec, polled, step).await
}

/// Builds and applies every child. Order matters: what pods reference
/// (ServiceAccount, ConfigMap, Secrets) exists before the Deployments, else
/// the ReplicaSets fail to create pods and back off. Returns the applied
/// Deployments (comet, logic, job) with their current status.
async fn apply_children(
    ctx: &Context,
    cluster: &PushCluster,
    names: &Names,
    fetched: &Fetched,
    comet_replicas: i32,
) -> Result<Vec<Deployment>> {
    let client = &ctx.client;
    let spec = &cluster.spec;
    let logic = names.component("logic");
    let mut children = build::children(names, spec, comet_replicas, &logic)?;
    let ns = names.namespace.as_str();
    apply(client, ns, &children.service_account).await?;
    apply(client, ns, &children.role).await?;
    apply(client, ns, &children.role_binding).await?;
    apply(client, ns, &children.config).await?;
    if spec.auth.api_key_secret_ref.is_none() && !fetched.api_key_exists {
        create_api_key(client, names).await?;
        publish(
            ctx,
            cluster,
            EventType::Normal,
            "GeneratedApiKey",
            format!("Secret {}", names.api_key()),
        )
        .await;
    }
    let mut logic_ip = None;
    for service in &children.services {
        let applied = apply(client, ns, service).await?;
        if applied.name_any() == logic {
            logic_ip = applied.spec.and_then(|s| s.cluster_ip);
        }
    }
    // The ClusterIP exists only once the Service does: rebuild with it.
    if ctx.service_addresses == ServiceAddresses::ClusterIp {
        let ip = logic_ip.filter(|ip| !ip.is_empty() && ip != "None");
        let ip = ip.ok_or_else(|| Error::NoClusterIp(logic.clone()))?;
        children = build::children(names, spec, comet_replicas, &ip)?;
    }
    let mut deployments = Vec::new();
    for deployment in &children.deployments {
        deployments.push(apply(client, ns, deployment).await?);
    }
    for pdb in &children.pdbs {
        apply(client, ns, pdb).await?;
    }
    Ok(deployments)
}

/// The node list from this poll; written only when it changed.
async fn write_node_list(
    ctx: &Context,
    names: &Names,
    spec: &PushClusterSpec,
    fetched: &Fetched,
    polled: &[Polled],
) -> Result<NodeList> {
    let nodes = polled.iter().filter_map(|p| node(spec, p)).collect();
    let node_list = load::next(fetched.node_list.as_ref(), nodes, &now_rfc3339());
    if fetched.node_list.as_ref() != Some(&node_list) {
        let body = serde_json::to_string(&node_list)?;
        apply(
            &ctx.client,
            &names.namespace,
            &build::nodes_config_map(names, &body)?,
        )
        .await?;
    }
    Ok(node_list)
}

/// A comet's node-list entry, if it belongs in the list: it answered the
/// poll and is ready, or draining (job still pushes to its clients). An
/// unready comet that is not draining (e.g. logic unreachable) is no place
/// for clients.
fn node(spec: &PushClusterSpec, p: &Polled) -> Option<Node> {
    let load = p.load.as_ref()?;
    let ip = p.ip.clone()?;
    let draining = load.draining || p.drain_started.is_some();
    if !p.ready && !draining {
        return None;
    }
    Some(Node {
        name: p.name.clone(),
        grpc: format!("{ip}:{}", spec.comet.ports.grpc),
        hosts: [spec.node_list.domain.clone()]
            .into_iter()
            .filter(|d| !d.is_empty())
            .collect(),
        addrs: vec![ip],
        tcp_port: spec.comet.ports.tcp,
        ws_port: spec.comet.ports.ws,
        wss_port: spec.comet.ports.wss,
        weight: load::weight(
            load.connections,
            spec.comet.autoscaling.target_connections_per_replica,
            draining,
        ),
        connections: load.connections,
        client_ips: load.client_ips,
        draining,
    })
}

/// Carries out the drain step; returns the comet Deployment's replicas.
async fn carry_out(
    ctx: &Context,
    cluster: &PushCluster,
    names: &Names,
    spec: &PushClusterSpec,
    polled: &[Polled],
    step: DrainStep,
) -> Result<i32> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let annotate = |pod: String, key: &'static str, value: String| {
        let pods = pods.clone();
        async move {
            pods.patch(
                &pod,
                &merge_params(),
                &Patch::Merge(json!({"metadata": {"annotations": {key: value}}})),
            )
            .await
            .map_err(|source| Error::Apply {
                what: format!("annotation {key} on pod {pod}"),
                source,
            })
        }
    };
    match step {
        DrainStep::Set(replicas) => Ok(replicas),
        DrainStep::Wait { replicas, .. } => Ok(replicas),
        DrainStep::Start { pod, replicas } => {
            annotate(pod.clone(), DRAIN_ANNOTATION, now_secs().to_string()).await?;
            let others: Vec<String> = polled
                .iter()
                .filter(|p| p.name != pod && p.ready && p.drain_started.is_none())
                .filter_map(|p| p.ip.clone())
                .collect();
            let nodes = if spec.node_list.domain.is_empty() {
                others
            } else {
                vec![spec.node_list.domain.clone()]
            };
            let request = DrainRequest {
                deadline_ms: u64::try_from(spec.comet.drain.deadline_seconds).unwrap_or(0) * 1000,
                close_rate: u32::try_from(spec.comet.drain.close_rate).unwrap_or(0),
                nodes,
                tcp_port: spec.comet.ports.tcp,
                ws_port: spec.comet.ports.ws,
                wss_port: spec.comet.ports.wss,
                reconnect_within_ms: 2000,
            };
            let addr = polled
                .iter()
                .find(|p| p.name == pod)
                .and_then(|p| p.ip.clone())
                .map(|ip| format!("{ip}:{}", spec.comet.ports.grpc));
            // A failed Drain call is not retried here: the pod is marked, so
            // the deadline still bounds the wait and the pod is removed then.
            match addr {
                Some(addr) => match load::drain(&addr, request, ctx.call_timeout).await {
                    Ok(_) => {}
                    Err(err) => warn!(%pod, cause = %err, "drain call failed"),
                },
                None => warn!(%pod, "draining pod has no IP"),
            }
            info!(%pod, "comet drain started");
            publish(
                ctx,
                cluster,
                EventType::Normal,
                "DrainStarted",
                format!("draining comet {pod}"),
            )
            .await;
            Ok(replicas)
        }
        DrainStep::Finish { pod, replicas } => {
            annotate(pod.clone(), DELETION_COST, i32::MIN.to_string()).await?;
            info!(%pod, replicas, "comet drained; removing it");
            publish(
                ctx,
                cluster,
                EventType::Normal,
                "DrainFinished",
                format!("comet {pod} drained; comets -> {replicas}"),
            )
            .await;
            Ok(replicas)
        }
        DrainStep::Replace { pod, replicas } => {
            pods.delete(&pod, &Default::default())
                .await
                .map_err(|source| Error::Apply {
                    what: format!("delete drained pod {pod}"),
                    source,
                })?;
            publish(
                ctx,
                cluster,
                EventType::Normal,
                "ReplacedComet",
                format!("drained comet {pod} replaced after a scale-up"),
            )
            .await;
            Ok(replicas)
        }
    }
}

async fn create_api_key(client: &Client, names: &Names) -> Result<()> {
    let key: String = {
        use rand::Rng;
        let bytes: [u8; 24] = rand::rng().random();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    };
    let secret = build::api_key_secret(names, &key)?;
    match Api::<Secret>::namespaced(client.clone(), &names.namespace)
        .create(
            &PostParams {
                field_manager: Some(MANAGER.to_owned()),
                ..Default::default()
            },
            &secret,
        )
        .await
    {
        Ok(_) => Ok(()),
        // Another pass created it first: keep that value.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(source) => Err(Error::Apply {
            what: format!("Secret {}", names.api_key()),
            source,
        }),
    }
}

fn component_status(deployment: Option<&Deployment>) -> ComponentStatus {
    ComponentStatus {
        desired_replicas: deployment
            .and_then(|d| d.spec.as_ref()?.replicas)
            .unwrap_or(0),
        ready_replicas: deployment
            .and_then(|d| d.status.as_ref()?.ready_replicas)
            .unwrap_or(0),
    }
}

fn progressing(deployment: &Deployment) -> bool {
    let desired = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(0);
    let Some(status) = &deployment.status else {
        return true;
    };
    status.observed_generation < deployment.metadata.generation
        || status.updated_replicas.unwrap_or(0) < desired
        || status.replicas.unwrap_or(0) > desired
}

fn compute_status(
    cluster: &PushCluster,
    names: &Names,
    previous: &PushClusterStatus,
    deployments: &[Deployment],
    polled: &[Polled],
    spec_replicas: i32,
    node_list_generation: i64,
) -> PushClusterStatus {
    let comet = component_status(deployments.first());
    let logic = component_status(deployments.get(1));
    let job = component_status(deployments.get(2));
    let draining: Vec<&Polled> = polled
        .iter()
        .filter(|p| p.drain_started.is_some() && !p.terminating)
        .collect();
    let mut conditions = previous.conditions.clone();
    let all_ready = [&comet, &logic, &job]
        .iter()
        .all(|c| c.ready_replicas >= c.desired_replicas);
    let (reason, message) = if all_ready {
        (
            "AllReplicasReady",
            "every component has its replicas ready".to_owned(),
        )
    } else {
        (
            "ReplicasNotReady",
            format!(
                "ready/desired: comet {}/{}, logic {}/{}, job {}/{}",
                comet.ready_replicas,
                comet.desired_replicas,
                logic.ready_replicas,
                logic.desired_replicas,
                job.ready_replicas,
                job.desired_replicas
            ),
        )
    };
    set_condition(&mut conditions, "Available", all_ready, reason, &message);
    let rolling = deployments.iter().any(progressing) || comet.desired_replicas != spec_replicas;
    if rolling {
        set_condition(
            &mut conditions,
            "Progressing",
            true,
            "RollingOut",
            "deployments are converging on the spec",
        );
    } else {
        set_condition(
            &mut conditions,
            "Progressing",
            false,
            "Stable",
            "deployments match the spec",
        );
    }
    set_condition(
        &mut conditions,
        "Degraded",
        false,
        "Valid",
        "spec is valid and its Secrets exist",
    );
    match draining.first() {
        Some(pod) => set_condition(
            &mut conditions,
            "Draining",
            true,
            "CometDraining",
            &format!("draining comet {}", pod.name),
        ),
        None => set_condition(
            &mut conditions,
            "Draining",
            false,
            "NoDrain",
            "no comet is draining",
        ),
    }
    PushClusterStatus {
        observed_generation: cluster.metadata.generation,
        conditions,
        comets_ready: Some(format!("{}/{}", comet.ready_replicas, spec_replicas)),
        comet,
        logic,
        job,
        total_connections: i64::try_from(
            polled
                .iter()
                .filter_map(|p| p.load.as_ref().map(|l| l.connections))
                .sum::<u64>(),
        )
        .unwrap_or(i64::MAX),
        draining_comets: i32::try_from(draining.len()).unwrap_or(i32::MAX),
        pods: polled
            .iter()
            .map(|p| CometPodStatus {
                name: p.name.clone(),
                connections: p
                    .load
                    .as_ref()
                    .map_or(0, |l| i64::try_from(l.connections).unwrap_or(i64::MAX)),
                rooms: p
                    .load
                    .as_ref()
                    .map_or(0, |l| i64::try_from(l.rooms).unwrap_or(i64::MAX)),
                draining: p.drain_started.is_some() || p.load.as_ref().is_some_and(|l| l.draining),
            })
            .collect(),
        node_list_generation,
        selector: Some(names.selector("comet")),
    }
}

fn condition_is(conditions: &[Condition], type_: &str, status: bool, reason: &str) -> bool {
    conditions.iter().any(|c| {
        c.type_ == type_ && c.status == if status { "True" } else { "False" } && c.reason == reason
    })
}

/// Sets a condition, keeping `lastTransitionTime` unless the status flips.
fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
) {
    let status = if status { "True" } else { "False" };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => {
            if existing.status != status {
                existing.last_transition_time = now_rfc3339();
            }
            existing.status = status.to_owned();
            existing.reason = reason.to_owned();
            existing.message = message.to_owned();
        }
        None => conditions.push(Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message: message.to_owned(),
            last_transition_time: now_rfc3339(),
        }),
    }
}

async fn write_status(
    client: &Client,
    names: &Names,
    previous: &PushClusterStatus,
    status: PushClusterStatus,
) -> Result<()> {
    if *previous == status {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": "herald.dev/v1alpha1", "kind": "PushCluster",
        "status": status,
    });
    Api::<PushCluster>::namespaced(client.clone(), &names.namespace)
        .patch_status(
            &names.cluster,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| Error::Apply {
            what: "PushCluster status".to_owned(),
            source,
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn polled(ready: bool, drain_started: Option<u64>, load: Option<LoadReply>) -> Polled {
        Polled {
            name: "chat-comet-1".to_owned(),
            ip: Some("127.0.0.9".to_owned()),
            ready,
            terminating: false,
            drain_started,
            load,
        }
    }

    #[test]
    fn node_list_entries_follow_readiness_and_drain() {
        let spec: PushClusterSpec = serde_json::from_value(json!({
            "image": "i", "redis": {"addr": "r:1"}, "kafka": {"brokers": ["k:1"]},
            "nodeList": {"domain": "push.example.com"}
        }))
        .unwrap();
        let load = LoadReply {
            connections: 7,
            client_ips: 3,
            ..LoadReply::default()
        };
        let entry = node(&spec, &polled(true, None, Some(load.clone()))).unwrap();
        assert_eq!(entry.grpc, "127.0.0.9:3109");
        assert_eq!(entry.hosts, ["push.example.com"]);
        assert_eq!(
            (entry.connections, entry.client_ips, entry.draining),
            (7, 3, false)
        );
        assert!(entry.weight > 0);
        assert!(
            node(&spec, &polled(false, None, Some(load.clone()))).is_none(),
            "unready, not draining"
        );
        let draining = node(&spec, &polled(false, Some(1), Some(load))).unwrap();
        assert_eq!((draining.draining, draining.weight), (true, 0));
        assert!(
            node(&spec, &polled(true, None, None)).is_none(),
            "no answer to Load"
        );
    }

    #[test]
    fn transition_time_kept_unless_status_flips() {
        let mut conditions = Vec::new();
        set_condition(&mut conditions, "Available", false, "A", "m");
        conditions[0].last_transition_time = "old".to_owned();
        set_condition(&mut conditions, "Available", false, "B", "m2");
        assert_eq!(conditions[0].last_transition_time, "old");
        assert_eq!(conditions[0].reason, "B");
        set_condition(&mut conditions, "Available", true, "C", "m3");
        assert_ne!(conditions[0].last_transition_time, "old");
        assert!(condition_is(&conditions, "Available", true, "C"));
    }
}
