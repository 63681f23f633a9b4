//! The pod's status as kubelet reports it (phase, IPs, conditions, each
//! container's state), patched onto pods/status only when it changed.

use k8s_openapi::api::core::v1::{ContainerStatus, HostIP, PodCondition, PodIP, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use tracing::warn;

use super::super::MANAGER;
use super::{HOST_IP, PodTask, Run, container_id};

impl PodTask {
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
    pub(super) async fn publish_status(&mut self) {
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
