//! Pipeline step 1, fetch: everything a reconcile reads from the apiserver
//! before it decides (referenced Secrets, the comet Deployment and pods, the
//! node list as last written).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::Client;
use kube::api::{Api, ListParams};
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
    pub(super) pods: Vec<Pod>,
    pub(super) node_list: Option<NodeList>,
    pub(super) api_key_exists: bool,
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
        if let Some(secret) = get_opt(&secret_api, &reference.name, "a referenced Secret").await? {
            let mut keys: Vec<String> = secret.data.unwrap_or_default().into_keys().collect();
            keys.extend(secret.string_data.unwrap_or_default().into_keys());
            secrets.insert(reference.name.clone(), keys);
        }
    }
    let api_key_exists = get_opt(&secret_api, &names.api_key(), "the API-key Secret")
        .await?
        .is_some();
    let comet_deployment = get_opt(
        &Api::<Deployment>::namespaced(client.clone(), ns),
        &names.component("comet"),
        "the comet Deployment",
    )
    .await?;
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&names.selector("comet")))
        .await
        .map_err(|source| Error::Fetch {
            what: "comet pods",
            source,
        })?
        .items;
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
        pods,
        node_list,
        api_key_exists,
    })
}
