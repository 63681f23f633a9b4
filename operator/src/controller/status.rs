//! Pipeline step: report. Computes the PushCluster's status and conditions
//! from what was applied and polled, writes it only when it changed,
//! publishes Events, and reports what keeps the spec from being applied as
//! `Degraded`: a spec error stops the pipeline ([`degrade`]), missing
//! Secrets do not ([`report_degraded`]).

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::autoscale::{OVERRIDE_CONDITION, Scaled};
use super::dependencies::{self, Finding, ReadyCounts};
use super::observe::Polled;
use super::rollout::CometPlan;
use super::{Context, Error, Result, now_rfc3339};
use crate::build::{MANAGER, Names};
use crate::crd::{CometPodStatus, ComponentStatus, Condition, PushCluster, PushClusterStatus};
use crate::validate;

pub(super) async fn publish(
    ctx: &Context,
    cluster: &PushCluster,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let regarding = cluster.object_ref(&());
    if let Err(err) = ctx
        .events
        .publish(&regarding, type_, reason, reason, note)
        .await
    {
        warn!(cause = %err, reason, "cannot publish event");
    }
}

/// A spec error (admission normally refuses it): `Degraded` with the reason,
/// nothing built, and no look again until the spec changes.
pub(super) async fn degrade(
    ctx: &Context,
    cluster: &PushCluster,
    names: &Names,
    previous: &PushClusterStatus,
    invalid: validate::Invalid,
) -> Result<Action> {
    let mut status = previous.clone();
    status.observed_generation = cluster.metadata.generation;
    status.selector = Some(names.selector("comet"));
    set_condition(
        &mut status.conditions,
        "Degraded",
        true,
        invalid.reason,
        &invalid.message,
    );
    set_condition(
        &mut status.conditions,
        "Available",
        false,
        "Degraded",
        &invalid.message,
    );
    for condition in &mut status.conditions {
        condition.observed_generation = cluster.metadata.generation;
    }
    report_degraded(ctx, cluster, previous, Some(&invalid)).await;
    write_status(&ctx.client, names, previous, status).await?;
    ctx.metrics.reconcile_ok();
    Ok(Action::await_change())
}

/// Publishes and logs a change of `Degraded`: a Warning each time the problem
/// appears or its message changes (another Secret went missing), `Recovered`
/// when it is gone. Nothing while it stays the same.
pub(super) async fn report_degraded(
    ctx: &Context,
    cluster: &PushCluster,
    previous: &PushClusterStatus,
    now: Option<&validate::Invalid>,
) {
    // What this leader last reported; without memory, what the status says.
    let key = format!(
        "{}/{}",
        cluster.namespace().unwrap_or_default(),
        cluster.name_any()
    );
    let remembered = ctx
        .degraded
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(
            key,
            now.map(|now| (now.reason.to_owned(), now.message.clone())),
        );
    let was = remembered.unwrap_or_else(|| {
        previous
            .conditions
            .iter()
            .find(|c| c.type_ == "Degraded" && c.status == "True")
            .map(|c| (c.reason.clone(), c.message.clone()))
    });
    match (was, now) {
        (Some((reason, message)), Some(now)) if reason == now.reason && message == now.message => {}
        (_, Some(now)) => {
            // Not `message`: that is the line's own text, and a second
            // one would be a duplicate key in the JSON log format.
            info!(cluster = %cluster.name_any(), reason = now.reason, detail = %now.message, "degraded");
            publish(
                ctx,
                cluster,
                EventType::Warning,
                now.reason,
                now.message.clone(),
            )
            .await;
        }
        (Some((reason, message)), None) => {
            info!(cluster = %cluster.name_any(), was = %reason, "recovered");
            publish(
                ctx,
                cluster,
                EventType::Normal,
                "Recovered",
                format!("recovered from {reason}: {message}"),
            )
            .await;
        }
        (None, None) => {}
    }
}

