//! The Node object and its heartbeat.
//!
//! controller-manager's node lifecycle controller marks a node NotReady when
//! neither its Lease in `kube-node-lease` nor its Ready condition has been
//! renewed within the grace period (40 s by default), then taints it and
//! evicts its pods. Renewing both every `heartbeat` keeps the loopback node
//! Ready for as long as the harness runs, and lets it lapse when it stops.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::MANAGER;

/// Namespace where kubelets keep their node Leases.
const LEASE_NAMESPACE: &str = "kube-node-lease";
/// What the node reports it can hold; generous, nothing is really reserved.
const PODS: &str = "250";

fn apply() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

/// Creates (or takes over) the node and marks it Ready.
///
/// # Errors
/// If the apiserver refuses the Node or its status.
pub(super) async fn register(client: &Client, name: &str) -> Result<(), kube::Error> {
    let nodes = Api::<Node>::all(client.clone());
    let node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": std::env::consts::ARCH,
            "herald.dev/loopback-node": "true",
        }},
    });
    nodes.patch(name, &apply(), &Patch::Apply(&node)).await?;
    heartbeat(client, name).await
}

/// Renews the Lease and the node's conditions once.
///
/// # Errors
/// If the apiserver refuses either write.
pub(super) async fn heartbeat(client: &Client, name: &str) -> Result<(), kube::Error> {
    let now = Timestamp::now();
    let nodes = Api::<Node>::all(client.clone());
    let node = nodes.get(name).await?;
    let uid = node.metadata.uid.unwrap_or_default();
    let condition = |kind: &str, status: &str, reason: &str, message: &str| {
        json!({"type": kind, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": Time(now), "lastTransitionTime": Time(now)})
    };
    // lastTransitionTime is rewritten on each beat: the node is registered
    // Ready and never changes state while the harness runs.
    let status = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name},
        "status": {
            "capacity": {"cpu": "8", "memory": "16Gi", "pods": PODS},
            "allocatable": {"cpu": "8", "memory": "16Gi", "pods": PODS},
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": name}],
            "conditions": [
                condition("Ready", "True", "KubeletReady", "loopback kubelet is posting ready status"),
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "no pressure"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "no pressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "no pressure"),
            ],
            "nodeInfo": {
                "machineID": name, "systemUUID": name, "bootID": name,
                "kernelVersion": "", "osImage": "herald loopback node",
                "containerRuntimeVersion": "herald-process://1",
                "kubeletVersion": "v1.36.0-loopback", "kubeProxyVersion": "",
                "operatingSystem": "linux", "architecture": std::env::consts::ARCH,
            },
        },
    });
    nodes
        .patch_status(name, &apply(), &Patch::Apply(&status))
        .await?;

    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "namespace": LEASE_NAMESPACE,
            // As kubelet does: the Lease goes away with its Node.
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid}]},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": 40,
                 "renewTime": MicroTime(now)},
    });
    Api::<Lease>::namespaced(client.clone(), LEASE_NAMESPACE)
        .patch(name, &apply(), &Patch::Apply(&lease))
        .await?;
    Ok(())
}
