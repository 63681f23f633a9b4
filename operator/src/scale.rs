//! Scaling decisions, kept pure so every rule is unit-tested without a cluster:
//! how many comets the load asks for, when a lower count may take effect, and
//! which step of a drain-before-removal comes next.

use std::time::Duration;

/// Comets the load asks for: `ceil(total / target)` within `[min, max]`.
/// A non-positive target (refused by the schema) is treated as 1.
pub fn wanted(total_connections: u64, target: i64, min: i32, max: i32) -> i32 {
    let target = u64::try_from(target.max(1)).unwrap_or(1);
    let needed = total_connections.div_ceil(target);
    let needed = i32::try_from(needed).unwrap_or(i32::MAX);
    let (min, max) = (min.max(0), max.max(min.max(0)));
    needed.clamp(min, max)
}

/// What the autoscaler remembers between passes: when the load first asked
/// for fewer comets, and the most it asked for since then.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DownWindow {
    /// When (on the caller's clock) a lower count was first wanted. Not
    /// whole seconds: truncating both ends let a window close up to a
    /// second early.
    pub since: Option<Duration>,
    /// The highest count wanted since then (what a scale-down goes to).
    pub highest: i32,
}

/// Next replica count from the current one and what the load wants now.
///
/// Up: at once, by at most `max(4, current)` per step (doubling, like the HPA),
/// so a burst of connections cannot explode the Deployment in one pass. Down:
/// only after lower counts were wanted for the whole `window`, and then to the
/// highest count wanted during it, so a short dip moves no clients.
pub fn next_replicas(
    current: i32,
    wanted: i32,
    window: Duration,
    now: Duration,
    memory: &mut DownWindow,
) -> i32 {
    if wanted >= current {
        *memory = DownWindow::default();
        let step = current.max(4);
        return wanted.min(current.saturating_add(step));
    }
    match memory.since {
        None => {
            *memory = DownWindow {
                since: Some(now),
                highest: wanted,
            };
            current
        }
        Some(since) => {
            memory.highest = memory.highest.max(wanted);
            if now.saturating_sub(since) >= window {
                let to = memory.highest;
                *memory = DownWindow::default();
                to
            } else {
                current
            }
        }
    }
}

/// A comet pod as the drain logic sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CometPod {
    /// Pod name (= server id).
    pub name: String,
    /// Ready with an IP; only such pods hold clients.
    pub ready: bool,
    /// Connections at the last poll; `None` when the poll failed.
    pub connections: Option<u64>,
    /// When the operator started draining it (seconds), from its annotation.
    pub drain_started: Option<u64>,
    /// Being deleted already.
    pub terminating: bool,
}

/// What to do about comet replicas on this pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DrainStep {
    /// Deployment replicas to apply; nothing to drain.
    Set(i32),
    /// Start draining this pod; replicas stay as they are.
    Start {
        /// The least-loaded comet.
        pod: String,
        /// Replicas to keep meanwhile.
        replicas: i32,
    },
    /// The drain is under way and not finished; replicas stay.
    Wait {
        /// The draining comet.
        pod: String,
        /// Replicas to keep meanwhile.
        replicas: i32,
    },
    /// The drained pod is empty (or past its deadline): make it the cheapest
    /// to delete, then lower replicas by one.
    Finish {
        /// The drained comet.
        pod: String,
        /// Replicas after removing it.
        replicas: i32,
    },
    /// A drained comet is no longer to be removed (scaled back up meanwhile):
    /// it cannot take clients again, so delete it and let a fresh one replace it.
    Replace {
        /// The drained comet.
        pod: String,
        /// Replicas to apply.
        replicas: i32,
    },
}