fn component_status(deployment: Option<&Deployment>) -> ComponentStatus {
    ComponentStatus {
        desired_replicas: deployment
            .and_then(|d| d.spec.as_ref()?.replicas)
            .unwrap_or(0),
        ready_replicas: deployment
            .and_then(|d| d.status.as_ref()?.ready_replicas)
            .unwrap_or(0),
    }
}

fn progressing(deployment: &Deployment) -> bool {
    let desired = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(0);
    let Some(status) = &deployment.status else {
        return true;
    };
    status.observed_generation < deployment.metadata.generation
        || status.updated_replicas.unwrap_or(0) < desired
        || status.replicas.unwrap_or(0) > desired
}

/// What a pass found and did, for its status.
pub(super) struct Observed<'a> {
    /// The comet, logic and job Deployments that exist, as applied.
    pub(super) deployments: &'a [Deployment],
    pub(super) polled: &'a [Polled],
    /// The comet count the spec asks for after this pass's scaling step.
    pub(super) scaled: &'a Scaled,
    /// The comet workloads' replicas and any rollout under way.
    pub(super) comets: &'a CometPlan,
    pub(super) node_list_generation: i64,
    /// Referenced Secrets that are missing.
    pub(super) missing: Option<&'a validate::Invalid>,
    /// What unready pods said about their dependencies.
    pub(super) findings: &'a [Finding],
}

