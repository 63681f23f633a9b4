//! Pipeline step: the operator's own comet autoscaler. It turns the polled
//! connection count into a replica count (kept steady through the scale-down
//! window) and writes it through the PushCluster's `/scale`.

use std::time::Duration;

use kube::api::{Api, Patch};
use kube::runtime::events::EventType;
use serde_json::json;

use super::observe::Polled;
use super::status::publish;
use super::{Context, Error, Result, merge_params, since_epoch};
use crate::build::Names;
use crate::crd::PushCluster;
use crate::scale;

/// The operator's own autoscaler: writes its decision through `/scale` (as
/// an HPA would) and returns the comet count the spec now asks for.
pub(super) async fn autoscale(
    ctx: &Context,
    cluster: &PushCluster,
    names: &Names,
    polled: &[Polled],
) -> Result<i32> {
    let current = cluster.spec.comet.replicas;
    let auto = &cluster.spec.comet.autoscaling;
    if !auto.enabled {
        return Ok(current);
    }
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
        scale::next_replicas(current, wanted, stabilization, since_epoch(), window)
    };
    if next != current {
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
        publish(
            ctx,
            cluster,
            EventType::Normal,
            "ScaledComets",
            format!("comets {current} -> {next} for {total} connections"),
        )
        .await;
    }
    Ok(next)
}
