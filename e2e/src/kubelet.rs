//! A loopback "kubelet + scheduler" for the e2e tests.
//!
//! The test bed runs a real kube-apiserver and kube-controller-manager but no
//! scheduler and no kubelet, so pods stay Pending. [`Kubelet`] fills that gap
//! with real processes and real API writes:
//!
//! - it registers a Node and keeps it Ready (Lease + status heartbeat);
//! - it binds unscheduled pods of the namespaces (or label selector) it is
//!   told to manage to that node, through `pods/binding`;
//! - for each pod on the node it lends a unique address from a 127.0.0.0/8
//!   pool and runs each container as a process of the `herald` binary with the
//!   container's args, the pod's env (Service link variables, `fieldRef`, ConfigMap/Secret refs) and
//!   `$(VAR)` expansion as kubelet does; `secret` and `emptyDir` volumes are
//!   directories under the pod's run directory, container paths under a
//!   `mountPath` in its args and env mapped onto them (`volume`);
//! - it writes pods/status (phase, podIP, containers, Ready from the readiness
//!   probe), restarts exited processes (and those failing their liveness
//!   probe) with back-off, and on deletion sends
//!   SIGTERM, waits the grace period, SIGKILLs, and removes the pod.
//!
//! Nothing it starts or dials is outside 127.0.0.0/8, and stopping it stops
//! every process it started, by pid.
//!
//! # Layout
//! `node` (Node + heartbeat) → scheduling (here) → `pod` (one task per pod:
//! processes, `probe`, status) with `expand` (env and args), `volume`
//! (Secret volumes and the path mapping) and `ippool`.
//! The pod task's steps are `pod::volumes`, `pod::start`, `pod::exit` (exits, restarts,
//! deletion), `pod::probes` and `pod::status`.

mod expand;
mod ippool;
mod node;
mod pod;
mod probe;
mod volume;

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{Binding, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info, info_span, warn};

pub use expand::expand;

/// The cluster of the current kubeconfig context (`KUBECONFIG`), for
/// [`Config::api_cluster`]: pods then reach the same API server.
///
/// # Errors
/// No kubeconfig, or its current context names no cluster.
pub fn current_cluster() -> std::result::Result<kube::config::Cluster, String> {
    let kubeconfig = kube::config::Kubeconfig::read().map_err(|e| e.to_string())?;
    let context = kubeconfig
        .current_context
        .as_deref()
        .ok_or("kubeconfig has no current context")?;
    let cluster = kubeconfig
        .contexts
        .iter()
        .find(|c| c.name == context)
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.clone())
        .ok_or("current context not found")?;
    kubeconfig
        .clusters
        .iter()
        .find(|c| c.name == cluster)
        .and_then(|c| c.cluster.clone())
        .ok_or_else(|| format!("cluster {cluster} not found"))
}
pub use ippool::{IpPool, PoolError};

/// Field manager and event source name of every write the harness makes.
pub const MANAGER: &str = "herald-loopback-kubelet";
/// Binding attempts per pod event, the first pause between them doubling.
const BIND_ATTEMPTS: u32 = 5;
const BIND_RETRY: Duration = Duration::from_millis(200);

/// Why the harness could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("registering node {node}")]
    RegisterNode {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("creating the run dir {dir}")]
    RunDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the herald binary {0} does not exist")]
    NoBinary(PathBuf),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the harness manages and how.
