//! The comet rollout, decided one step per reconcile pass (the controller
//! carries it out). A new pod template is a new revision with its own
//! ReplicaSet; the comets of older revisions leave one at a time: one new
//! comet first (surge), Ready and in the node list, then the oldest old
//! comet drained onto the new ones and removed once empty or at its
//! deadline, then the next. So no more than one comet's clients reconnect
//! at a time, at its drain's pace, and the serving comets never drop below
//! the count asked for.
//!
//! Pure functions of what a pass observed, so every rule is unit-tested.

/// A comet pod as the rollout sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RollPod {
    /// Pod name.
    pub name: String,
    /// The old workload it belongs to (index into the old replica counts),
    /// `None` for the current revision.
    pub old: Option<usize>,
    /// Pod Ready.
    pub ready: bool,
    /// Its connection count, when its `Load` answered.
    pub connections: Option<u64>,
    /// When the operator started draining it.
    pub drain_started: Option<u64>,
    /// Drained and marked cheapest to delete (already counted out).
    pub drain_finished: bool,
    /// Being deleted.
    pub terminating: bool,
    /// In the node list the last pass wrote, not draining.
    pub listed: bool,
    /// Creation time (seconds since the epoch).
    pub created: u64,
}

/// What a rollout pass does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RollStep {
    /// Give the current revision `current` replicas (one more comet) and
    /// wait for it.
    Surge {
        /// The current revision's replicas.
        current: i32,
    },
    /// Wait for the current revision's comets to be Ready and listed.
    /// `stuck` names one that has not been Ready for longer than the
    /// progress deadline: the rollout stops there (`Degraded`).
    WaitNew {
        /// The current revision's replicas.
        current: i32,
        /// A new comet past the progress deadline.
        stuck: Option<String>,
    },
    /// Drain old comet `pod` onto the new ones.
    Start {
        /// The pod to drain.
        pod: String,
        /// The current revision's replicas.
        current: i32,
    },
    /// Old comet `pod` is draining: wait.
    Wait {
        /// The draining pod.
        pod: String,
        /// The current revision's replicas.
        current: i32,
    },
    /// Old comet `pod` is empty (or past its deadline): mark it cheapest to
    /// delete and lower its workload by one.
    Finish {
        /// The drained pod.
        pod: String,
        /// Its workload (index into the old replica counts).
        workload: usize,
        /// The current revision's replicas.
        current: i32,
    },
    /// Lower old workload `workload` by one without a drain: it asks for a
    /// pod that does not exist, or `pod` is unready and holds no client.
    Lower {
        /// The idle pod, if there is one (marked cheapest to delete).
        pod: Option<String>,
        /// Its workload.
        workload: usize,
        /// The current revision's replicas.
        current: i32,
    },
}

impl RollStep {
    /// The current revision's replicas after this step.
    pub fn current(&self) -> i32 {
        match self {
            Self::Surge { current }
            | Self::WaitNew { current, .. }
            | Self::Start { current, .. }
            | Self::Wait { current, .. }
            | Self::Finish { current, .. }
            | Self::Lower { current, .. } => *current,
        }
    }
}