pub(super) fn compute_status(
    cluster: &PushCluster,
    names: &Names,
    previous: &PushClusterStatus,
    observed: &Observed<'_>,
) -> PushClusterStatus {
    let Observed {
        deployments,
        polled,
        scaled,
        comets: plan,
        node_list_generation,
        missing,
        findings,
    } = *observed;
    let spec_replicas = scaled.replicas;
    let deployment = |component: &str| {
        let name = names.component(component);
        deployments.iter().find(|d| d.name_any() == name)
    };
    // Under `rollout.strategy: Drain` comets run in one ReplicaSet per
    // revision: the serving pods are counted, whichever revision they run.
    let comet = match plan.revision {
        None => component_status(deployment("comet")),
        Some(_) => ComponentStatus {
            desired_replicas: spec_replicas,
            ready_replicas: i32::try_from(
                polled
                    .iter()
                    .filter(|p| p.ready && !p.terminating && p.drain_started.is_none())
                    .count(),
            )
            .unwrap_or(i32::MAX),
        },
    };
    let stuck = plan.stuck(&cluster.spec);
    let degraded = missing.or(stuck.as_ref());
    let logic = component_status(deployment("logic"));
    let job = component_status(deployment("job"));
    // Every comet on its way out: drained by the operator, draining on its
    // own (a SIGTERM from a rollout), or being deleted.
    let is_draining = |p: &Polled| {
        p.drain_started.is_some() || p.terminating || p.load.as_ref().is_some_and(|l| l.draining)
    };
    let draining: Vec<&Polled> = polled.iter().filter(|p| is_draining(p)).collect();
    let verdicts = dependencies::verdicts(
        findings,
        ReadyCounts {
            comet: comet.ready_replicas,
            logic: logic.ready_replicas,
            job: job.ready_replicas,
        },
    );
    let mut conditions = previous.conditions.clone();
    let all_ready = [&comet, &logic, &job]
        .iter()
        .all(|c| c.ready_replicas >= c.desired_replicas);
    let (reason, message) = if all_ready {
        (
            "AllReplicasReady",
            "every component has its replicas ready".to_owned(),
        )
    } else {
        let replicas = format!(
            "ready/desired: comet {}/{}, logic {}/{}, job {}/{}",
            comet.ready_replicas,
            comet.desired_replicas,
            logic.ready_replicas,
            logic.desired_replicas,
            job.ready_replicas,
            job.desired_replicas
        );
        // The cause, when an unready pod named one.
        match verdicts.iter().find(|v| v.status == "False") {
            Some(cause) => (
                cause.reason.as_str(),
                format!("{replicas}; {}: {}", cause.reason, cause.message),
            ),
            None => ("ReplicasNotReady", replicas),
        }
    };
    set_condition(&mut conditions, "Available", all_ready, reason, &message);
    for verdict in &verdicts {
        set_condition_status(
            &mut conditions,
            verdict.type_,
            verdict.status,
            &verdict.reason,
            &verdict.message,
        );
    }
    let rolling = deployments.iter().any(progressing) || comet.desired_replicas != spec_replicas;
    let updated = plan.rolling.as_ref().map_or(
        (comet.ready_replicas.min(spec_replicas), spec_replicas),
        |r| (r.updated, r.desired),
    );
    if let (Some(invalid), true) = (missing, deployments.is_empty()) {
        // Nothing built yet, and nothing will be until the Secrets exist.
        set_condition(
            &mut conditions,
            "Progressing",
            false,
            invalid.reason,
            "waiting for the referenced Secrets",
        );
    } else if let Some(roll) = &plan.rolling {
        set_condition(
            &mut conditions,
            "Progressing",
            true,
            "RollingComets",
            &format!(
                "{} of {} comets updated, one at a time",
                roll.updated, roll.desired
            ),
        );
    } else if rolling {
        set_condition(
            &mut conditions,
            "Progressing",
            true,
            "RollingOut",
            "deployments are converging on the spec",
        );
    } else {
        set_condition(
            &mut conditions,
            "Progressing",
            false,
            "Stable",
            "deployments match the spec",
        );
    }
    match degraded {
        Some(invalid) => set_condition(
            &mut conditions,
            "Degraded",
            true,
            invalid.reason,
            &invalid.message,
        ),
        None => set_condition(
            &mut conditions,
            "Degraded",
            false,
            "Valid",
            "spec is valid and its Secrets exist",
        ),
    }
    autoscaling_override(&mut conditions, scaled);
    match draining.first() {
        Some(pod) => set_condition(
            &mut conditions,
            "Draining",
            true,
            "CometDraining",
            &format!("draining comet {}", pod.name),
        ),
        None => set_condition(
            &mut conditions,
            "Draining",
            false,
            "NoDrain",
            "no comet is draining",
        ),
    }
    // Every condition was evaluated in this pass, for this generation.
    for condition in &mut conditions {
        condition.observed_generation = cluster.metadata.generation;
    }
    // Serving comets out of those asked for: a comet still draining after a
    // scale-down is not one of them, so this never reads "2/1".
    // (The Deployment's count, as `Available` uses, less the Ready pods
    // that are on their way out.)
    let leaving = polled.iter().filter(|p| p.ready && is_draining(p)).count();
    let serving = (comet.ready_replicas - i32::try_from(leaving).unwrap_or(i32::MAX))
        .clamp(0, spec_replicas.max(0));
    PushClusterStatus {
        observed_generation: cluster.metadata.generation,
        conditions,
        comets_ready: Some(format!("{serving}/{spec_replicas}")),
        updated_comets: Some(format!("{}/{}", updated.0, updated.1)),
        comet,
        logic,
        job,
        total_connections: i64::try_from(
            polled
                .iter()
                .filter_map(|p| p.load.as_ref().map(|l| l.connections))
                .sum::<u64>(),
        )
        .unwrap_or(i64::MAX),
        draining_comets: i32::try_from(draining.len()).unwrap_or(i32::MAX),
        pods: polled
            .iter()
            .map(|p| CometPodStatus {
                name: p.name.clone(),
                connections: p
                    .load
                    .as_ref()
                    .map_or(0, |l| i64::try_from(l.connections).unwrap_or(i64::MAX)),
                rooms: p
                    .load
                    .as_ref()
                    .map_or(0, |l| i64::try_from(l.rooms).unwrap_or(i64::MAX)),
                draining: is_draining(p),
            })
            .collect(),
        node_list_generation,
        scaled_replicas: Some(spec_replicas),
        selector: Some(names.selector("comet")),
        last_reconcile_time: previous.last_reconcile_time.clone(),
    }
}