/// Decides the comet Deployment's replicas given the spec's count, the
/// Deployment's current count and the pods. Never starts a second drain while
/// one is under way.
pub fn drain_step(
    spec_replicas: i32,
    deployed: i32,
    pods: &[CometPod],
    deadline: Duration,
    now_secs: u64,
) -> DrainStep {
    let live: Vec<&CometPod> = pods.iter().filter(|pod| !pod.terminating).collect();
    let draining = live.iter().find(|pod| pod.drain_started.is_some());
    if spec_replicas >= deployed {
        return match draining {
            Some(pod) => DrainStep::Replace {
                pod: pod.name.clone(),
                replicas: spec_replicas,
            },
            None => DrainStep::Set(spec_replicas),
        };
    }
    if let Some(pod) = draining {
        let started = pod.drain_started.unwrap_or(now_secs);
        // Not `!ready`: a draining comet turns its readiness off at once, long
        // before its clients are gone. Unknown load waits for the deadline.
        let empty = pod.connections == Some(0);
        let expired = now_secs.saturating_sub(started) >= deadline.as_secs();
        return if empty || expired {
            DrainStep::Finish {
                pod: pod.name.clone(),
                replicas: deployed - 1,
            }
        } else {
            DrainStep::Wait {
                pod: pod.name.clone(),
                replicas: deployed,
            }
        };
    }
    // An unready pod reporting no clients (starting, pending, no kubelet
    // yet) needs no drain, and the ReplicaSet removes unready pods first:
    // lower at once, one step per pass. So does a pod that does not exist.
    let idle_unready = live
        .iter()
        .any(|pod| !pod.ready && pod.connections.unwrap_or(0) == 0);
    if idle_unready || live.len() < usize::try_from(deployed).unwrap_or(0) {
        return DrainStep::Set(deployed - 1);
    }
    let least = live
        .iter()
        .filter_map(|pod| pod.connections.map(|c| (c, &pod.name)))
        .min();
    match least {
        Some((_, name)) => DrainStep::Start {
            pod: name.clone(),
            replicas: deployed,
        },
        // Ready pods whose load is unknown: never remove blind.
        None => DrainStep::Set(deployed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    const WINDOW: Duration = Duration::from_secs(300);

    fn pod(name: &str, connections: u64) -> CometPod {
        CometPod {
            name: name.to_owned(),
            ready: true,
            connections: Some(connections),
            drain_started: None,
            terminating: false,
        }
    }

    #[test]
    fn wanted_is_ceiling_clamped() {
        assert_eq!(wanted(0, 1000, 1, 10), 1);
        assert_eq!(wanted(1000, 1000, 1, 10), 1);
        assert_eq!(wanted(1001, 1000, 1, 10), 2);
        assert_eq!(wanted(9_999_999, 1000, 1, 10), 10);
        assert_eq!(wanted(2500, 1000, 3, 10), 3);
        assert_eq!(wanted(u64::MAX, 1, 1, 50), 50);
        assert_eq!(wanted(10, 0, 1, 5), 5, "target 0 is treated as 1");
        assert_eq!(wanted(10, -3, 1, 5), 5);
    }

    #[test]
    fn scale_up_is_immediate_but_bounded() {
        let mut memory = DownWindow::default();
        assert_eq!(next_replicas(2, 3, WINDOW, secs(0), &mut memory), 3);
        assert_eq!(
            next_replicas(2, 50, WINDOW, secs(0), &mut memory),
            6,
            "+4 from 2"
        );
        assert_eq!(
            next_replicas(10, 50, WINDOW, secs(0), &mut memory),
            20,
            "doubling"
        );
        assert_eq!(
            next_replicas(i32::MAX - 1, i32::MAX, WINDOW, secs(0), &mut memory),
            i32::MAX
        );
    }

    #[test]
    fn scale_down_waits_for_the_window_and_takes_its_highest() {
        let mut memory = DownWindow::default();
        assert_eq!(next_replicas(6, 2, WINDOW, secs(1000), &mut memory), 6);
        assert_eq!(next_replicas(6, 4, WINDOW, secs(1100), &mut memory), 6);
        assert_eq!(next_replicas(6, 3, WINDOW, secs(1299), &mut memory), 6);
        assert_eq!(
            next_replicas(6, 2, WINDOW, secs(1300), &mut memory),
            4,
            "highest wanted in window"
        );
        assert_eq!(memory, DownWindow::default());
    }

    #[test]
    fn a_rise_resets_the_window() {
        let mut memory = DownWindow::default();
        assert_eq!(next_replicas(6, 2, WINDOW, secs(0), &mut memory), 6);
        assert_eq!(next_replicas(6, 6, WINDOW, secs(200), &mut memory), 6);
        assert_eq!(
            next_replicas(6, 2, WINDOW, secs(301), &mut memory),
            6,
            "window restarted"
        );
        assert_eq!(next_replicas(6, 2, WINDOW, secs(601), &mut memory), 2);
    }

    #[test]
    fn zero_window_scales_down_on_the_second_pass() {
        let mut memory = DownWindow::default();
        assert_eq!(next_replicas(3, 1, Duration::ZERO, secs(5), &mut memory), 3);
        assert_eq!(next_replicas(3, 1, Duration::ZERO, secs(5), &mut memory), 1);
    }

    #[test]
    fn scale_down_drains_the_least_loaded_first() {
        let pods = [pod("a", 30), pod("b", 5), pod("c", 70)];
        let step = drain_step(2, 3, &pods, WINDOW, 0);
        assert_eq!(
            step,
            DrainStep::Start {
                pod: "b".to_owned(),
                replicas: 3
            }
        );
    }

    #[test]
    fn drain_waits_then_finishes_on_empty_or_deadline() {
        let mut pods = vec![pod("a", 30), pod("b", 5), pod("c", 70)];
        pods[1].drain_started = Some(100);
        assert_eq!(
            drain_step(2, 3, &pods, Duration::from_secs(30), 110),
            DrainStep::Wait {
                pod: "b".to_owned(),
                replicas: 3
            }
        );
        assert_eq!(
            drain_step(2, 3, &pods, Duration::from_secs(30), 130),
            DrainStep::Finish {
                pod: "b".to_owned(),
                replicas: 2
            },
            "deadline passed"
        );
        pods[1].connections = Some(0);
        assert_eq!(
            drain_step(2, 3, &pods, Duration::from_secs(30), 101),
            DrainStep::Finish {
                pod: "b".to_owned(),
                replicas: 2
            },
            "empty"
        );
    }

    #[test]
    fn never_two_drains_at_once() {
        let mut pods = vec![pod("a", 30), pod("b", 5), pod("c", 70)];
        pods[2].drain_started = Some(0);
        // Even asked for 1 of 3, only the one under way is handled.
        assert_eq!(
            drain_step(1, 3, &pods, WINDOW, 10),
            DrainStep::Wait {
                pod: "c".to_owned(),
                replicas: 3
            }
        );
    }

    #[test]
    fn scale_up_during_a_drain_replaces_the_drained_comet() {
        let mut pods = vec![pod("a", 30), pod("b", 5)];
        pods[1].drain_started = Some(0);
        assert_eq!(
            drain_step(2, 2, &pods, WINDOW, 10),
            DrainStep::Replace {
                pod: "b".to_owned(),
                replicas: 2
            }
        );
    }

    #[test]
    fn unready_or_missing_pods_go_without_a_drain() {
        let mut pods = vec![pod("a", 30), pod("b", 5)];
        pods[1].ready = false;
        pods[1].connections = None;
        assert_eq!(drain_step(1, 2, &pods, WINDOW, 0), DrainStep::Set(1));
        assert_eq!(
            drain_step(1, 3, &[pod("a", 1)], WINDOW, 0),
            DrainStep::Set(2)
        );
    }

    #[test]
    fn a_draining_comet_that_turned_unready_still_waits_for_its_clients() {
        let mut pods = vec![pod("a", 30), pod("b", 5)];
        pods[1].drain_started = Some(100);
        pods[1].ready = false;
        assert_eq!(
            drain_step(1, 2, &pods, Duration::from_secs(30), 110),
            DrainStep::Wait {
                pod: "b".to_owned(),
                replicas: 2
            }
        );
        pods[1].connections = None;
        assert_eq!(
            drain_step(1, 2, &pods, Duration::from_secs(30), 110),
            DrainStep::Wait {
                pod: "b".to_owned(),
                replicas: 2
            },
            "unknown load waits for the deadline"
        );
    }

    #[test]
    fn an_unready_comet_with_clients_is_drained_not_dropped() {
        let mut pods = vec![pod("a", 30), pod("b", 5)];
        pods[1].ready = false;
        assert_eq!(
            drain_step(1, 2, &pods, WINDOW, 0),
            DrainStep::Start {
                pod: "b".to_owned(),
                replicas: 2
            }
        );
    }

    #[test]
    fn unknown_load_holds() {
        let mut pods = vec![pod("a", 30), pod("b", 5)];
        pods[0].connections = None;
        pods[1].connections = None;
        assert_eq!(drain_step(1, 2, &pods, WINDOW, 0), DrainStep::Set(2));
    }

    #[test]
    fn terminating_pods_are_ignored() {
        let mut pods = vec![pod("a", 30), pod("b", 5), pod("c", 1)];
        pods[2].terminating = true;
        assert_eq!(
            drain_step(1, 2, &pods, WINDOW, 0),
            DrainStep::Start {
                pod: "b".to_owned(),
                replicas: 2
            }
        );
    }
}