#[derive(Debug, Clone)]
pub struct Config {
    /// The Node to register and run pods for.
    pub node_name: String,
    /// The `herald` binary every container runs.
    pub herald_bin: PathBuf,
    /// Per-pod directories with one log file per container (stdout+stderr).
    pub run_dir: PathBuf,
    /// Pod IPs; see [`IpPool`].
    pub pool: IpPool,
    /// Bind unscheduled pods of these namespaces...
    pub namespaces: Vec<String>,
    /// ...and, anywhere, those matching this label selector.
    pub label_selector: Option<String>,
    /// First restart delay; doubles per crash up to `max_restart_backoff`.
    pub restart_backoff: Duration,
    pub max_restart_backoff: Duration,
    /// Lease and node status renewal period.
    pub heartbeat: Duration,
    /// How long processes get between SIGTERM and SIGKILL when the harness stops.
    pub shutdown_grace: Duration,
    /// When set, every process gets `KUBECONFIG` naming a kubeconfig for
    /// this cluster with a token of its pod's ServiceAccount, as a kubelet
    /// mounts one; `None` gives pods no API access.
    pub api_cluster: Option<kube::config::Cluster>,
}

impl Config {
    /// Defaults that suit tests: 1 s first back-off (max 10 s), 10 s heartbeat,
    /// 5 s shutdown grace; no namespaces managed yet.
    pub fn new(node_name: &str, herald_bin: PathBuf, run_dir: PathBuf, pool: IpPool) -> Config {
        Config {
            node_name: node_name.to_owned(),
            herald_bin,
            run_dir,
            pool,
            namespaces: Vec::new(),
            label_selector: None,
            restart_backoff: Duration::from_secs(1),
            max_restart_backoff: Duration::from_secs(10),
            heartbeat: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            api_cluster: None,
        }
    }
}

/// A container on the loopback node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerId {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

/// A process that ended, and which signals the harness had sent it.
#[derive(Debug, Clone)]
pub struct Exit {
    pub id: ContainerId,
    pub pid: u32,
    /// `"SIGTERM"`, `"SIGKILL"` in the order sent; empty if it exited on its own
    /// or was killed by someone else.
    pub signals_sent: Vec<&'static str>,
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

/// State shared by the harness's tasks.
struct Shared {
    client: Client,
    config: Config,
    pool: IpPool,
    // std Mutexes: each is held for one map or vec operation, never across await.
    processes: Mutex<BTreeMap<ContainerId, u32>>,
    exits: Mutex<Vec<Exit>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn processes_mut(&self) -> MutexGuard<'_, BTreeMap<ContainerId, u32>> {
        self.processes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
    fn exits_mut(&self) -> MutexGuard<'_, Vec<Exit>> {
        self.exits.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running harness. Call [`Kubelet::stop`] to end it and wait until every
/// process it started is gone. Dropping it also stops everything, without
/// waiting; and should the runtime end first (a test that panicked), each
/// process is killed with its task, since it is spawned with `kill_on_drop`.
#[derive(Debug)]
pub struct Kubelet {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Kubelet {
    /// Registers the node and starts heartbeat, scheduler and pod runner.
    ///
    /// # Errors
    /// If the binary is missing, the run dir cannot be made, or the node
    /// cannot be registered.
    pub async fn start(client: Client, config: Config) -> Result<Kubelet> {
        if !config.herald_bin.is_file() {
            return Err(Error::NoBinary(config.herald_bin));
        }
        std::fs::create_dir_all(&config.run_dir).map_err(|source| Error::RunDir {
            dir: config.run_dir.clone(),
            source,
        })?;
        node::register(&client, &config.node_name)
            .await
            .map_err(|source| Error::RegisterNode {
                node: config.node_name.clone(),
                source,
            })?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            client,
            pool: config.pool.clone(),
            config,
            processes: Mutex::default(),
            exits: Mutex::default(),
        });
        let span = info_span!("kubelet", node = %shared.config.node_name);
        let tasks = vec![
            tokio::spawn(heartbeat(shared.clone(), shutdown_rx.clone()).instrument(span.clone())),
            tokio::spawn(schedule(shared.clone(), shutdown_rx.clone()).instrument(span.clone())),
            tokio::spawn(run_pods(shared.clone(), shutdown_rx).instrument(span)),
        ];
        info!(node = %shared.config.node_name, "loopback kubelet started");
        Ok(Kubelet {
            shared,
            shutdown,
            tasks,
        })
    }

