//! Starting a container: its environment (ConfigMaps and Secrets it
//! refers to, `$(VAR)` expansion, a kubeconfig with the pod's
//! ServiceAccount token), then the `herald` process and its exit watcher.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ContainerState, ContainerStateRunning, Secret, Service, ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::process::Command;
use tokio::time::Instant;
use tracing::{info, warn};

use super::super::expand::{self, PodAddrs, Sources};
use super::super::probe::Timing;
use super::super::volume;
use super::{HOST_IP, PodTask, waiting};

impl PodTask {
    pub(super) async fn start_due(&mut self) {
        let now = Instant::now();
        if let Some(message) = self.volumes.not_mounted() {
            // As a kubelet whose volume mount fails: the pod stays Pending,
            // its containers ContainerCreating, retried until it works.
            for run in self.runs.iter_mut().filter(|r| r.pid.is_none()) {
                run.state = waiting("ContainerCreating", Some(message.clone()));
                run.next_start = Some(now + Duration::from_secs(1));
            }
            return;
        }
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
        // Container paths under a volume mount become the volume's local
        // directory: env values here, command and args before expansion, so
        // a path reaching an arg through $(VAR) is mapped exactly once.
        let mounts = volume::mounts(&self.pod, &spec, &self.dir);
        for (_, value) in &mut env {
            *value = volume::map_path(value, &mounts);
        }
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
            .map(|a| expand::expand(&volume::map_path(a, &mounts), lookup))
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

    /// The Service link variables of the namespace, and the ConfigMaps and
    /// Secrets the container's environment refers to.
    async fn fetch_sources(&self, spec: &Container) -> Result<Sources, String> {
        let (config_maps, secrets) = expand::referenced_sources(spec);
        let mut sources = Sources::default();
        let client = &self.shared.client;
        let links = self.pod.spec.as_ref().and_then(|s| s.enable_service_links);
        if links != Some(false) {
            let services = Api::<Service>::namespaced(client.clone(), &self.namespace)
                .list(&Default::default())
                .await
                .map_err(|e| format!("list Services: {e}"))?;
            sources.service_links = expand::service_links(&services.items);
        }
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
}
