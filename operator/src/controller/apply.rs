//! Pipeline step: apply the children. Builds every child object and
//! server-side applies it (one field manager, forced), in the order pods
//! need them; generates the API-key Secret when none is referenced. While a
//! referenced Secret is missing it only scales the comet Deployment
//! ([`scale_only`]).

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::info;

use super::fetch::Fetched;
use super::status::publish;
use super::{Context, Error, Result, merge_params};
use crate::build::{self, MANAGER, Names, ServiceAddresses};
use crate::crd::PushCluster;

/// Server-side applies `object` in `namespace`. A child whose uid changed
/// since this operator last applied it was deleted and has just been created
/// again: logged.
pub(super) async fn apply<K>(ctx: &Context, namespace: &str, object: &K) -> Result<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let name = object.name_any();
    let kind = K::kind(&());
    let applied = Api::<K>::namespaced(ctx.client.clone(), namespace)
        .patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(object),
        )
        .await
        .map_err(|source| Error::Apply {
            what: format!("{kind} {name}"),
            source,
        })?;
    if let Some(uid) = applied.meta().uid.clone() {
        let before = ctx
            .children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(format!("{namespace}/{kind}/{name}"), uid.clone());
        if before.is_some_and(|before| before != uid) {
            info!(%kind, %name, "recreated a deleted child");
        }
    }
    Ok(applied)
}

/// Builds and applies every child. Order matters: what pods reference
/// (ServiceAccount, ConfigMap, Secrets) exists before the Deployments, else
/// the ReplicaSets fail to create pods and back off. Returns the applied
/// Deployments (comet, logic, job) with their current status.
pub(super) async fn apply_children(
    ctx: &Context,
    cluster: &PushCluster,
    names: &Names,
    fetched: &Fetched,
    comet_replicas: i32,
) -> Result<Vec<Deployment>> {
    let client = &ctx.client;
    let spec = &cluster.spec;
    let logic = names.component("logic");
    let mut children = build::children(names, spec, comet_replicas, &logic)?;
    let ns = names.namespace.as_str();
    apply(ctx, ns, &children.service_account).await?;
    apply(ctx, ns, &children.role).await?;
    apply(ctx, ns, &children.role_binding).await?;
    apply(ctx, ns, &children.config).await?;
    if spec.auth.api_key_secret_ref.is_none() && !fetched.api_key_exists {
        create_api_key(client, names).await?;
        publish(
            ctx,
            cluster,
            EventType::Normal,
            "GeneratedApiKey",
            format!("Secret {}", names.api_key()),
        )
        .await;
    }
    let mut logic_ip = None;
    for service in &children.services {
        let applied = apply(ctx, ns, service).await?;
        if applied.name_any() == logic {
            logic_ip = applied.spec.and_then(|s| s.cluster_ip);
        }
    }
    // The ClusterIP exists only once the Service does: rebuild with it.
    if ctx.service_addresses == ServiceAddresses::ClusterIp {
        let ip = logic_ip.filter(|ip| !ip.is_empty() && ip != "None");
        let ip = ip.ok_or_else(|| Error::NoClusterIp(logic.clone()))?;
        children = build::children(names, spec, comet_replicas, &ip)?;
    }
    let mut deployments = Vec::new();
    for deployment in &children.deployments {
        deployments.push(apply(ctx, ns, deployment).await?);
    }
    for pdb in &children.pdbs {
        apply(ctx, ns, pdb).await?;
    }
    Ok(deployments)
}

/// While a referenced Secret is missing: the spec is not applied (its pods
/// would reference a Secret that is not there, and a rollout onto them would
/// replace working pods with ones that cannot start), so every child stays as
/// it runs, except the comet Deployment's replicas, which follow the
/// autoscaler and the drains. Returns the Deployments that exist (none on a
/// cluster never built).
pub(super) async fn scale_only(
    ctx: &Context,
    names: &Names,
    fetched: &Fetched,
    comet_replicas: i32,
) -> Result<Vec<Deployment>> {
    let api = Api::<Deployment>::namespaced(ctx.client.clone(), &names.namespace);
    let mut deployments = Vec::new();
    if let Some(comet) = &fetched.comet_deployment {
        let deployed = comet.spec.as_ref().and_then(|s| s.replicas);
        if deployed == Some(comet_replicas) {
            deployments.push(comet.clone());
        } else {
            // A merge patch of the one field: an apply of a partial object
            // would drop every field this manager applied before.
            let patched = api
                .patch(
                    &comet.name_any(),
                    &merge_params(),
                    &Patch::Merge(json!({"spec": {"replicas": comet_replicas}})),
                )
                .await
                .map_err(|source| Error::Apply {
                    what: format!("replicas of Deployment {}", comet.name_any()),
                    source,
                })?;
            deployments.push(patched);
        }
    }
    for component in ["logic", "job"] {
        let found = api
            .get_opt(&names.component(component))
            .await
            .map_err(|source| Error::Fetch {
                what: "a Deployment",
                source,
            })?;
        deployments.extend(found);
    }
    Ok(deployments)
}

async fn create_api_key(client: &Client, names: &Names) -> Result<()> {
    let key: String = {
        use rand::Rng;
        let bytes: [u8; 24] = rand::rng().random();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    };
    let secret = build::api_key_secret(names, &key)?;
    match Api::<Secret>::namespaced(client.clone(), &names.namespace)
        .create(
            &PostParams {
                field_manager: Some(MANAGER.to_owned()),
                ..Default::default()
            },
            &secret,
        )
        .await
    {
        Ok(_) => Ok(()),
        // Another pass created it first: keep that value.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(source) => Err(Error::Apply {
            what: format!("Secret {}", names.api_key()),
            source,
        }),
    }
}
