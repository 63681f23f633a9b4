//! One pod on the loopback node: its IP, one `herald` process per container,
//! readiness probes, restarts, status, and termination.
//!
//! Each pod gets its own task that owns its processes; the task learns about
//! the pod from a watch channel (latest object, `None` once it is gone from
//! the API) and about its processes from their exit notices.
//!
//! This file holds the task and its loop; the steps it takes are in
//! `volumes` (Secret and emptyDir volumes, set up before the containers
//! and kept current), `start` (a container's process), `exit` (exits, restarts, stopping,
//! deletion), `probes` (readiness and liveness) and `status`.

mod exit;
mod probes;
mod start;
mod status;
mod volumes;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, ContainerState, ContainerStateWaiting, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use super::{ContainerId, Shared};

/// The node's address as pods see it.
pub(super) const HOST_IP: &str = "127.0.0.1";
/// How long to wait for a process to go after SIGKILL before giving up on it.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Checked at least this often, so a missed wake-up costs little.
const MAX_IDLE: Duration = Duration::from_secs(1);

/// An exit notice: container index, start generation, how it ended.
type ExitNotice = (usize, u64, std::io::Result<ExitStatus>);

/// One container and the process that backs it (if any).
#[derive(Debug)]
struct Run {
    spec: Container,
    pid: Option<u32>,
    /// Bumped on every start so a late exit notice of an earlier process is
    /// never taken for the current one.
    generation: u64,
    starts: u32,
    started_at: Option<Timestamp>,
    state: ContainerState,
    last_state: Option<ContainerState>,
    ready: bool,
    successes: i32,
    failures: i32,
    next_probe: Option<Instant>,
    /// Consecutive liveness failures, and when the next liveness check is due.
    live_failures: i32,
    next_liveness: Option<Instant>,
    /// A liveness kill in progress: SIGKILL at this time if still running.
    kill_at: Option<Instant>,
    next_start: Option<Instant>,
    backoff: Duration,
    /// Signals the harness sent to the current process, for [`Exit`](super::Exit).
    signals: Vec<&'static str>,
}

impl Run {
    fn new(spec: Container) -> Run {
        Run {
            spec,
            pid: None,
            generation: 0,
            starts: 0,
            started_at: None,
            state: waiting("ContainerCreating", None),
            last_state: None,
            ready: false,
            successes: 0,
            failures: 0,
            next_probe: None,
            live_failures: 0,
            next_liveness: None,
            kill_at: None,
            next_start: Some(Instant::now()),
            backoff: Duration::ZERO,
            signals: Vec::new(),
        }
    }

    fn restart_count(&self) -> i32 {
        i32::try_from(self.starts.saturating_sub(1)).unwrap_or(i32::MAX)
    }
}

fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.to_owned()),
            message,
        }),
        ..ContainerState::default()
    }
}

/// What the pod task works on.
pub(super) struct PodTask {
    shared: Arc<Shared>,
    pod: Arc<Pod>,
    namespace: String,
    name: String,
    uid: String,
    ip: Option<Ipv4Addr>,
    dir: PathBuf,
    runs: Vec<Run>,
    exits_tx: mpsc::UnboundedSender<ExitNotice>,
    exits_rx: mpsc::UnboundedReceiver<ExitNotice>,
    /// Conditions' last status and when it last changed.
    conditions: BTreeMap<&'static str, (bool, Timestamp)>,
    start_time: Timestamp,
    last_status: Option<serde_json::Value>,
    volumes: volumes::Volumes,
}

impl std::fmt::Debug for PodTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodTask")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("ip", &self.ip)
            .finish_non_exhaustive()
    }
}

impl PodTask {
    pub(super) fn new(shared: Arc<Shared>, pod: Arc<Pod>) -> PodTask {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let dir = shared
            .config
            .run_dir
            .join(&namespace)
            .join(format!("{name}-{uid}"));
        let runs = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter().cloned())
            .map(Run::new)
            .collect();
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        PodTask {
            shared,
            pod,
            namespace,
            name,
            uid,
            ip: None,
            dir,
            runs,
            exits_tx,
            exits_rx,
            conditions: BTreeMap::new(),
            start_time: Timestamp::now(),
            last_status: None,
            volumes: volumes::Volumes::default(),
        }
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.shared.client.clone(), &self.namespace)
    }

    fn id(&self, run: &Run) -> ContainerId {
        ContainerId {
            namespace: self.namespace.clone(),
            pod: self.name.clone(),
            container: run.spec.name.clone(),
        }
    }

    /// Runs the pod until it is deleted or the harness stops.
    pub(super) async fn run(
        mut self,
        mut updates: watch::Receiver<Option<Arc<Pod>>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let preferred = self
            .pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok());
        self.ip = self.shared.pool.allocate(preferred);
        if self.ip.is_none() {
            warn!(pod = %self.name, "no free loopback address; the pod stays pending until one is free");
        }
        if let Err(err) = std::fs::create_dir_all(&self.dir) {
            warn!(pod = %self.name, cause = %err, "cannot create the pod's run dir");
        }
        info!(namespace = %self.namespace, pod = %self.name, ip = ?self.ip, "pod admitted");
        loop {
            if *shutdown.borrow() {
                self.stop_processes(self.shared.config.shutdown_grace).await;
                break;
            }
            let latest = updates.borrow_and_update().clone();
            match latest {
                None => {
                    // Gone from the API without us seeing it terminate.
                    let grace = self.grace(None);
                    self.stop_processes(grace).await;
                    break;
                }
                Some(pod) if pod.metadata.deletion_timestamp.is_some() => {
                    let grace = self.grace(pod.metadata.deletion_grace_period_seconds);
                    self.pod = pod;
                    self.terminate(grace).await;
                    break;
                }
                Some(pod) => self.pod = pod,
            }
            if self.ip.is_none() {
                // The pool was full; an address may have come back since.
                self.ip = self.shared.pool.allocate(None);
            }
            if self.ip.is_some() {
                self.sync_volumes_due().await;
                self.start_due().await;
                self.probe_due().await;
                self.liveness_due().await;
                self.kill_overdue();
            }
            self.publish_status().await;

            let wake = self
                .runs
                .iter()
                .flat_map(|r| [r.next_start, r.next_probe, r.next_liveness, r.kill_at])
                .chain([self.volumes.next_sync()])
                .flatten()
                .min()
                .unwrap_or_else(|| Instant::now() + MAX_IDLE)
                .min(Instant::now() + MAX_IDLE);
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        // The Kubelet handle was dropped without stop(): stop too.
                        self.stop_processes(self.shared.config.shutdown_grace).await;
                        break;
                    }
                }
                changed = updates.changed() => {
                    if changed.is_err() {
                        // The harness dropped the sender: it is stopping.
                        self.stop_processes(self.shared.config.shutdown_grace).await;
                        break;
                    }
                }
                Some(notice) = self.exits_rx.recv() => self.on_exit(notice),
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
        if let Some(ip) = self.ip.take() {
            self.shared.pool.release(ip);
        }
        info!(namespace = %self.namespace, pod = %self.name, "pod finished on this node");
    }

    /// The grace period: the deletion's, else the pod's, else 30 s.
    fn grace(&self, deletion: Option<i64>) -> Duration {
        let spec = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds);
        let secs = deletion.or(spec).unwrap_or(30);
        Duration::from_secs(u64::try_from(secs).unwrap_or(0))
    }
}

fn container_id(pid: u32) -> String {
    format!("herald://{pid}")
}
