//! Pipeline step: drain before removal. Decides the drain step for this
//! pass (see [`crate::scale::drain_step`]) and carries it out: marks the pod,
//! calls its `Drain`, lowers its deletion cost once it is empty, or replaces
//! a drained pod after a scale-up.

use std::time::Duration;

use herald_protocol::pb::admin::DrainRequest;
use herald_runtime::grpc_auth::Token;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch};
use kube::runtime::events::EventType;
use serde_json::json;
use tracing::{info, warn};

use super::observe::{Polled, mark_draining};
use super::status::publish;
use super::{
    Context, DELETION_COST, DRAIN_ANNOTATION, DRAINED_COST, Error, Result, merge_params, now_secs,
};
use crate::build::Names;
use crate::crd::PushCluster;
use crate::load;
use crate::scale::{self, CometPod, DrainStep};

/// How the operator reaches a cluster's comets and where it sends their
/// clients.
#[derive(Clone, Copy)]
pub(super) struct Reach<'a> {
    /// The comet Service's load-balancer addresses.
    pub(super) external: &'a [String],
    /// The cluster's gRPC token.
    pub(super) token: &'a Token,
}

/// Drain before removal, whoever lowered the count; returns the replicas the
/// comet workload (`deployed` now, if it exists) gets on this pass.
pub(super) async fn drain(
    ctx: &Context,
    cluster: &PushCluster,
    names: &Names,
    reach: Reach<'_>,
    polled: &mut [Polled],
    spec_replicas: i32,
    deployed: Option<i32>,
) -> Result<i32> {
    let deployed = deployed.unwrap_or(spec_replicas);
    let comet_pods: Vec<CometPod> = polled
        .iter()
        .map(|p| CometPod {
            name: p.name.clone(),
            ready: p.ready,
            connections: p.load.as_ref().map(|l| l.connections),
            drain_started: p.drain_started,
            // While the count goes down, a comet already drained is the
            // ReplicaSet's to remove (maybe not yet): never finished twice.
            // While it goes up, it is one to replace.
            terminating: p.terminating || (p.drain_finished && spec_replicas < deployed),
        })
        .collect();
    let deadline =
        Duration::from_secs(u64::try_from(cluster.spec.comet.drain.deadline_seconds).unwrap_or(0));
    let step = scale::drain_step(spec_replicas, deployed, &comet_pods, deadline, now_secs());
    carry_out(ctx, cluster, names, reach, polled, step).await
}

/// Marks comet `pod` as draining (its annotation, which also bounds the
/// drain by the deadline) and tells it to `Drain`, redirecting its clients to
/// `others` (comet addresses), or to `nodeList.domain` when one is set.
///
/// # Errors
/// Annotating the pod failing. A failed `Drain` call is only logged: the
/// pod is marked, so the deadline still bounds the wait.
pub(super) async fn start_drain(
    ctx: &Context,
    cluster: &PushCluster,
    names: &Names,
    polled: &mut [Polled],
    pod: &str,
    others: Vec<String>,
    token: &Token,
) -> Result<()> {
    let spec = &cluster.spec;
    Api::<Pod>::namespaced(ctx.client.clone(), &names.namespace)
        .patch(
            pod,
            &merge_params(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {DRAIN_ANNOTATION: now_secs().to_string()}}}),
            ),
        )
        .await
        .map_err(|source| Error::Apply {
            what: format!("annotation {DRAIN_ANNOTATION} on pod {pod}"),
            source,
        })?;
    // Out of the node list first, then told to drain; the rest of this
    // pass (the node list it writes, the status) sees it draining too.
    mark_draining(ctx, names, pod).await?;
    if let Some(polled) = polled.iter_mut().find(|p| p.name == pod) {
        polled.drain_started = Some(now_secs());
    }
    let nodes = if spec.node_list.domain.is_empty() {
        others
    } else {
        vec![spec.node_list.domain.clone()]
    };
    let request = DrainRequest {
        deadline_ms: u64::try_from(spec.comet.drain.deadline_seconds).unwrap_or(0) * 1000,
        close_rate: u32::try_from(spec.comet.drain.close_rate).unwrap_or(0),
        nodes,
        tcp_port: spec.comet.ports.tcp,
        ws_port: spec.comet.ports.ws,
        wss_port: spec.comet.advertised_wss_port(),
        reconnect_within_ms: 2000,
    };
    let addr = polled
        .iter()
        .find(|p| p.name == pod)
        .and_then(|p| p.ip.clone())
        .map(|ip| format!("{ip}:{}", spec.comet.ports.grpc));
    match addr {
        Some(addr) => match load::drain(&addr, request, ctx.call_timeout, token).await {
            Ok(_) => {}
            Err(err) => warn!(%pod, cause = %err, "drain call failed"),
        },
        None => warn!(%pod, "draining pod has no IP"),
    }
    info!(%pod, "comet drain started");
    publish(
        ctx,
        cluster,
        EventType::Normal,
        "DrainStarted",
        format!("draining comet {pod}"),
    )
    .await;
    Ok(())
}

/// Carries out the drain step; returns the comet Deployment's replicas.
async fn carry_out(
    ctx: &Context,
    cluster: &PushCluster,
    names: &Names,
    reach: Reach<'_>,
    polled: &mut [Polled],
    step: DrainStep,
) -> Result<i32> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let annotate = |pod: String, key: &'static str, value: String| {
        let pods = pods.clone();
        async move {
            pods.patch(
                &pod,
                &merge_params(),
                &Patch::Merge(json!({"metadata": {"annotations": {key: value}}})),
            )
            .await
            .map_err(|source| Error::Apply {
                what: format!("annotation {key} on pod {pod}"),
                source,
            })
        }
    };
    match step {
        DrainStep::Set(replicas) => Ok(replicas),
        DrainStep::Wait { replicas, .. } => Ok(replicas),
        DrainStep::Start { pod, replicas } => {
            // Where the node list sends clients: the load balancer's
            // addresses when the comet Service has them, else the other
            // comets' pod IPs.
            let others: Vec<String> = if reach.external.is_empty() {
                polled
                    .iter()
                    .filter(|p| p.name != pod && p.ready && p.drain_started.is_none())
                    .filter_map(|p| p.ip.clone())
                    .collect()
            } else {
                reach.external.to_vec()
            };
            start_drain(ctx, cluster, names, polled, &pod, others, reach.token).await?;
            Ok(replicas)
        }
        DrainStep::Finish { pod, replicas } => {
            annotate(pod.clone(), DELETION_COST, DRAINED_COST.to_owned()).await?;
            info!(%pod, replicas, "comet drained; removing it");
            publish(
                ctx,
                cluster,
                EventType::Normal,
                "DrainFinished",
                format!("comet {pod} drained; comets {} -> {replicas}", replicas + 1),
            )
            .await;
            Ok(replicas)
        }
        DrainStep::Replace { pod, replicas } => {
            pods.delete(&pod, &Default::default())
                .await
                .map_err(|source| Error::Apply {
                    what: format!("delete drained pod {pod}"),
                    source,
                })?;
            info!(%pod, replicas, "drained comet replaced after a scale-up");
            publish(
                ctx,
                cluster,
                EventType::Normal,
                "ReplacedComet",
                format!("drained comet {pod} replaced after a scale-up"),
            )
            .await;
            Ok(replicas)
        }
    }
}
