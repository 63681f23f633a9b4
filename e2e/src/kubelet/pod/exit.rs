//! When processes end: an exit recorded and the container restarted per
//! the restart policy with back-off; stopping every process (SIGTERM, then
//! SIGKILL); and a pod's graceful deletion.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerState, ContainerStateTerminated};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Preconditions};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::super::Exit;
use super::{ExitNotice, KILL_WAIT, PodTask, container_id, waiting};

impl PodTask {
    pub(super) fn on_exit(&mut self, (i, generation, status): ExitNotice) {
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
    pub(super) async fn stop_processes(&mut self, grace: Duration) {
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
    pub(super) async fn terminate(&mut self, grace: Duration) {
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
}
