//! Pipeline step 1, fetch: everything a reconcile reads from the apiserver
//! before it decides (referenced Secrets, the comet Deployment and pods, the
//! node list as last written).

use std::collections::BTreeMap;

use herald_runtime::grpc_auth::{Token, TokenSource};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use serde::de::DeserializeOwned;

use super::{Error, Result};
use crate::build::{self, Names};
use crate::crd::PushClusterSpec;
use crate::load::NodeList;
use crate::validate;

/// What reconcile reads before deciding.
pub(super) struct Fetched {
    pub(super) secrets: BTreeMap<String, Vec<String>>,
    pub(super) comet_deployment: Option<Deployment>,
    /// The comet ReplicaSets of every revision (`rollout.strategy: Drain`).
    pub(super) comet_replica_sets: Vec<ReplicaSet>,
    /// The comet pods.
    pub(super) pods: Vec<Pod>,
    /// Every pod of the cluster, comets included.
    pub(super) cluster_pods: Vec<Pod>,
    /// Every ReplicaSet of the cluster, those of logic's and job's
    /// Deployments included.
    pub(super) replica_sets: Vec<ReplicaSet>,
    /// The comet Service's load-balancer addresses (IPs, else host names),
    /// as the cloud's controller reports them: where clients are sent once
    /// there are any. Empty for other Service types or before assignment.
    pub(super) external: Vec<String>,
    pub(super) node_list: Option<NodeList>,
    pub(super) api_key_exists: bool,
    /// The cluster's internal gRPC token (`spec.auth.grpcToken`), which
    /// the operator's calls to its comets carry; off when it is turned off
    /// or not generated yet.
    pub(super) grpc_token: Token,
    /// Whether the generated token Secret exists.
    pub(super) grpc_token_exists: bool,
    /// The NetworkPolicies of this cluster that exist, by name.
    pub(super) network_policies: Vec<String>,
}

async fn get_opt<K>(api: &Api<K>, name: &str, what: &'static str) -> Result<Option<K>>
where
    K: Clone + DeserializeOwned + std::fmt::Debug,
{
    api.get_opt(name)
        .await
        .map_err(|source| Error::Fetch { what, source })
}

pub(super) async fn fetch(
    client: &Client,
    names: &Names,
    spec: &PushClusterSpec,
) -> Result<Fetched> {
    let ns = &names.namespace;
    let secret_api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut secrets = BTreeMap::new();
    for reference in validate::referenced_secrets(spec) {
        if secrets.contains_key(&reference.name) {
            continue;
        }
        if let Some(secret) = get_opt(&secret_api, &reference.name, "a referenced Secret").await? {
            let mut keys: Vec<String> = secret.data.unwrap_or_default().into_keys().collect();
            keys.extend(secret.string_data.unwrap_or_default().into_keys());
            secrets.insert(reference.name.clone(), keys);
        }
    }
    let api_key_exists = get_opt(&secret_api, &names.api_key(), "the API-key Secret")
        .await?
        .is_some();
    let token_secret = get_opt(&secret_api, &names.grpc_token(), "the gRPC-token Secret").await?;
    let grpc_token_exists = token_secret.is_some();
    let token_value = token_secret
        .and_then(|secret| secret.data?.remove(build::GRPC_TOKEN_KEY))
        .and_then(|value| String::from_utf8(value.0).ok())
        .filter(|_| spec.auth.grpc_token);
    let grpc_token = match token_value {
        // A literal source spawns nothing: no runtime task to leak.
        Some(value) => TokenSource::literal(value)
            .start()
            .map_err(|source| Error::GrpcToken(names.grpc_token(), source))?,
        None => Token::off(),
    };
    let network_policies = Api::<NetworkPolicy>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!(
            "app.kubernetes.io/name=herald,app.kubernetes.io/instance={},app.kubernetes.io/managed-by={}",
            names.cluster,
            build::MANAGER
        )))
        .await
        .map_err(|source| Error::Fetch {
            what: "the cluster's NetworkPolicies",
            source,
        })?
        .items
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    let comet_deployment = get_opt(
        &Api::<Deployment>::namespaced(client.clone(), ns),
        &names.component("comet"),
        "the comet Deployment",
    )
    .await?;
    let cluster_labels = format!(
        "app.kubernetes.io/name=herald,app.kubernetes.io/instance={}",
        names.cluster
    );
    // Every ReplicaSet of the cluster in one list: the comet revisions
    // (`rollout.strategy: Drain`) are taken from it, and the Deployments'
    // revisions tell `dependencies` which template is current.
    let replica_sets = Api::<ReplicaSet>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&cluster_labels))
        .await
        .map_err(|source| Error::Fetch {
            what: "the cluster's ReplicaSets",
            source,
        })?
        .items;
    let comet_labels = names.labels("comet");
    let is_comet = |labels: &BTreeMap<String, String>| {
        comet_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    };
    let comet_replica_sets = replica_sets
        .iter()
        .filter(|rs| is_comet(rs.labels()) && rs.labels().contains_key(build::REVISION_LABEL))
        .cloned()
        .collect();
    // Every pod of the cluster in one list: comets are polled, and any
    // unready one is asked why (`dependencies`).
    let cluster_pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&cluster_labels))
        .await
        .map_err(|source| Error::Fetch {
            what: "the cluster's pods",
            source,
        })?
        .items;
    let pods = cluster_pods
        .iter()
        .filter(|pod| is_comet(pod.labels()))
        .cloned()
        .collect();
    let comet_service = get_opt(
        &Api::<Service>::namespaced(client.clone(), ns),
        &names.component("comet"),
        "the comet Service",
    )
    .await?;
    let external = comet_service
        .and_then(|s| s.status?.load_balancer?.ingress)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|i| i.ip.or(i.hostname))
        .filter(|a| !a.is_empty())
        .collect();
    let node_list = get_opt(
        &Api::<ConfigMap>::namespaced(client.clone(), ns),
        &names.nodes(),
        "the node list",
    )
    .await?
    .and_then(|cm| cm.data?.remove(build::NODES_KEY))
    .and_then(|body| serde_json::from_str(&body).ok());
    Ok(Fetched {
        secrets,
        comet_deployment,
        comet_replica_sets,
        pods,
        cluster_pods,
        replica_sets,
        external,
        node_list,
        api_key_exists,
        grpc_token,
        grpc_token_exists,
        network_policies,
    })
}