/// `AutoscalingOverride`, present while autoscaling is on: `True` from a
/// manual scale the autoscaler undid (the message names both counts) until
/// the autoscaler next changes the count for the load.
fn autoscaling_override(conditions: &mut Vec<Condition>, scaled: &Scaled) {
    if !scaled.autoscaling {
        conditions.retain(|c| c.type_ != OVERRIDE_CONDITION);
        return;
    }
    let present = conditions.iter().any(|c| c.type_ == OVERRIDE_CONDITION);
    match &scaled.overridden {
        Some(overridden) => set_condition(
            conditions,
            OVERRIDE_CONDITION,
            true,
            "ManualScaleOverridden",
            &overridden.message(),
        ),
        None if !present || scaled.by_load => set_condition(
            conditions,
            OVERRIDE_CONDITION,
            false,
            "AutoscalerInControl",
            "comet.replicas follows the load",
        ),
        None => {}
    }
}

/// Sets a condition, keeping `lastTransitionTime` unless the status flips.
fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
) {
    let status = if status { "True" } else { "False" };
    set_condition_status(conditions, type_, status, reason, message);
}

/// [`set_condition`] with the status as written (`True`, `False`, `Unknown`).
fn set_condition_status(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
) {
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => {
            if existing.status != status {
                existing.last_transition_time = now_rfc3339();
            }
            existing.status = status.to_owned();
            existing.reason = reason.to_owned();
            existing.message = message.to_owned();
        }
        None => conditions.push(Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message: message.to_owned(),
            last_transition_time: now_rfc3339(),
            observed_generation: None,
        }),
    }
}

/// `status.lastReconcileTime` is refreshed at least this often, in seconds.
const LIVENESS_REFRESH_SECS: i64 = 60;