    /// The node this harness runs pods for.
    pub fn node_name(&self) -> &str {
        &self.shared.config.node_name
    }

    /// Processes running now: container and pid.
    pub fn processes(&self) -> BTreeMap<ContainerId, u32> {
        self.shared.processes_mut().clone()
    }

    /// The pid of one container's current process.
    pub fn pid(&self, namespace: &str, pod: &str, container: &str) -> Option<u32> {
        self.processes()
            .into_iter()
            .find(|(id, _)| id.namespace == namespace && id.pod == pod && id.container == container)
            .map(|(_, pid)| pid)
    }

    /// Every process exit seen so far, oldest first.
    pub fn exits(&self) -> Vec<Exit> {
        self.shared.exits_mut().clone()
    }

    /// Pod IPs lent out now.
    pub fn ips_in_use(&self) -> Vec<Ipv4Addr> {
        self.shared.pool.in_use()
    }

    /// Stops every process it started (SIGTERM, then SIGKILL after the
    /// shutdown grace) and its tasks; returns every exit it saw. Pods stay in
    /// the API, as with a kubelet that goes away.
    pub async fn stop(self) -> Vec<Exit> {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            if let Err(err) = task.await {
                warn!(cause = %err, "a harness task failed");
            }
        }
        info!(node = %self.shared.config.node_name, "loopback kubelet stopped");
        self.shared.exits_mut().clone()
    }
}

async fn heartbeat(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(shared.config.heartbeat);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        if let Err(err) = node::heartbeat(&shared.client, &shared.config.node_name).await {
            warn!(cause = %err, "node heartbeat failed");
        }
    }
}

/// Binds every unscheduled pod it manages to its node.
async fn schedule(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let unscheduled = || watcher::Config::default().fields("spec.nodeName=");
    let client = &shared.client;
    let mut watches = Vec::new();
    for namespace in &shared.config.namespaces {
        let api = Api::<Pod>::namespaced(client.clone(), namespace);
        watches.push(watcher(api, unscheduled()).default_backoff().boxed());
    }
    if let Some(selector) = &shared.config.label_selector {
        let api = Api::<Pod>::all(client.clone());
        watches.push(
            watcher(api, unscheduled().labels(selector))
                .default_backoff()
                .boxed(),
        );
    }
    let mut events = stream::select_all(watches);
    loop {
        let event = tokio::select! {
            _ = shutdown.changed() => return,
            event = events.next() => event,
        };
        let pod = match event {
            // No namespaces and no selector: nothing to schedule, ever.
            None => {
                let _ = shutdown.changed().await;
                return;
            }
            Some(Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod))) => pod,
            Some(Ok(_)) => continue,
            Some(Err(err)) => {
                warn!(cause = %err, "watching unscheduled pods");
                continue;
            }
        };
        if pod.metadata.deletion_timestamp.is_some()
            || pod.spec.as_ref().is_some_and(|s| s.node_name.is_some())
        {
            continue;
        }
        bind(&shared, &pod).await;
    }
}

async fn bind(shared: &Shared, pod: &Pod) {
    let (Some(namespace), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name) else {
        return;
    };
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.clone()),
            uid: pod.metadata.uid.clone(),
            ..ObjectMeta::default()
        },
        target: ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Node".to_owned()),
            name: Some(shared.config.node_name.clone()),
            ..ObjectReference::default()
        },
    };
    let api = Api::<Pod>::namespaced(shared.client.clone(), namespace);
    let params = PostParams {
        field_manager: Some(MANAGER.to_owned()),
        ..PostParams::default()
    };
    // The watch brings a pod once; a transient failure is retried here, a
    // few times with growing pauses, rather than waiting for the next event.
    let mut pause = BIND_RETRY;
    for attempt in 1..=BIND_ATTEMPTS {
        match api
            .create_subresource::<_, serde_json::Value>("binding", name, &params, &binding)
            .await
        {
            Ok(_) => {
                info!(%namespace, pod = %name, "bound");
                return;
            }
            // Already bound (by us, a moment ago) or gone: nothing to do.
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {
                debug!(%namespace, pod = %name, reason = %e.message, "not bound");
                return;
            }
            Err(err) => {
                warn!(%namespace, pod = %name, attempt, cause = %err, "binding failed");
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
        }
    }
}

