//! Pipeline step: scaling. With autoscaling on, the operator's own comet
//! autoscaler turns the polled connection count into a replica count (kept
//! steady through the scale-down window) and writes it through the
//! PushCluster's `/scale`; it wins over a `comet.replicas` someone else set
//! meanwhile (as an HPA does), and says so. With it off, `comet.replicas`
//! decides. Either way each change of the count is an Event and a log line.

use std::time::Duration;

use kube::ResourceExt;
use kube::api::{Api, Patch};
use kube::runtime::events::EventType;
use serde_json::json;
use tracing::{info, warn};

use super::observe::Polled;
use super::status::publish;
use super::{Context, Error, Result, merge_params, since_epoch};
use crate::build::{MANAGER, Names};
use crate::crd::{PushCluster, PushClusterStatus};
use crate::scale;

/// The condition that reports an overridden manual scale.
pub(super) const OVERRIDE_CONDITION: &str = "AutoscalingOverride";

/// What the scaling step decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Scaled {
    /// The comet count the spec asks for after this pass.
    pub(super) replicas: i32,
    /// Whether the autoscaler is on.
    pub(super) autoscaling: bool,
    /// Whether the autoscaler changed the count for the load on this pass.
    pub(super) by_load: bool,
    /// A `comet.replicas` someone else set while autoscaling was on, which
    /// the autoscaler replaced on this pass.
    pub(super) overridden: Option<Override>,
}

/// A manual scale the autoscaler undid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Override {
    /// The count asked for.
    pub(super) requested: i32,
    /// Who asked (the field manager of `spec.comet.replicas`).
    pub(super) by: String,
    /// The count the autoscaler keeps instead.
    pub(super) kept: i32,
}

impl Override {
    pub(super) fn message(&self) -> String {
        format!(
            "comet.replicas was set to {} by {}, but autoscaling is on: the autoscaler keeps \
             {} comets (turn comet.autoscaling.enabled off to scale by hand)",
            self.requested, self.by, self.kept
        )
    }
}

/// The field managers that own `spec.comet.replicas`, from `managedFields`
/// (`kubectl scale` is `kubectl`, an HPA `horizontal-pod-autoscaler`).
fn replicas_owners(cluster: &PushCluster) -> Vec<String> {
    cluster
        .managed_fields()
        .iter()
        .filter(|entry| {
            entry
                .fields_v1
                .as_ref()
                .and_then(|f| f.0.pointer("/f:spec/f:comet/f:replicas"))
                .is_some()
        })
        .filter_map(|entry| entry.manager.clone())
        .collect()
}

/// Who changed `comet.replicas` from `last`, the count the operator last
/// acted on, if that was not the operator: `None` when it still holds that
/// count, or when the operator wrote the new one (a pass that wrote `/scale`
/// but not its status).
fn manual_change(cluster: &PushCluster, last: Option<i32>) -> Option<String> {
    let last = last?;
    if last == cluster.spec.comet.replicas {
        return None;
    }
    let owners = replicas_owners(cluster);
    if owners.iter().any(|owner| owner == MANAGER) {
        return None;
    }
    Some(
        owners
            .into_iter()
            .next()
            .unwrap_or_else(|| "an unknown writer".to_owned()),
    )
}

/// The comet count this leader last acted on for a PushCluster, the newest
/// generation of it seen then, and the manual scale it undid while that
/// count stands. The override is kept here, not read back from the status:
/// the pass after the one that undid it is woken by its own `/scale` write
/// and can see the status from before it, which would turn the condition
/// back to `False` before anyone read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Handled {
    generation: i64,
    replicas: i32,
    overridden: Option<Override>,
}

/// The count asked for on this pass and the count last acted on. The
/// PushCluster a pass gets can be one write behind this leader (its own
/// `/scale` or status write not yet in the watch cache): a generation it
/// already handled asks for nothing new, and the count it acted on stands.
/// Without memory (a new leader) the status says what was acted on.
fn requested_and_last(
    ctx: &Context,
    key: &str,
    cluster: &PushCluster,
    previous: &PushClusterStatus,
) -> (i32, Option<i32>, bool, Option<Override>) {
    let handled = ctx
        .scaled
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(key)
        .cloned();
    let generation = cluster.metadata.generation.unwrap_or(0);
    match handled {
        Some(h) if generation <= h.generation => (h.replicas, Some(h.replicas), true, h.overridden),
        Some(h) => (
            cluster.spec.comet.replicas,
            Some(h.replicas),
            false,
            h.overridden,
        ),
        None => (
            cluster.spec.comet.replicas,
            previous.scaled_replicas,
            false,
            None,
        ),
    }
}

fn remember(
    ctx: &Context,
    key: String,
    cluster: &PushCluster,
    replicas: i32,
    overridden: Option<Override>,
) {
    let generation = cluster.metadata.generation.unwrap_or(0);
    let mut scaled = ctx.scaled.lock().unwrap_or_else(|e| e.into_inner());
    let newest = scaled
        .get(&key)
        .map_or(generation, |h| h.generation.max(generation));
    scaled.insert(
        key,
        Handled {
            generation: newest,
            replicas,
            overridden,
        },
    );
}

