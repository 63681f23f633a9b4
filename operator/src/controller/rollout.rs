//! Pipeline step: the comet workloads. Under `rollout.strategy: Drain` (the
//! default) each pod template is a revision with its own ReplicaSet; while
//! an older revision still has comets, the operator rolls them one at a time
//! ([`crate::rollout::roll_step`]): surge, drain the oldest onto the new
//! comets, lower its ReplicaSet once it is empty, repeat. Without an older
//! revision, scale-downs drain as before (`drain`). Under `Deployment`, one
//! comet Deployment and Kubernetes' rolling update.

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::info;

use super::apply::delete_child;
use super::drain::{Reach, drain, start_drain};
use super::fetch::Fetched;
use super::observe::Polled;
use super::status::publish;
use super::{Context, DELETION_COST, DRAINED_COST, Error, Result, merge_params, now_secs};
use crate::build::{Names, REVISION_LABEL};
use crate::crd::{PushCluster, PushClusterSpec, RolloutStrategy};
use crate::rollout::{RollPod, RollStep, roll_step};
use crate::validate::Invalid;

/// A comet workload of an older revision, on its way out.
#[derive(Clone, Debug)]
pub(super) struct OldWorkload {
    /// `ReplicaSet` (an older revision) or `Deployment` (comets from before
    /// a switch to `Drain`).
    kind: &'static str,
    name: String,
    /// Its revision label (none for the Deployment).
    revision: Option<String>,
    /// Replicas it asks for now.
    replicas: i32,
    /// The replicas it gets after this pass.
    pub(super) next: i32,
    /// Its live pods.
    pods: usize,
}

/// Where a rollout stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Rolling {
    /// Serving comets of the current revision.
    pub(super) updated: i32,
    /// Comets asked for.
    pub(super) desired: i32,
    /// A new comet past the progress deadline: the rollout stopped there.
    pub(super) stuck: Option<String>,
}

/// What this pass does with the comet workloads.
#[derive(Debug)]
pub(super) struct CometPlan {
    /// Replicas of the current workload (the current revision's
    /// ReplicaSet, or the comet Deployment).
    pub(super) current: i32,
    /// Older workloads and the replicas each gets.
    pub(super) old: Vec<OldWorkload>,
    /// Set while older comets remain.
    pub(super) rolling: Option<Rolling>,
    /// The current revision, under `Drain`.
    pub(super) revision: Option<String>,
}

impl CometPlan {
    /// `Degraded` of a rollout stopped by a new comet that never became
    /// Ready.
    pub(super) fn stuck(&self, spec: &PushClusterSpec) -> Option<Invalid> {
        let pod = self.rolling.as_ref()?.stuck.as_ref()?;
        Some(Invalid {
            reason: "RolloutStuck",
            message: format!(
                "new comet {pod} is not Ready after {}s (rollout.progressDeadlineSeconds): \
                 the rollout stopped; the old comets keep serving",
                spec.comet.rollout.progress_deadline_seconds
            ),
        })
    }
}