pub(super) async fn write_status(
    client: &Client,
    names: &Names,
    previous: &PushClusterStatus,
    mut status: PushClusterStatus,
) -> Result<()> {
    // Unchanged status is not written, except to say the operator is alive
    // at least once every LIVENESS_REFRESH.
    status.last_reconcile_time = previous.last_reconcile_time.clone();
    let fresh = previous
        .last_reconcile_time
        .as_deref()
        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .is_some_and(|t| {
            k8s_openapi::jiff::Timestamp::now().duration_since(t)
                < k8s_openapi::jiff::SignedDuration::from_secs(LIVENESS_REFRESH_SECS)
        });
    if *previous == status && fresh {
        return Ok(());
    }
    status.last_reconcile_time = Some(now_rfc3339());
    let patch = json!({
        "apiVersion": "herald.dev/v1alpha1", "kind": "PushCluster",
        "status": status,
    });
    Api::<PushCluster>::namespaced(client.clone(), &names.namespace)
        .patch_status(
            &names.cluster,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| Error::Apply {
            what: "PushCluster status".to_owned(),
            source,
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use herald_protocol::pb::admin::LoadReply;

    use super::super::autoscale::Override;
    use super::super::rollout::Rolling;
    use super::*;

    fn condition_is(conditions: &[Condition], type_: &str, status: bool, reason: &str) -> bool {
        conditions.iter().any(|c| {
            c.type_ == type_
                && c.status == if status { "True" } else { "False" }
                && c.reason == reason
        })
    }

    fn scaled(autoscaling: bool, by_load: bool, overridden: Option<Override>) -> Scaled {
        Scaled {
            replicas: 1,
            autoscaling,
            by_load,
            overridden,
        }
    }

    /// A rollout's leaving comet: still Ready, counted by the Deployment,
    /// draining on its own SIGTERM. DRAINING counts it and COMETS does not,
    /// so a cluster asking for one comet never reads `2/1`; every condition
    /// is stamped with the generation; a dependency cause becomes
    /// `Available`'s reason.
    #[test]
    fn status_counts_leaving_comets_as_draining_not_serving() {
        let cluster: PushCluster = serde_json::from_value(serde_json::json!({
            "apiVersion": "herald.dev/v1alpha1", "kind": "PushCluster",
            "metadata": {"name": "chat", "namespace": "ns", "uid": "u-1", "generation": 7},
            "spec": {"image": "herald:test", "redis": {"addr": "r:6379"},
                     "kafka": {"brokers": ["k:9092"]}, "comet": {"replicas": 1}}
        }))
        .unwrap();
        let names = Names::of(&cluster).unwrap();
        let deployment = |component: &str, desired: i32, ready: i32| -> Deployment {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("chat-{component}"), "generation": 1},
                "spec": {"replicas": desired, "selector": {}, "template": {}},
                "status": {"observedGeneration": 1, "replicas": desired,
                           "updatedReplicas": desired, "readyReplicas": ready}
            }))
            .unwrap()
        };
        let deployments = [
            deployment("comet", 1, 2),
            deployment("logic", 1, 0),
            deployment("job", 1, 1),
        ];
        let comet = |name: &str, terminating: bool| Polled {
            name: name.to_owned(),
            ip: Some("127.0.0.9".to_owned()),
            ready: true,
            terminating,
            drain_started: None,
            drain_finished: false,
            load: Some(LoadReply::default()),
            revision: None,
            created: 0,
        };
        let polled = [comet("new", false), comet("old", true)];
        let findings = [Finding {
            component: "logic".to_owned(),
            pod: "chat-logic-1".to_owned(),
            reason: "RedisAuthFailed".to_owned(),
            detail: "WRONGPASS".to_owned(),
        }];
        let observed = Observed {
            deployments: &deployments,
            polled: &polled,
            scaled: &scaled(false, false, None),
            comets: &CometPlan {
                current: 1,
                old: vec![],
                rolling: None,
                revision: None,
            },
            node_list_generation: 3,
            missing: None,
            findings: &findings,
        };
        let status = compute_status(&cluster, &names, &PushClusterStatus::default(), &observed);
        assert_eq!(status.comets_ready.as_deref(), Some("1/1"));
        assert_eq!(status.draining_comets, 1);
        assert!(status.pods.iter().any(|p| p.name == "old" && p.draining));
        assert!(condition_is(
            &status.conditions,
            "Available",
            false,
            "RedisAuthFailed"
        ));
        assert!(condition_is(
            &status.conditions,
            "RedisReady",
            false,
            "RedisAuthFailed"
        ));
        assert!(
            status
                .conditions
                .iter()
                .all(|c| c.observed_generation == Some(7))
        );
    }

    #[test]
    fn an_override_holds_until_the_autoscaler_moves_for_the_load() {
        let mut conditions = Vec::new();
        autoscaling_override(&mut conditions, &scaled(true, false, None));
        assert!(condition_is(
            &conditions,
            OVERRIDE_CONDITION,
            false,
            "AutoscalerInControl"
        ));
        let kubectl = Override {
            requested: 3,
            by: "kubectl".to_owned(),
            kept: 1,
        };
        autoscaling_override(&mut conditions, &scaled(true, false, Some(kubectl)));
        assert!(condition_is(
            &conditions,
            OVERRIDE_CONDITION,
            true,
            "ManualScaleOverridden"
        ));
        assert!(conditions[0].message.contains("set to 3 by kubectl"));
        autoscaling_override(&mut conditions, &scaled(true, false, None));
        assert!(
            condition_is(
                &conditions,
                OVERRIDE_CONDITION,
                true,
                "ManualScaleOverridden"
            ),
            "a quiet pass keeps it"
        );
        autoscaling_override(&mut conditions, &scaled(true, true, None));
        assert!(condition_is(
            &conditions,
            OVERRIDE_CONDITION,
            false,
            "AutoscalerInControl"
        ));
        autoscaling_override(&mut conditions, &scaled(false, false, None));
        assert!(conditions.is_empty(), "gone with autoscaling off");
    }

    #[test]
    fn transition_time_kept_unless_status_flips() {
        let mut conditions = Vec::new();
        set_condition(&mut conditions, "Available", false, "A", "m");
        conditions[0].last_transition_time = "old".to_owned();
        set_condition(&mut conditions, "Available", false, "B", "m2");
        assert_eq!(conditions[0].last_transition_time, "old");
        assert_eq!(conditions[0].reason, "B");
        set_condition(&mut conditions, "Available", true, "C", "m3");
        assert_ne!(conditions[0].last_transition_time, "old");
        assert!(condition_is(&conditions, "Available", true, "C"));
    }

    /// A rollout under way: `Progressing` says where it is, UPDATED counts
    /// the serving comets on the new template, COMETS every serving comet;
    /// a new comet that never became Ready is `Degraded` `RolloutStuck`.
    #[test]
    fn a_rollout_reports_its_progress_and_a_stuck_comet() {
        let cluster: PushCluster = serde_json::from_value(serde_json::json!({
            "apiVersion": "herald.dev/v1alpha1", "kind": "PushCluster",
            "metadata": {"name": "chat", "namespace": "ns", "uid": "u-1", "generation": 2},
            "spec": {"image": "herald:test", "redis": {"addr": "r:6379"},
                     "kafka": {"brokers": ["k:9092"]}, "comet": {"replicas": 3}}
        }))
        .unwrap();
        let names = Names::of(&cluster).unwrap();
        let comet = |name: &str, revision: &str| Polled {
            name: name.to_owned(),
            ip: Some("127.0.0.9".to_owned()),
            ready: true,
            terminating: false,
            drain_started: None,
            drain_finished: false,
            load: Some(LoadReply::default()),
            revision: Some(revision.to_owned()),
            created: 0,
        };
        let polled = [
            comet("o1", "a"),
            comet("o2", "a"),
            comet("o3", "a"),
            comet("n1", "b"),
        ];
        let mut plan = CometPlan {
            current: 1,
            old: vec![],
            rolling: Some(Rolling {
                updated: 1,
                desired: 3,
                stuck: None,
            }),
            revision: Some("b".to_owned()),
        };
        let mut three = scaled(false, false, None);
        three.replicas = 3;
        let observe = |plan: &CometPlan| {
            compute_status(
                &cluster,
                &names,
                &PushClusterStatus::default(),
                &Observed {
                    deployments: &[],
                    polled: &polled,
                    scaled: &three,
                    comets: plan,
                    node_list_generation: 1,
                    missing: None,
                    findings: &[],
                },
            )
        };
        let status = observe(&plan);
        assert_eq!(status.updated_comets.as_deref(), Some("1/3"));
        assert_eq!(
            status.comets_ready.as_deref(),
            Some("3/3"),
            "four serve, three asked"
        );
        assert!(condition_is(
            &status.conditions,
            "Progressing",
            true,
            "RollingComets"
        ));
        assert!(
            status
                .conditions
                .iter()
                .any(|c| c.message == "1 of 3 comets updated, one at a time")
        );
        assert!(condition_is(&status.conditions, "Degraded", false, "Valid"));
        plan.rolling = Some(Rolling {
            updated: 0,
            desired: 3,
            stuck: Some("n1".to_owned()),
        });
        let status = observe(&plan);
        assert!(condition_is(
            &status.conditions,
            "Degraded",
            true,
            "RolloutStuck"
        ));
        assert!(condition_is(
            &status.conditions,
            "Progressing",
            true,
            "RollingComets"
        ));
    }
}
