//! Ordered teardown of a PushCluster being deleted. Its finalizer
//! ([`FINALIZER`]) keeps the PushCluster, and so every child it owns, while
//! the comets drain: each comet is told to `Drain` (as a scale-down drains
//! one) while logic still serves the node list and pushes; once no comet
//! holds a client, or the drain deadline plus [`GRACE`] after the deletion
//! passed, the finalizer is removed and the garbage collector deletes the
//! children. Bounded by that deadline: comets that cannot be reached only
//! make it wait for it, never longer.
//!
//! This is the one thing outside the children's lifecycle the operator must
//! do before they go (what a finalizer is for); everything else is left to
//! owner references.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch};
use kube::runtime::controller::Action;
use serde_json::json;
use tracing::{info, warn};

use super::drain::start_drain;
use super::fetch::fetch;
use super::observe::{Polled, poll, write_node_list};
use super::{Context, Error, Result, merge_params};
use crate::build::Names;
use crate::crd::PushCluster;

/// The finalizer on every PushCluster the operator reconciles.
pub const FINALIZER: &str = "herald.dev/drain";

/// Waited past the drain deadline for comets to report they are empty.
const GRACE: Duration = Duration::from_secs(10);

fn has_finalizer(cluster: &PushCluster) -> bool {
    cluster.finalizers().iter().any(|f| f == FINALIZER)
}

/// Writes the finalizers `finalizers`, only if the PushCluster is still the
/// version read (`resourceVersion`): a finalizer someone else added or
/// removed meanwhile is never overwritten (409, looked at again).
async fn set_finalizers(
    ctx: &Context,
    cluster: &PushCluster,
    names: &Names,
    finalizers: Vec<String>,
) -> kube::Result<()> {
    let patch = json!({"metadata": {
        "resourceVersion": cluster.resource_version(),
        "finalizers": finalizers,
    }});
    Api::<PushCluster>::namespaced(ctx.client.clone(), &names.namespace)
        .patch(&names.cluster, &merge_params(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Adds the finalizer to a live PushCluster that lacks it. Failing is not
/// fatal (logged): the cluster is still reconciled, only its deletion would
/// not wait for the drain.
pub(super) async fn ensure_finalizer(ctx: &Context, cluster: &PushCluster, names: &Names) {
    if has_finalizer(cluster) {
        return;
    }
    let mut finalizers = cluster.finalizers().to_vec();
    finalizers.push(FINALIZER.to_owned());
    match set_finalizers(ctx, cluster, names, finalizers).await {
        Ok(()) => info!("added the teardown finalizer"),
        // Read from a cache one write behind (this very patch, often): the
        // next pass sees the newer version.
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(err) => {
            warn!(cause = %err, "cannot add the teardown finalizer (needs patch on pushclusters)");
        }
    }
}

/// Whether a comet holds no client: it answered with zero connections, or
/// it has no address (never ran, so no client ever reached it).
fn empty(p: &Polled) -> bool {
    match &p.load {
        Some(load) => load.connections == 0,
        None => p.ip.is_none(),
    }
}

/// One pass over a PushCluster being deleted; see the module doc.
///
/// # Errors
/// Apiserver errors; the error policy looks again soon.
pub(super) async fn teardown(
    ctx: &Context,
    cluster: &PushCluster,
    names: &Names,
) -> Result<Action> {
    if !has_finalizer(cluster) {
        return Ok(Action::await_change());
    }
    let spec = &cluster.spec;
    let fetched = fetch(&ctx.client, names, spec).await?;
    let mut polled = poll(ctx, spec, &fetched.pods, &fetched.grpc_token).await;
    let to_drain: Vec<String> = polled
        .iter()
        .filter(|p| !p.terminating && p.drain_started.is_none() && p.load.is_some())
        .map(|p| p.name.clone())
        .collect();
    for pod in &to_drain {
        // Every comet goes: there is no other comet to send clients to.
        start_drain(
            ctx,
            cluster,
            names,
            &mut polled,
            pod,
            Vec::new(),
            &fetched.grpc_token,
        )
        .await?;
    }
    let live: Vec<&Polled> = polled.iter().filter(|p| !p.terminating).collect();
    // Logic keeps handing out the node list: draining comets are marked so.
    write_node_list(ctx, names, spec, &fetched, &polled).await?;

    let connections: u64 = live
        .iter()
        .filter_map(|p| p.load.as_ref().map(|l| l.connections))
        .sum();
    let all_empty = live.iter().all(|p| empty(p));
    let deadline =
        Duration::from_secs(u64::try_from(spec.comet.drain.deadline_seconds).unwrap_or(0)) + GRACE;
    let since = cluster
        .metadata
        .deletion_timestamp
        .as_ref()
        .map_or(Duration::ZERO, |t| {
            Duration::try_from(Timestamp::now().duration_since(t.0)).unwrap_or(Duration::ZERO)
        });
    if !all_empty && since < deadline {
        info!(
            connections,
            comets = live.len(),
            "deleting: waiting for the comets to drain"
        );
        return Ok(Action::requeue(ctx.poll_interval));
    }
    if all_empty {
        info!(
            comets = live.len(),
            "deleting: every comet is empty; releasing the PushCluster"
        );
    } else {
        warn!(
            connections,
            waited = ?since,
            "deleting: drain deadline passed with clients left; releasing the PushCluster"
        );
    }
    let finalizers = cluster
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    set_finalizers(ctx, cluster, names, finalizers)
        .await
        .map_err(|source| Error::Apply {
            what: "PushCluster finalizers".to_owned(),
            source,
        })?;
    let key = format!("{}/{}", names.namespace, names.cluster);
    ctx.windows
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&key);
    ctx.scaled
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&key);
    ctx.degraded
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&key);
    ctx.metrics.forget_cluster(&names.namespace, &names.cluster);
    // Child keys are `namespace/Kind/name`, every name `<cluster>-...`.
    let (prefix, owned) = (
        format!("{}/", names.namespace),
        format!("{}-", names.cluster),
    );
    ctx.children
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|child, _| {
            let name = child.rsplit('/').next().unwrap_or_default();
            !(child.starts_with(&prefix) && name.starts_with(&owned))
        });
    ctx.metrics.forget_cluster(&names.namespace, &names.cluster);
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use herald_protocol::pb::admin::LoadReply;

    use super::*;

    fn polled(ip: Option<&str>, connections: Option<u64>) -> Polled {
        Polled {
            name: "chat-comet-1".to_owned(),
            ip: ip.map(str::to_owned),
            ready: true,
            terminating: false,
            drain_started: None,
            drain_finished: false,
            revision: None,
            created: 0,
            load: connections.map(|connections| LoadReply {
                connections,
                ..LoadReply::default()
            }),
        }
    }

    #[test]
    fn a_comet_is_empty_when_it_says_so_or_never_ran() {
        assert!(empty(&polled(Some("10.0.0.1"), Some(0))));
        assert!(!empty(&polled(Some("10.0.0.1"), Some(2))));
        assert!(
            !empty(&polled(Some("10.0.0.1"), None)),
            "unreachable: waits for the deadline"
        );
        assert!(empty(&polled(None, None)), "no address, no clients");
    }
}
