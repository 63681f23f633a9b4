//! A pod's probes on their schedule: readiness (the container's `ready`),
//! and liveness, whose failures restart the container (SIGTERM, then SIGKILL
//! after the grace period).

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::time::Instant;
use tracing::{debug, info};

use super::super::probe::{self, Timing};
use super::PodTask;

impl PodTask {
    pub(super) async fn probe_due(&mut self) {
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
    pub(super) async fn liveness_due(&mut self) {
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
    pub(super) fn kill_overdue(&mut self) {
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
}
