//! One pod on the loopback node: its IP, one `herald` process per container,
//! readiness probes, restarts, status, and termination.
//!
//! Each pod gets its own task that owns its processes; the task learns about
//! the pod from a watch channel (latest object, `None` once it is gone from
//! the API) and about its processes from their exit notices.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus, Secret,
    ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::expand::{self, PodAddrs, Sources};
use super::probe::{self, Timing};
use super::{ContainerId, Exit, MANAGER, Shared};

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
    /// Signals the harness sent to the current process, for [`Exit`].
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

    // ------------------------------------------------------------ processes

    async fn start_due(&mut self) {
        let now = Instant::now();
        for i in 0..self.runs.len() {
            if self.runs[i].next_start.is_some_and(|t| t <= now) {
                self.runs[i].next_start = None;
                if let Err(message) = self.start(i).await {
                    let run = &mut self.runs[i];
                    warn!(pod = %self.name, container = %run.spec.name, %message, "cannot start");
                    run.state = waiting("CreateContainerConfigError", Some(message));
                    run.next_start = Some(Instant::now() + Duration::from_secs(1));
                }
            }
        }
    }

    /// Starts container `i` as a `herald` process.
    async fn start(&mut self, i: usize) -> Result<(), String> {
        let ip = self.ip.ok_or("no pod IP")?.to_string();
        let spec = self.runs[i].spec.clone();
        let sources = self.fetch_sources(&spec).await?;
        let addrs = PodAddrs {
            pod_ip: &ip,
            host_ip: HOST_IP,
        };
        let mut env =
            expand::container_env(&self.pod, &spec, addrs, &sources).map_err(|e| e.to_string())?;
        if let Some(cluster) = &self.shared.config.api_cluster {
            let path = self.write_kubeconfig(cluster).await?;
            env.push(("KUBECONFIG".to_owned(), path));
        }
        let lookup = |name: &str| {
            env.iter()
                .rev()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        let mut argv: Vec<String> = spec
            .command
            .iter()
            .flatten()
            .chain(spec.args.iter().flatten())
            .map(|a| expand::expand(a, lookup))
            .collect();
        // Only the herald binary runs here: an empty command (the image's
        // entrypoint) or one naming `herald`.
        if let Some(first) = spec.command.as_ref().and_then(|c| c.first()) {
            if first != "herald" && !first.ends_with("/herald") {
                return Err(format!(
                    "command {first} is not herald; only herald runs on the loopback node"
                ));
            }
            argv.remove(0);
        }
        let log_path = self.dir.join(format!("{}.log", spec.name));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("open {}: {e}", log_path.display()))?;
        let log_err: File = log.try_clone().map_err(|e| format!("log file: {e}"))?;
        let mut command = Command::new(&self.shared.config.herald_bin);
        command
            .args(&argv)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // If the harness task is dropped without stopping (a test that
            // panicked), its processes still die with it.
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", self.shared.config.herald_bin.display()))?;
        let pid = child.id().ok_or("process exited before it got a pid")?;

        let id = self.id(&self.runs[i]);
        let run = &mut self.runs[i];
        run.generation += 1;
        run.starts += 1;
        run.pid = Some(pid);
        run.signals.clear();
        let now = Timestamp::now();
        run.started_at = Some(now);
        run.state = ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(Time(now)),
            }),
            ..ContainerState::default()
        };
        run.ready = false;
        run.successes = 0;
        run.failures = 0;
        run.next_probe = run
            .spec
            .readiness_probe
            .as_ref()
            .map(|p| Instant::now() + Timing::of(p).initial_delay);
        run.live_failures = 0;
        run.kill_at = None;
        run.next_liveness = run
            .spec
            .liveness_probe
            .as_ref()
            .map(|p| Instant::now() + Timing::of(p).initial_delay);
        self.shared.processes_mut().insert(id, pid);
        info!(pod = %self.name, container = %run.spec.name, pid, ?argv, "started");

        let (tx, generation) = (self.exits_tx.clone(), run.generation);
        tokio::spawn(async move {
            let status = child.wait().await;
            // The pod task may be gone already (harness stopping): nothing to tell.
            let _ = tx.send((i, generation, status));
        });
        Ok(())
    }

    /// ConfigMaps and Secrets the container's environment refers to.
    /// What a kubelet's projected service-account token gives a pod: the
    /// identity of the pod's ServiceAccount (a TokenRequest, so RBAC applies
    /// as in a cluster). No process here can read the fixed in-cluster token
    /// path, so the token goes into a kubeconfig of the pod's own; returns
    /// its path.
    async fn write_kubeconfig(&self, cluster: &kube::config::Cluster) -> Result<String, String> {
        let account = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned());
        let request: TokenRequest = serde_json::from_value(serde_json::json!({
            "spec": {"audiences": [], "expirationSeconds": 3600,
                     "boundObjectRef": {"kind": "Pod", "apiVersion": "v1",
                                        "name": self.name, "uid": self.pod.metadata.uid}}
        }))
        .map_err(|e| format!("token request: {e}"))?;
        let token = Api::<ServiceAccount>::namespaced(self.shared.client.clone(), &self.namespace)
            .create_token_request(&account, &PostParams::default(), &request)
            .await
            .map_err(|e| format!("token of ServiceAccount {account}: {e}"))?
            .status
            .map(|s| s.token)
            .ok_or_else(|| format!("no token for ServiceAccount {account}"))?;
        let config = serde_json::json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "cluster", "cluster": cluster}],
            "users": [{"name": account, "user": {"token": token}}],
            "contexts": [{"name": "pod", "context": {"cluster": "cluster", "user": account,
                                                     "namespace": self.namespace}}],
            "current-context": "pod",
        });
        let path = self.dir.join("kubeconfig");
        std::fs::write(&path, config.to_string())
            .map_err(|e| format!("write {}: {e}", path.display()))?;
        Ok(path.display().to_string())
    }

    async fn fetch_sources(&self, spec: &Container) -> Result<Sources, String> {
        let (config_maps, secrets) = expand::referenced_sources(spec);
        let mut sources = Sources::default();
        let client = &self.shared.client;
        for name in config_maps {
            let found = Api::<ConfigMap>::namespaced(client.clone(), &self.namespace)
                .get_opt(&name)
                .await
                .map_err(|e| format!("get ConfigMap {name}: {e}"))?;
            let data = found.map(|c| c.data.unwrap_or_default());
            sources.config_maps.insert(name, data);
        }
        for name in secrets {
            let found = Api::<Secret>::namespaced(client.clone(), &self.namespace)
                .get_opt(&name)
                .await
                .map_err(|e| format!("get Secret {name}: {e}"))?;
            let data = found.map(|s| {
                let mut data: BTreeMap<String, String> = s.string_data.unwrap_or_default();
                for (k, v) in s.data.unwrap_or_default() {
                    data.insert(k, String::from_utf8_lossy(&v.0).into_owned());
                }
                data
            });
            sources.secrets.insert(name, data);
        }
        Ok(sources)
    }

    fn on_exit(&mut self, (i, generation, status): ExitNotice) {
        let id = match self.runs.get(i) {
            Some(run) if run.generation == generation => self.id(run),
            _ => return,
        };
        let restart_policy = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".to_owned());
        let run = &mut self.runs[i];
        let Some(pid) = run.pid.take() else { return };
        self.shared.processes_mut().remove(&id);
        let (code, signal) = match &status {
            Ok(status) => {
                use std::os::unix::process::ExitStatusExt;
                (status.code(), status.signal())
            }
            Err(_) => (None, None),
        };
        let exit_code = code.unwrap_or_else(|| 128 + signal.unwrap_or(0));
        info!(pod = %self.name, container = %run.spec.name, pid, ?code, ?signal, "process exited");
        self.shared.exits_mut().push(Exit {
            id,
            pid,
            signals_sent: std::mem::take(&mut run.signals),
            code,
            signal,
        });
        let finished_at = Timestamp::now();
        let terminated = ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code,
                signal,
                reason: Some(if exit_code == 0 { "Completed" } else { "Error" }.to_owned()),
                started_at: run.started_at.map(Time),
                finished_at: Some(Time(finished_at)),
                container_id: Some(container_id(pid)),
                message: status.err().map(|e| e.to_string()),
            }),
            ..ContainerState::default()
        };
        run.ready = false;
        run.next_probe = None;
        run.next_liveness = None;
        run.kill_at = None;
        let restart = match restart_policy.as_str() {
            "Never" => false,
            "OnFailure" => exit_code != 0,
            _ => true,
        };
        if restart {
            // Back-off doubles from the configured start up to the maximum, and
            // starts over for a process that ran well past the maximum.
            let config = &self.shared.config;
            let ran = run
                .started_at
                .map(|s| finished_at.duration_since(s).unsigned_abs())
                .unwrap_or_default();
            run.backoff = if run.backoff.is_zero() || ran > 2 * config.max_restart_backoff {
                config.restart_backoff
            } else {
                (run.backoff * 2).min(config.max_restart_backoff)
            };
            run.next_start = Some(Instant::now() + run.backoff);
            run.last_state = Some(terminated);
            run.state = waiting(
                "CrashLoopBackOff",
                Some(format!(
                    "back-off {:?} restarting failed container",
                    run.backoff
                )),
            );
        } else {
            run.state = terminated;
        }
    }

    /// Sends `signal` to every running process of the pod, by its pid.
    fn signal_all(&mut self, signal: Signal) {
        for run in &mut self.runs {
            if let Some(pid) = run.pid {
                let Ok(raw) = i32::try_from(pid) else {
                    continue;
                };
                match kill(Pid::from_raw(raw), signal) {
                    Ok(()) => run.signals.push(signal.as_str()),
                    Err(err) => debug!(pid, %signal, cause = %err, "signal not delivered"),
                }
            }
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns once every process has
    /// exited (or did not go even after SIGKILL, which is logged).
    async fn stop_processes(&mut self, grace: Duration) {
        for run in &mut self.runs {
            run.next_start = None;
        }
        self.signal_all(Signal::SIGTERM);
        if !self.wait_all_exited(grace).await {
            self.signal_all(Signal::SIGKILL);
            if !self.wait_all_exited(KILL_WAIT).await {
                warn!(pod = %self.name, "processes still there after SIGKILL");
            }
        }
    }

    async fn wait_all_exited(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while self.runs.iter().any(|r| r.pid.is_some()) {
            match tokio::time::timeout_at(deadline, self.exits_rx.recv()).await {
                Ok(Some(notice)) => self.on_exit(notice),
                Ok(None) | Err(_) => return false,
            }
        }
        true
    }

    /// Graceful deletion, as kubelet does it: stop the processes within the
    /// grace period, report them terminated, then remove the pod for good
    /// (grace 0, only this incarnation: uid precondition).
    async fn terminate(&mut self, grace: Duration) {
        info!(pod = %self.name, ?grace, "pod deleted; stopping its processes");
        // Terminated containers stay terminated: no restart during deletion.
        if let Some(spec) = Arc::make_mut(&mut self.pod).spec.as_mut() {
            spec.restart_policy = Some("Never".to_owned());
        }
        self.stop_processes(grace).await;
        self.publish_status().await;
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match self.pods().delete(&self.name, &params).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(err) => warn!(pod = %self.name, cause = %err, "final delete failed"),
        }
    }

    // ------------------------------------------------------------- probes

    async fn probe_due(&mut self) {
        let Some(ip) = self.ip else { return };
        let now = Instant::now();
        for i in 0..self.runs.len() {
            let run = &self.runs[i];
            if run.pid.is_none() || run.next_probe.is_none_or(|t| t > now) {
                continue;
            }
            let Some(probe) = run.spec.readiness_probe.clone() else {
                continue;
            };
            let timing = Timing::of(&probe);
            let outcome = probe::check(&probe, &run.spec, ip).await;
            let run = &mut self.runs[i];
            run.next_probe = Some(Instant::now() + timing.period);
            match outcome {
                Ok(()) => {
                    run.failures = 0;
                    run.successes += 1;
                    if run.successes >= timing.success_threshold {
                        run.ready = true;
                    }
                }
                Err(why) => {
                    run.successes = 0;
                    run.failures += 1;
                    debug!(pod = %self.name, container = %run.spec.name, %why, "readiness probe failed");
                    if run.failures >= timing.failure_threshold {
                        run.ready = false;
                    }
                }
            }
        }
    }

    /// Liveness, as kubelet does it: after `failureThreshold` failures in a
    /// row the process gets SIGTERM, SIGKILL after the grace period (the
    /// probe's own, else the pod's), and then restarts per the restart policy.
    async fn liveness_due(&mut self) {
        let Some(ip) = self.ip else { return };
        let now = Instant::now();
        let pod_grace = self.grace(None);
        for i in 0..self.runs.len() {
            let run = &self.runs[i];
            let due = run.next_liveness.is_some_and(|t| t <= now);
            let (Some(pid), true, None) = (run.pid, due, run.kill_at) else {
                continue;
            };
            let Some(probe) = run.spec.liveness_probe.clone() else {
                continue;
            };
            let timing = Timing::of(&probe);
            let outcome = probe::check(&probe, &run.spec, ip).await;
            let run = &mut self.runs[i];
            run.next_liveness = Some(Instant::now() + timing.period);
            let Err(why) = outcome else {
                run.live_failures = 0;
                continue;
            };
            run.live_failures += 1;
            if run.live_failures < timing.failure_threshold {
                continue;
            }
            let grace = probe
                .termination_grace_period_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(pod_grace, Duration::from_secs);
            info!(pod = %self.name, container = %run.spec.name, pid, %why,
                  "liveness probe failed; restarting the container");
            run.next_liveness = None;
            run.kill_at = Some(Instant::now() + grace);
            if let Ok(raw) = i32::try_from(pid)
                && kill(Pid::from_raw(raw), Signal::SIGTERM).is_ok()
            {
                run.signals.push(Signal::SIGTERM.as_str());
            }
        }
    }

    /// SIGKILL for processes a liveness kill gave SIGTERM and that outlived
    /// their grace period.
    fn kill_overdue(&mut self) {
        let now = Instant::now();
        for run in &mut self.runs {
            if let (Some(pid), Some(at)) = (run.pid, run.kill_at)
                && at <= now
            {
                run.kill_at = None;
                if let Ok(raw) = i32::try_from(pid)
                    && kill(Pid::from_raw(raw), Signal::SIGKILL).is_ok()
                {
                    run.signals.push(Signal::SIGKILL.as_str());
                }
            }
        }
    }

    // ------------------------------------------------------------- status

    /// Ready without a probe means running; with one, what the probe said.
    fn is_ready(run: &Run) -> bool {
        run.pid.is_some() && (run.spec.readiness_probe.is_none() || run.ready)
    }

    fn condition(&mut self, kind: &'static str, status: bool) -> PodCondition {
        let now = Timestamp::now();
        let entry = self.conditions.entry(kind).or_insert((status, now));
        if entry.0 != status {
            *entry = (status, now);
        }
        PodCondition {
            type_: kind.to_owned(),
            status: if status { "True" } else { "False" }.to_owned(),
            last_transition_time: Some(Time(entry.1)),
            ..PodCondition::default()
        }
    }

    fn status(&mut self) -> PodStatus {
        let all_ready = !self.runs.is_empty() && self.runs.iter().all(Self::is_ready);
        let all_started = self.runs.iter().all(|r| r.starts > 0);
        let terminated: Vec<i32> = self
            .runs
            .iter()
            .filter_map(|r| r.state.terminated.as_ref().map(|t| t.exit_code))
            .collect();
        let phase = if !self.runs.is_empty() && terminated.len() == self.runs.len() {
            if terminated.iter().all(|c| *c == 0) {
                "Succeeded"
            } else {
                "Failed"
            }
        } else if all_started && self.ip.is_some() {
            "Running"
        } else {
            "Pending"
        };
        let statuses = self
            .runs
            .iter()
            .map(|run| ContainerStatus {
                name: run.spec.name.clone(),
                image: run
                    .spec
                    .image
                    .clone()
                    .unwrap_or_else(|| "herald".to_owned()),
                image_id: String::new(),
                container_id: run.pid.map(container_id),
                ready: Self::is_ready(run),
                started: Some(run.pid.is_some()),
                restart_count: run.restart_count(),
                state: Some(run.state.clone()),
                last_state: run.last_state.clone(),
                ..ContainerStatus::default()
            })
            .collect();
        let conditions = vec![
            self.condition("PodReadyToStartContainers", self.ip.is_some()),
            self.condition("Initialized", true),
            self.condition("ContainersReady", all_ready),
            self.condition("Ready", all_ready),
        ];
        let ip = self.ip.map(|ip| ip.to_string());
        PodStatus {
            phase: Some(phase.to_owned()),
            host_ip: Some(HOST_IP.to_owned()),
            host_ips: Some(vec![HostIP {
                ip: HOST_IP.to_owned(),
            }]),
            pod_ip: ip.clone(),
            pod_ips: ip.map(|ip| vec![PodIP { ip }]),
            start_time: Some(Time(self.start_time)),
            conditions: Some(conditions),
            container_statuses: Some(statuses),
            ..PodStatus::default()
        }
    }

    /// Patches pods/status when it changed since the last successful patch.
    async fn publish_status(&mut self) {
        let status = self.status();
        let body = serde_json::json!({ "status": status });
        if self.last_status.as_ref() == Some(&body) {
            return;
        }
        // Strategic merge keeps conditions other controllers add (merged by
        // type) while ours are replaced.
        let patch = Patch::Strategic(&body);
        let params = PatchParams {
            field_manager: Some(MANAGER.to_owned()),
            ..PatchParams::default()
        };
        match self.pods().patch_status(&self.name, &params, &patch).await {
            Ok(_) => self.last_status = Some(body),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(err) => warn!(pod = %self.name, cause = %err, "status patch failed; retrying"),
        }
    }
}

fn container_id(pid: u32) -> String {
    format!("herald://{pid}")
}