/// Decides the comet workloads' replicas for this pass and carries out its
/// drain or rollout step. `revision`: the current template's revision
/// (`None` when the spec is not applied on this pass: then the newest
/// ReplicaSet stands for it).
pub(super) async fn plan(
    ctx: &Context,
    cluster: &PushCluster,
    names: &Names,
    fetched: &Fetched,
    polled: &mut [Polled],
    desired: i32,
    revision: Option<&str>,
) -> Result<CometPlan> {
    let reach = Reach {
        external: &fetched.external,
        token: &fetched.grpc_token,
    };
    let uid = cluster.meta().uid.clone();
    let ours = |rs: &&ReplicaSet| {
        rs.owner_references()
            .iter()
            .any(|o| Some(&o.uid) == uid.as_ref())
    };
    let sets: Vec<&ReplicaSet> = fetched.comet_replica_sets.iter().filter(ours).collect();
    let revision_of = |rs: &ReplicaSet| rs.labels().get(REVISION_LABEL).cloned();
    let replicas_of = |rs: &ReplicaSet| rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    let live_pods = |revision: Option<&str>| {
        polled
            .iter()
            .filter(|p| !p.terminating && p.revision.as_deref() == revision)
            .count()
    };
    if cluster.spec.comet.rollout.strategy == RolloutStrategy::Deployment {
        // Switching back to a Deployment replaces the comets at once
        // (documented): the ReplicaSets go to zero.
        let old = sets
            .iter()
            .map(|rs| OldWorkload {
                kind: "ReplicaSet",
                name: rs.name_any(),
                revision: revision_of(rs),
                replicas: replicas_of(rs),
                next: 0,
                pods: live_pods(revision_of(rs).as_deref()),
            })
            .collect();
        let deployed = fetched
            .comet_deployment
            .as_ref()
            .and_then(|d| d.spec.as_ref()?.replicas);
        let current = drain(ctx, cluster, names, reach, polled, desired, deployed).await?;
        return Ok(CometPlan {
            current,
            old,
            rolling: None,
            revision: None,
        });
    }
    let newest = sets
        .iter()
        .max_by_key(|rs| rs.creation_timestamp().map(|t| t.0))
        .and_then(|rs| revision_of(rs));
    let Some(current_revision) = revision.map(str::to_owned).or(newest) else {
        // Nothing built yet.
        return Ok(CometPlan {
            current: desired,
            old: vec![],
            rolling: None,
            revision: None,
        });
    };
    let current_set = sets
        .iter()
        .find(|rs| revision_of(rs).as_deref() == Some(&current_revision));
    let deployed = current_set.map(|rs| replicas_of(rs));
    let mut old: Vec<OldWorkload> = sets
        .iter()
        .filter(|rs| revision_of(rs).as_deref() != Some(&current_revision))
        .map(|rs| OldWorkload {
            kind: "ReplicaSet",
            name: rs.name_any(),
            revision: revision_of(rs),
            replicas: replicas_of(rs),
            next: replicas_of(rs),
            pods: live_pods(revision_of(rs).as_deref()),
        })
        .collect();
    if let Some(deployment) = &fetched.comet_deployment {
        let replicas = deployment
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(0);
        old.push(OldWorkload {
            kind: "Deployment",
            name: deployment.name_any(),
            revision: None,
            replicas,
            next: replicas,
            pods: live_pods(None),
        });
    }
    if !old.iter().any(|w| w.replicas > 0) {
        // Comets of older revisions still about (drained, going) are not
        // this revision's to scale.
        for p in polled.iter_mut() {
            if p.revision.as_deref() != Some(&current_revision) {
                p.terminating = true;
            }
        }
        let current = drain(ctx, cluster, names, reach, polled, desired, deployed).await?;
        return Ok(CometPlan {
            current,
            old,
            rolling: None,
            revision: Some(current_revision),
        });
    }
    let listed: Vec<&str> = fetched
        .node_list
        .as_ref()
        .map(|list| {
            list.nodes
                .iter()
                .filter(|n| !n.draining)
                .map(|n| n.name.as_str())
                .collect()
        })
        .unwrap_or_default();
    let pods: Vec<RollPod> = polled
        .iter()
        .map(|p| {
            let current = p.revision.as_deref() == Some(&current_revision);
            let workload = old.iter().position(|w| w.revision == p.revision);
            RollPod {
                name: p.name.clone(),
                old: if current { None } else { workload },
                ready: p.ready,
                connections: p.load.as_ref().map(|l| l.connections),
                drain_started: p.drain_started,
                drain_finished: p.drain_finished,
                // A pod of no workload of this cluster's is none of ours.
                terminating: p.terminating || (!current && workload.is_none()),
                listed: listed.contains(&p.name.as_str()),
                created: p.created,
            }
        })
        .collect();
    let spec = &cluster.spec;
    let replicas: Vec<i32> = old.iter().map(|w| w.replicas).collect();
    let step = roll_step(
        desired,
        deployed.unwrap_or(0),
        &replicas,
        &pods,
        u64::try_from(spec.comet.drain.deadline_seconds).unwrap_or(0),
        u64::try_from(spec.comet.rollout.progress_deadline_seconds).unwrap_or(0),
        now_secs(),
    );
    let current = step.current();
    let mut stuck = None;
    match step {
        RollStep::Surge { current } => {
            info!(cluster = %cluster.name_any(), revision = %current_revision, current, "rollout: starting a new comet");
        }
        RollStep::WaitNew { stuck: found, .. } => stuck = found,
        RollStep::Wait { .. } => {}
        RollStep::Start { pod, .. } => {
            let others = redirect_targets(fetched, polled, &pod, &current_revision);
            start_drain(
                ctx,
                cluster,
                names,
                polled,
                &pod,
                others,
                &fetched.grpc_token,
            )
            .await?;
        }
        RollStep::Finish { pod, workload, .. } => {
            mark_drained(ctx, names, &pod).await?;
            if let Some(w) = old.get_mut(workload) {
                w.next = w.replicas - 1;
            }
            info!(cluster = %cluster.name_any(), %pod, "rollout: old comet drained; removing it");
            publish(
                ctx,
                cluster,
                EventType::Normal,
                "DrainFinished",
                format!("comet {pod} drained; replaced by revision {current_revision}"),
            )
            .await;
        }
        RollStep::Lower { pod, workload, .. } => {
            if let Some(pod) = &pod {
                mark_drained(ctx, names, pod).await?;
            }
            if let Some(w) = old.get_mut(workload) {
                w.next = w.replicas - 1;
            }
        }
    }
    let updated = polled
        .iter()
        .filter(|p| {
            p.revision.as_deref() == Some(&current_revision)
                && p.ready
                && !p.terminating
                && p.drain_started.is_none()
        })
        .count();
    Ok(CometPlan {
        current,
        old,
        rolling: Some(Rolling {
            updated: i32::try_from(updated).unwrap_or(i32::MAX).min(desired),
            desired,
            stuck,
        }),
        revision: Some(current_revision),
    })
}