/// One task per pod bound to the node.
#[derive(Debug)]
struct PodHandle {
    updates: watch::Sender<Option<Arc<Pod>>>,
    task: JoinHandle<()>,
}

/// Watches the pods bound to the node and keeps one task per pod.
async fn run_pods(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let api = Api::<Pod>::all(shared.client.clone());
    let config =
        watcher::Config::default().fields(&format!("spec.nodeName={}", shared.config.node_name));
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut pods: HashMap<String, PodHandle> = HashMap::new();
    // Pods gone from the API whose tasks may still be stopping processes.
    let mut retired: Vec<JoinHandle<()>> = Vec::new();
    let mut relisted: Option<Vec<String>> = None;
    loop {
        let event = tokio::select! {
            _ = shutdown.changed() => break,
            event = events.next() => event,
        };
        let event = match event {
            Some(Ok(event)) => event,
            Some(Err(err)) => {
                warn!(cause = %err, "watching the node's pods");
                continue;
            }
            None => break,
        };
        match event {
            watcher::Event::Init => relisted = Some(Vec::new()),
            watcher::Event::InitApply(pod) | watcher::Event::Apply(pod) => {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                if let Some(seen) = relisted.as_mut() {
                    seen.push(uid.clone());
                }
                let pod = Arc::new(pod);
                if let Some(handle) = pods.get(&uid) {
                    // A finished task (pod already terminated here) ignores it.
                    handle.updates.send_replace(Some(pod));
                    continue;
                }
                let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
                if matches!(phase, Some("Succeeded" | "Failed")) {
                    continue;
                }
                let (updates, updates_rx) = watch::channel(Some(pod.clone()));
                let span = info_span!("pod", namespace = ?pod.metadata.namespace, name = ?pod.metadata.name);
                let task = pod::PodTask::new(shared.clone(), pod);
                let task = tokio::spawn(task.run(updates_rx, shutdown.clone()).instrument(span));
                pods.insert(uid, PodHandle { updates, task });
            }
            watcher::Event::Delete(pod) => {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                if let Some(handle) = pods.remove(&uid) {
                    handle.updates.send_replace(None);
                    retired.push(handle.task);
                }
            }
            watcher::Event::InitDone => {
                // A re-list after a broken watch: pods not in it are gone.
                let seen = relisted.take().unwrap_or_default();
                let gone: Vec<String> = pods
                    .keys()
                    .filter(|uid| !seen.contains(uid))
                    .cloned()
                    .collect();
                for uid in gone {
                    if let Some(handle) = pods.remove(&uid) {
                        handle.updates.send_replace(None);
                        retired.push(handle.task);
                    }
                }
            }
        }
        retired.retain(|task| !task.is_finished());
    }
    // Stopping: every pod task sees the shutdown and stops its processes.
    for (_, handle) in pods {
        retired.push(handle.task);
    }
    for task in retired {
        if let Err(err) = task.await {
            warn!(cause = %err, "a pod task failed");
        }
    }
}

/// Whether `pod` runs with its `Ready` condition true, as this kubelet
/// reports once the pod's readiness probe passes.
pub fn pod_ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The loopback address this kubelet gave `pod` (its status `podIP`).
///
/// # Errors
/// When the pod has no IP yet or it is not IPv4.
pub fn pod_ip(pod: &Pod) -> anyhow::Result<Ipv4Addr> {
    use anyhow::Context;
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .context("no podIP")?;
    Ok(ip.parse()?)
}
