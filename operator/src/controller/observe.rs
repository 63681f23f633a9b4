//! Pipeline step: observe the comets. Every comet pod is asked for its
//! `Load`; the answers feed the scaling and drain decisions, the status, and
//! the node list, which this module also writes (only when it changed).

use herald_protocol::pb::admin::LoadReply;
use herald_runtime::grpc_auth::Token;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use tracing::warn;

use super::apply::apply;
use super::fetch::Fetched;
use super::{Context, DELETION_COST, DRAIN_ANNOTATION, DRAINED_COST, Error, Result, now_rfc3339};
use crate::build::{self, Names};
use crate::crd::PushClusterSpec;
use crate::load::{self, Node, NodeList};

/// A comet pod with its address and the answer to `Load`, if any.
pub(super) struct Polled {
    pub(super) name: String,
    pub(super) ip: Option<String>,
    pub(super) ready: bool,
    pub(super) terminating: bool,
    pub(super) drain_started: Option<u64>,
    /// Drained and marked cheapest to delete: the ReplicaSet removes it
    /// once the replicas go down, which may not have happened yet.
    pub(super) drain_finished: bool,
    pub(super) load: Option<LoadReply>,
    /// Its template's revision (label), none for a Deployment's pod.
    pub(super) revision: Option<String>,
    /// Creation time, seconds since the epoch.
    pub(super) created: u64,
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

pub(super) async fn poll(
    ctx: &Context,
    spec: &PushClusterSpec,
    pods: &[Pod],
    token: &Token,
) -> Vec<Polled> {
    let port = spec.comet.ports.grpc;
    let calls = pods.iter().map(|pod| async move {
        let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
        let ready = pod_ready(pod) && ip.is_some();
        // Unready pods are polled too: a draining comet reports itself unready
        // while it still holds clients.
        let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        let load = match (&ip, running) {
            (Some(ip), true) => {
                match load::load(&format!("{ip}:{port}"), ctx.call_timeout, token).await {
                    Ok(reply) => Some(reply),
                    Err(err) => {
                        warn!(pod = %pod.name_any(), cause = %err, "comet load poll failed");
                        ctx.metrics.poll_error();
                        None
                    }
                }
            }
            _ => None,
        };
        Polled {
            name: pod.name_any(),
            ip,
            ready,
            terminating: pod.metadata.deletion_timestamp.is_some(),
            drain_started: pod
                .annotations()
                .get(DRAIN_ANNOTATION)
                .and_then(|v| v.parse().ok()),
            drain_finished: pod.annotations().get(DELETION_COST).map(String::as_str)
                == Some(DRAINED_COST),
            load,
            revision: pod.labels().get(build::REVISION_LABEL).cloned(),
            created: pod
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(0, |t| u64::try_from(t.0.as_second()).unwrap_or(0)),
        }
    });
    futures::future::join_all(calls).await
}

/// The node list from this poll; written only when it changed.
pub(super) async fn write_node_list(
    ctx: &Context,
    names: &Names,
    spec: &PushClusterSpec,
    fetched: &Fetched,
    polled: &[Polled],
) -> Result<NodeList> {
    let nodes = polled
        .iter()
        .filter_map(|p| node(spec, p, &fetched.external))
        .collect();
    // The comets' shutdown drain, read live by every comet: changing it
    // rolls no pod.
    let drain = load::DrainSettings {
        deadline_ms: u64::try_from(spec.comet.drain.deadline_seconds).unwrap_or(0) * 1000,
        close_rate: u32::try_from(spec.comet.drain.close_rate).unwrap_or(0),
    };
    let node_list = load::next(
        fetched.node_list.as_ref(),
        nodes,
        Some(drain),
        &now_rfc3339(),
    );
    if fetched.node_list.as_ref() != Some(&node_list) {
        let body = serde_json::to_string(&node_list)?;
        apply(
            ctx,
            &names.namespace,
            &build::nodes_config_map(names, &body)?,
        )
        .await?;
    }
    Ok(node_list)
}

/// Marks comet `pod` draining in the node list as it stands, before the
/// comet is told to drain: logic stops handing it out before any client is
/// redirected, so no reconnect lands on the comet that is leaving. The next
/// pass writes the full list from its poll as usual.
///
/// # Errors
/// Reading or writing the node-list ConfigMap failed.
pub(super) async fn mark_draining(ctx: &Context, names: &Names, pod: &str) -> Result<()> {
    let configmaps = kube::Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(
        ctx.client.clone(),
        &names.namespace,
    );
    let current = configmaps
        .get_opt(&names.nodes())
        .await
        .map_err(|source| Error::Fetch {
            what: "the node list",
            source,
        })?
        .and_then(|cm| cm.data?.remove(build::NODES_KEY))
        .and_then(|body| serde_json::from_str::<NodeList>(&body).ok());
    let Some(mut list) = current else {
        return Ok(());
    };
    let Some(node) = list.nodes.iter_mut().find(|n| n.name == pod) else {
        return Ok(());
    };
    if node.draining {
        return Ok(());
    }
    node.draining = true;
    node.weight = 0;
    list.generation += 1;
    list.updated = now_rfc3339();
    let body = serde_json::to_string(&list)?;
    apply(
        ctx,
        &names.namespace,
        &build::nodes_config_map(names, &body)?,
    )
    .await?;
    Ok(())
}

/// A comet's node-list entry, if it belongs in the list: it answered the
/// poll and is ready, or draining (job still pushes to its clients). An
/// unready comet that is not draining (e.g. logic unreachable) is no place
/// for clients.
fn node(spec: &PushClusterSpec, p: &Polled, external: &[String]) -> Option<Node> {
    let load = p.load.as_ref()?;
    let ip = p.ip.clone()?;
    // A pod being deleted is about to drain on SIGTERM: no place for new
    // clients from this poll on.
    let draining = load.draining || p.drain_started.is_some() || p.terminating;
    if !p.ready && !draining {
        return None;
    }
    Some(Node {
        name: p.name.clone(),
        grpc: format!("{ip}:{}", spec.comet.ports.grpc),
        hosts: [spec.node_list.domain.clone()]
            .into_iter()
            .filter(|d| !d.is_empty())
            .collect(),
        // Where native clients connect: the comet Service's external
        // addresses once a load balancer has them, else the pod's IP
        // (reachable inside the cluster, or where pod IPs are routed).
        addrs: if external.is_empty() {
            vec![ip]
        } else {
            external.to_vec()
        },
        tcp_port: spec.comet.ports.tcp,
        ws_port: spec.comet.ports.ws,
        wss_port: spec.comet.advertised_wss_port(),
        weight: load::weight(
            load.connections,
            spec.comet.autoscaling.target_connections_per_replica,
            draining,
        ),
        connections: load.connections,
        client_ips: load.client_ips,
        draining,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn polled(ready: bool, drain_started: Option<u64>, load: Option<LoadReply>) -> Polled {
        Polled {
            name: "chat-comet-1".to_owned(),
            ip: Some("127.0.0.9".to_owned()),
            ready,
            terminating: false,
            drain_started,
            drain_finished: false,
            load,
            revision: None,
            created: 0,
        }
    }

    #[test]
    fn node_list_entries_follow_readiness_and_drain() {
        let spec: PushClusterSpec = serde_json::from_value(json!({
            "image": "i", "redis": {"addr": "r:1"}, "kafka": {"brokers": ["k:1"]},
            "nodeList": {"domain": "push.example.com"}
        }))
        .unwrap();
        let load = LoadReply {
            connections: 7,
            client_ips: 3,
            ..LoadReply::default()
        };
        let entry = node(&spec, &polled(true, None, Some(load.clone())), &[]).unwrap();
        assert_eq!(entry.grpc, "127.0.0.9:3109");
        assert_eq!(entry.hosts, ["push.example.com"]);
        assert_eq!(
            entry.addrs,
            ["127.0.0.9"],
            "the pod IP without a load balancer"
        );
        assert_eq!(entry.wss_port, 0, "no TLS listener to advertise");
        let mut tls = spec.clone();
        tls.comet.tls = Some(crate::crd::CometTls {
            secret_name: "chat-tls".to_owned(),
        });
        let served = node(&tls, &polled(true, None, Some(load.clone())), &[]).unwrap();
        assert_eq!(served.wss_port, 3103, "WSS served with comet.tls");
        // A load balancer's addresses replace the pod IP for clients; job
        // and the operator still reach the pod.
        let external = ["203.0.113.7".to_owned(), "lb.example.com".to_owned()];
        let behind_lb = node(&spec, &polled(true, None, Some(load.clone())), &external).unwrap();
        assert_eq!(behind_lb.addrs, external);
        assert_eq!(behind_lb.grpc, "127.0.0.9:3109");
        assert_eq!(
            (entry.connections, entry.client_ips, entry.draining),
            (7, 3, false)
        );
        assert!(entry.weight > 0);
        assert!(
            node(&spec, &polled(false, None, Some(load.clone())), &[]).is_none(),
            "unready, not draining"
        );
        let draining = node(&spec, &polled(false, Some(1), Some(load)), &[]).unwrap();
        assert_eq!((draining.draining, draining.weight), (true, 0));
        assert!(
            node(&spec, &polled(true, None, None), &[]).is_none(),
            "no answer to Load"
        );
    }
}