/// Where a drained old comet's clients go: the load balancer's addresses
/// when the comet Service has them, else the current revision's serving
/// comets.
fn redirect_targets(
    fetched: &Fetched,
    polled: &[Polled],
    pod: &str,
    revision: &str,
) -> Vec<String> {
    if !fetched.external.is_empty() {
        return fetched.external.clone();
    }
    polled
        .iter()
        .filter(|p| {
            p.name != pod
                && p.ready
                && p.drain_started.is_none()
                && p.revision.as_deref() == Some(revision)
        })
        .filter_map(|p| p.ip.clone())
        .collect()
}

/// Marks `pod` as the one its ReplicaSet removes when lowered.
async fn mark_drained(ctx: &Context, names: &Names, pod: &str) -> Result<()> {
    Api::<Pod>::namespaced(ctx.client.clone(), &names.namespace)
        .patch(
            pod,
            &merge_params(),
            &Patch::Merge(json!({"metadata": {"annotations": {DELETION_COST: DRAINED_COST}}})),
        )
        .await
        .map_err(|source| Error::Apply {
            what: format!("annotation {DELETION_COST} on pod {pod}"),
            source,
        })?;
    Ok(())
}

/// Applies the old workloads' replicas from the plan, and deletes those at
/// zero with no pod left (the current one was applied with the children).
pub(super) async fn settle_old(ctx: &Context, names: &Names, plan: &CometPlan) -> Result<()> {
    for w in &plan.old {
        match w.kind {
            "Deployment" => {
                settle(
                    &Api::<Deployment>::namespaced(ctx.client.clone(), &names.namespace),
                    w,
                )
                .await?
            }
            _ => {
                settle(
                    &Api::<ReplicaSet>::namespaced(ctx.client.clone(), &names.namespace),
                    w,
                )
                .await?
            }
        }
    }
    Ok(())
}

/// One old workload: deleted once empty, else lowered to its next count.
async fn settle<K>(api: &Api<K>, w: &OldWorkload) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    if w.next == 0 && w.pods == 0 {
        if delete_child(api, &w.name).await? {
            info!(kind = w.kind, name = %w.name, "old comet workload removed");
        }
    } else if w.next != w.replicas {
        let patch = Patch::Merge(json!({"spec": {"replicas": w.next}}));
        api.patch(&w.name, &merge_params(), &patch)
            .await
            .map_err(|source| Error::Apply {
                what: format!("replicas of {} {}", w.kind, w.name),
                source,
            })?;
    }
    Ok(())
}