/// Decides this pass's comet count, writes the autoscaler's decision
/// through `/scale` (as an HPA would), and publishes and logs each change.
pub(super) async fn autoscale(
    ctx: &Context,
    cluster: &PushCluster,
    names: &Names,
    previous: &PushClusterStatus,
    polled: &[Polled],
) -> Result<Scaled> {
    let key = format!("{}/{}", names.namespace, names.cluster);
    let (requested, last, stale, undone) = requested_and_last(ctx, &key, cluster, previous);
    let auto = &cluster.spec.comet.autoscaling;
    if !auto.enabled {
        if let Some(last) = last.filter(|last| *last != requested && !stale) {
            info!(cluster = %cluster.name_any(), from = last, to = requested, "comet.replicas changed");
            publish(
                ctx,
                cluster,
                EventType::Normal,
                "ScaledComets",
                format!("comets {last} -> {requested} (comet.replicas)"),
            )
            .await;
        }
        remember(ctx, key, cluster, requested, None);
        return Ok(Scaled {
            replicas: requested,
            autoscaling: false,
            by_load: false,
            overridden: None,
        });
    }
    // Someone else set comet.replicas while the autoscaler was in charge
    // (it was on in the last pass, which set the condition): the autoscaler
    // wins and goes on from its own count.
    let was_on = previous
        .conditions
        .iter()
        .any(|c| c.type_ == OVERRIDE_CONDITION);
    let manual = if was_on && !stale {
        manual_change(cluster, last)
    } else {
        None
    };
    let base = match (&manual, last) {
        (Some(_), Some(last)) => last,
        _ => requested,
    };
    let total: u64 = polled
        .iter()
        .filter_map(|p| p.load.as_ref().map(|l| l.connections))
        .sum();
    let wanted = scale::wanted(
        total,
        auto.target_connections_per_replica,
        auto.min_replicas,
        auto.max_replicas,
    );
    let next = {
        let mut windows = ctx.windows.lock().unwrap_or_else(|e| e.into_inner());
        let window = windows
            .entry(format!("{}/{}", names.namespace, names.cluster))
            .or_default();
        let stabilization =
            Duration::from_secs(u64::try_from(auto.scale_down_stabilization_seconds).unwrap_or(0));
        scale::next_replicas(base, wanted, stabilization, since_epoch(), window)
    };
    if next != requested {
        Api::<PushCluster>::namespaced(ctx.client.clone(), &names.namespace)
            .patch_scale(
                &names.cluster,
                &merge_params(),
                &Patch::Merge(json!({"spec": {"replicas": next}})),
            )
            .await
            .map_err(|source| Error::Apply {
                what: "PushCluster /scale".to_owned(),
                source,
            })?;
    }
    let overridden = manual.map(|by| Override {
        requested,
        by,
        kept: next,
    });
    if let Some(overridden) = &overridden {
        // Logged and published once, when it happens.
        warn!(
            cluster = %cluster.name_any(),
            requested = overridden.requested,
            by = %overridden.by,
            kept = overridden.kept,
            "manual scale overridden by the autoscaler"
        );
        publish(
            ctx,
            cluster,
            EventType::Warning,
            "ManualScaleOverridden",
            overridden.message(),
        )
        .await;
    }
    let by_load = next != base;
    // An override stands (and is reported again, without a new Event) until
    // the autoscaler moves the count for the load.
    let overridden = match overridden {
        Some(new) => Some(new),
        None if !by_load => undone.filter(|o| o.kept == next),
        None => None,
    };
    remember(ctx, key, cluster, next, overridden.clone());
    if by_load {
        info!(cluster = %cluster.name_any(), from = base, to = next, connections = total, "autoscaled comets");
        publish(
            ctx,
            cluster,
            EventType::Normal,
            "ScaledComets",
            format!(
                "comets {base} -> {next} for {total} connections ({} per comet wanted)",
                auto.target_connections_per_replica
            ),
        )
        .await;
    }
    Ok(Scaled {
        replicas: next,
        autoscaling: true,
        by_load,
        overridden,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn cluster(replicas: i32, managers: &[(&str, bool)]) -> PushCluster {
        let managed: Vec<_> = managers
            .iter()
            .map(|(manager, owns_replicas)| {
                let fields = if *owns_replicas {
                    json!({"f:spec": {"f:comet": {"f:replicas": {}}}})
                } else {
                    json!({"f:spec": {"f:image": {}}})
                };
                json!({"manager": manager, "operation": "Update", "fieldsType": "FieldsV1",
                       "fieldsV1": fields})
            })
            .collect();
        serde_json::from_value(json!({
            "apiVersion": "herald.dev/v1alpha1", "kind": "PushCluster",
            "metadata": {"name": "chat", "managedFields": managed},
            "spec": {"image": "i", "redis": {"addr": "r:1"}, "kafka": {"brokers": ["k:1"]},
                     "comet": {"replicas": replicas}}
        }))
        .unwrap()
    }

    #[test]
    fn a_count_someone_else_set_is_a_manual_change() {
        let scaled = cluster(4, &[("kubectl", true), (MANAGER, false)]);
        assert_eq!(manual_change(&scaled, Some(2)).as_deref(), Some("kubectl"));
        assert_eq!(manual_change(&scaled, Some(4)), None, "unchanged");
        assert_eq!(manual_change(&scaled, None), None, "nothing acted on yet");
    }

    #[test]
    fn a_count_the_operator_wrote_is_not() {
        // Its /scale write landed but its status did not.
        let scaled = cluster(4, &[("kubectl", false), (MANAGER, true)]);
        assert_eq!(manual_change(&scaled, Some(2)), None);
    }
}