/// One pass of a rollout. `desired`: the comets asked for; `current`: the
/// current revision's replicas now; `old`: each old workload's replicas
/// (some above zero, else there is no rollout); `deadline`: the drain
/// deadline; `progress`: the progress deadline (both seconds).
pub fn roll_step(
    desired: i32,
    current: i32,
    old: &[i32],
    pods: &[RollPod],
    deadline: u64,
    progress: u64,
    now: u64,
) -> RollStep {
    let live: Vec<&RollPod> = pods.iter().filter(|p| !p.terminating).collect();
    // A drain under way is carried through first, whatever else changed
    // (a spec change during a rollout keeps it and goes on from there).
    if let Some(pod) = live
        .iter()
        .find(|p| p.old.is_some() && p.drain_started.is_some() && !p.drain_finished)
    {
        let started = pod.drain_started.unwrap_or(now);
        let empty = pod.connections == Some(0);
        let expired = now.saturating_sub(started) >= deadline;
        return match (empty || expired, pod.old) {
            (true, Some(workload)) => RollStep::Finish {
                pod: pod.name.clone(),
                workload,
                current,
            },
            _ => RollStep::Wait {
                pod: pod.name.clone(),
                current,
            },
        };
    }
    // An old workload asking for more pods than it has (one died, or was
    // never scheduled): lower it rather than let it start an old comet.
    for (workload, &replicas) in old.iter().enumerate() {
        let has = live
            .iter()
            .filter(|p| p.old == Some(workload) && !p.drain_finished)
            .count();
        if replicas > 0 && usize::try_from(replicas).unwrap_or(0) > has {
            return RollStep::Lower {
                pod: None,
                workload,
                current,
            };
        }
    }
    // An old comet that is unready and holds no client needs no drain.
    if let Some(pod) = live.iter().find(|p| {
        p.old.is_some() && !p.drain_finished && !p.ready && p.connections.unwrap_or(0) == 0
    }) {
        return RollStep::Lower {
            pod: Some(pod.name.clone()),
            workload: pod.old.unwrap_or(0),
            current,
        };
    }
    // One comet more than the old ones leave room for: the surge.
    let old_total: i32 = old.iter().sum();
    let target = current.max((desired + 1 - old_total).min(desired.max(1)));
    if current < target {
        return RollStep::Surge { current: target };
    }
    let fresh: Vec<&&RollPod> = live
        .iter()
        .filter(|p| p.old.is_none() && !p.drain_finished)
        .collect();
    let fresh_serving = fresh.iter().filter(|p| p.ready && p.listed).count();
    if fresh_serving < usize::try_from(current).unwrap_or(0) {
        let stuck = fresh
            .iter()
            .filter(|p| !p.ready && now.saturating_sub(p.created) >= progress)
            .map(|p| p.name.clone())
            .next();
        return RollStep::WaitNew { current, stuck };
    }
    // Never fewer serving comets than asked for: the one drained next is
    // the spare the surge made.
    let serving = live
        .iter()
        .filter(|p| p.ready && p.drain_started.is_none() && !p.drain_finished)
        .count();
    if serving < usize::try_from(desired).unwrap_or(0) + 1 {
        return RollStep::WaitNew {
            current,
            stuck: None,
        };
    }
    let oldest = live
        .iter()
        .filter(|p| p.old.is_some() && p.ready && p.drain_started.is_none() && !p.drain_finished)
        .min_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
    match oldest {
        Some(pod) => RollStep::Start {
            pod: pod.name.clone(),
            current,
        },
        None => RollStep::WaitNew {
            current,
            stuck: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, old: Option<usize>, created: u64) -> RollPod {
        RollPod {
            name: name.to_owned(),
            old,
            ready: true,
            connections: Some(10),
            drain_started: None,
            drain_finished: false,
            terminating: false,
            listed: true,
            created,
        }
    }

    /// Three old comets, none new yet.
    fn olds() -> Vec<RollPod> {
        vec![
            pod("o1", Some(0), 1),
            pod("o2", Some(0), 2),
            pod("o3", Some(0), 3),
        ]
    }

    #[test]
    fn a_new_comet_comes_first() {
        assert_eq!(
            roll_step(3, 0, &[3], &olds(), 60, 600, 100),
            RollStep::Surge { current: 1 }
        );
    }

    #[test]
    fn the_oldest_is_drained_once_the_new_comet_is_ready_and_listed() {
        let mut pods = olds();
        let mut new = pod("n1", None, 50);
        new.ready = false;
        pods.push(new.clone());
        assert_eq!(
            roll_step(3, 1, &[3], &pods, 60, 600, 100),
            RollStep::WaitNew {
                current: 1,
                stuck: None
            }
        );
        // Ready, but not yet in the node list clients are sent by.
        new.ready = true;
        new.listed = false;
        pods[3] = new.clone();
        assert!(matches!(
            roll_step(3, 1, &[3], &pods, 60, 600, 100),
            RollStep::WaitNew { .. }
        ));
        new.listed = true;
        pods[3] = new;
        assert_eq!(
            roll_step(3, 1, &[3], &pods, 60, 600, 100),
            RollStep::Start {
                pod: "o1".into(),
                current: 1
            }
        );
    }

    #[test]
    fn a_drain_is_waited_for_then_finished_then_the_next_surge() {
        let mut pods = olds();
        pods.push(pod("n1", None, 50));
        pods[0].drain_started = Some(100);
        assert_eq!(
            roll_step(3, 1, &[3], &pods, 60, 600, 110),
            RollStep::Wait {
                pod: "o1".into(),
                current: 1
            }
        );
        pods[0].connections = Some(0);
        assert_eq!(
            roll_step(3, 1, &[3], &pods, 60, 600, 111),
            RollStep::Finish {
                pod: "o1".into(),
                workload: 0,
                current: 1
            }
        );
        // Marked and counted out; the old ReplicaSet now asks for two.
        pods[0].drain_finished = true;
        assert_eq!(
            roll_step(3, 1, &[2], &pods, 60, 600, 112),
            RollStep::Surge { current: 2 }
        );
    }

    #[test]
    fn a_drain_past_its_deadline_finishes_with_clients_left() {
        let mut pods = olds();
        pods.push(pod("n1", None, 50));
        pods[1].drain_started = Some(100);
        assert!(matches!(
            roll_step(3, 1, &[3], &pods, 60, 600, 160),
            RollStep::Finish { .. }
        ));
    }

    #[test]
    fn the_last_old_comet_leaves_the_desired_count_new() {
        let mut pods = vec![pod("o3", Some(0), 3)];
        pods.extend([
            pod("n1", None, 50),
            pod("n2", None, 60),
            pod("n3", None, 70),
        ]);
        // 1 old + 3 new: never a fourth new one.
        assert_eq!(
            roll_step(3, 3, &[1], &pods, 60, 600, 100),
            RollStep::Start {
                pod: "o3".into(),
                current: 3
            }
        );
    }

    #[test]
    fn never_fewer_serving_than_desired() {
        // The surge is up but an old comet went unready with clients on it
        // (it is not idle): nothing is drained until it is back.
        let mut pods = olds();
        pods.push(pod("n1", None, 50));
        pods[2].ready = false;
        assert_eq!(
            roll_step(3, 1, &[3], &pods, 60, 600, 100),
            RollStep::WaitNew {
                current: 1,
                stuck: None
            }
        );
    }

    #[test]
    fn a_new_comet_never_ready_is_stuck_after_the_progress_deadline() {
        let mut pods = olds();
        let mut new = pod("n1", None, 50);
        new.ready = false;
        pods.push(new);
        assert_eq!(
            roll_step(3, 1, &[3], &pods, 60, 600, 649),
            RollStep::WaitNew {
                current: 1,
                stuck: None
            }
        );
        assert_eq!(
            roll_step(3, 1, &[3], &pods, 60, 600, 650),
            RollStep::WaitNew {
                current: 1,
                stuck: Some("n1".into())
            }
        );
    }

    #[test]
    fn idle_unready_old_comets_and_missing_ones_are_lowered_without_a_drain() {
        let mut pods = olds();
        pods[1].ready = false;
        pods[1].connections = Some(0);
        assert_eq!(
            roll_step(3, 0, &[3], &pods, 60, 600, 100),
            RollStep::Lower {
                pod: Some("o2".into()),
                workload: 0,
                current: 0
            }
        );
        // Two old workloads (a rollout restarted by a spec change); the
        // second asks for a comet it does not have.
        let pods = olds();
        assert_eq!(
            roll_step(3, 0, &[3, 1], &pods, 60, 600, 100),
            RollStep::Lower {
                pod: None,
                workload: 1,
                current: 0
            }
        );
    }

    #[test]
    fn a_spec_change_mid_rollout_carries_the_drain_through() {
        // Revision B had one comet up; C is now current: B's comet is old
        // too, and o1's drain goes on.
        let mut pods = vec![
            pod("o1", Some(0), 1),
            pod("o2", Some(0), 2),
            pod("b1", Some(1), 50),
        ];
        pods[0].drain_started = Some(90);
        assert_eq!(
            roll_step(2, 0, &[2, 1], &pods, 60, 600, 100),
            RollStep::Wait {
                pod: "o1".into(),
                current: 0
            }
        );
        pods[0].drain_finished = true;
        assert_eq!(
            roll_step(2, 0, &[1, 1], &pods, 60, 600, 101),
            RollStep::Surge { current: 1 }
        );
    }
}
