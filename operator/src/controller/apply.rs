//! Pipeline step: apply the children. Builds every child object and
//! server-side applies it (one field manager, forced), in the order pods
//! need them; generates the API-key Secret when none is referenced. While a
//! referenced Secret is missing it only scales the comet Deployment
//! ([`scale_only`]).

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::info;

use super::fetch::Fetched;
use super::rollout::{CometPlan, settle_old};
use super::status::publish;
use super::{Context, Error, Result, merge_params};
use crate::build::{self, MANAGER, Names, REVISION_LABEL, ServiceAddresses};
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

/// Builds every child and applies all but the workloads. Order matters:
/// what pods reference (ServiceAccount, ConfigMap, Secrets, the logic
/// Service's address) exists before the workloads ([`apply_workloads`]),
/// else the ReplicaSets fail to create pods and back off. Returns the
/// children, built with the logic Service's address.
pub(super) async fn apply_base(
    ctx: &Context,
    cluster: &PushCluster,
    names: &Names,
    fetched: &Fetched,
    comet_replicas: i32,
) -> Result<build::Children> {
    let client = &ctx.client;
    let spec = &cluster.spec;
    let logic = names.component("logic");
    let mut children = build::children(names, spec, comet_replicas, &logic)?;
    let ns = names.namespace.as_str();
    apply(ctx, ns, &children.service_account).await?;
    apply(ctx, ns, &children.role).await?;
    apply(ctx, ns, &children.role_binding).await?;
    apply(ctx, ns, &children.config).await?;
    // Generated once, never re-applied: their values stay stable.
    type Make = fn(&Names, &str) -> build::Result<Secret>;
    let generated: [(bool, String, &str, Make); 2] = [
        (
            spec.auth.api_key_secret_ref.is_none() && !fetched.api_key_exists,
            names.api_key(),
            "GeneratedApiKey",
            build::api_key_secret,
        ),
        (
            spec.auth.grpc_token && !fetched.grpc_token_exists,
            names.grpc_token(),
            "GeneratedGrpcToken",
            build::grpc_token_secret,
        ),
    ];
    for (missing, name, reason, make) in generated {
        if missing {
            create_once(client, names, &make(names, &random_secret())?).await?;
            publish(
                ctx,
                cluster,
                EventType::Normal,
                reason,
                format!("Secret {name}"),
            )
            .await;
        }
    }
    if children.network_policies.is_empty() {
        // Turned off: the ones written before go.
        let api = Api::<NetworkPolicy>::namespaced(client.clone(), ns);
        for name in &fetched.network_policies {
            if delete_child(&api, name).await? {
                info!(%name, "NetworkPolicy removed (networkPolicy.enabled is off)");
            }
        }
    }
    for policy in &children.network_policies {
        apply(ctx, ns, policy).await?;
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
    Ok(children)
}

/// Applies the workloads of `children` with the comet replicas of `plan`,
/// then the older comet workloads' replicas, and the PodDisruptionBudgets.
/// Returns the applied Deployments (logic, job, and comet under
/// `rollout.strategy: Deployment`) with their current status.
pub(super) async fn apply_workloads(
    ctx: &Context,
    names: &Names,
    mut children: build::Children,
    plan: &CometPlan,
) -> Result<Vec<Deployment>> {
    let ns = names.namespace.as_str();
    let comet = names.component("comet");
    let mut deployments = Vec::new();
    for deployment in &mut children.deployments {
        if deployment.name_any() == comet
            && let Some(spec) = deployment.spec.as_mut()
        {
            spec.replicas = Some(plan.current);
        }
        deployments.push(apply(ctx, ns, deployment).await?);
    }
    if let Some(set) = children.comet_replica_set.as_mut() {
        if let Some(spec) = set.spec.as_mut() {
            spec.replicas = Some(plan.current);
        }
        apply(ctx, ns, set).await?;
    }
    settle_old(ctx, names, plan).await?;
    for pdb in &children.pdbs {
        apply(ctx, ns, pdb).await?;
    }
    Ok(deployments)
}

/// While a referenced Secret is missing: the spec is not applied (its pods
/// would reference a Secret that is not there, and a rollout onto them would
/// replace working pods with ones that cannot start), so every child stays as
/// it runs, except the comet workloads' replicas, which follow the
/// autoscaler, the drains and a rollout under way. Returns the Deployments
/// that exist (none on a cluster never built).
pub(super) async fn scale_only(
    ctx: &Context,
    names: &Names,
    fetched: &Fetched,
    plan: &CometPlan,
) -> Result<Vec<Deployment>> {
    let api = Api::<Deployment>::namespaced(ctx.client.clone(), &names.namespace);
    let mut deployments = Vec::new();
    let patch = Patch::Merge(json!({"spec": {"replicas": plan.current}}));
    if let (Some(comet), None) = (&fetched.comet_deployment, &plan.revision) {
        let deployed = comet.spec.as_ref().and_then(|s| s.replicas);
        if deployed == Some(plan.current) {
            deployments.push(comet.clone());
        } else {
            // A merge patch of the one field: an apply of a partial object
            // would drop every field this manager applied before.
            let patched = api
                .patch(&comet.name_any(), &merge_params(), &patch)
                .await
                .map_err(|source| Error::Apply {
                    what: format!("replicas of Deployment {}", comet.name_any()),
                    source,
                })?;
            deployments.push(patched);
        }
    }
    if let Some(revision) = &plan.revision {
        let current = fetched
            .comet_replica_sets
            .iter()
            .find(|rs| rs.labels().get(REVISION_LABEL) == Some(revision));
        if let Some(set) =
            current.filter(|rs| rs.spec.as_ref().and_then(|s| s.replicas) != Some(plan.current))
        {
            Api::<ReplicaSet>::namespaced(ctx.client.clone(), &names.namespace)
                .patch(&set.name_any(), &merge_params(), &patch)
                .await
                .map_err(|source| Error::Apply {
                    what: format!("replicas of ReplicaSet {}", set.name_any()),
                    source,
                })?;
        }
    }
    settle_old(ctx, names, plan).await?;
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

/// Deletes child `name`; one already gone is fine. Whether this call
/// deleted it.
pub(super) async fn delete_child<K>(api: &Api<K>, name: &str) -> Result<bool>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(source) => Err(Error::Apply {
            what: format!("delete {} {name}", K::kind(&())),
            source,
        }),
    }
}

/// 48 hex digits from the OS's random source: a generated API key or
/// gRPC token.
fn random_secret() -> String {
    use rand::Rng;
    let bytes: [u8; 24] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Creates a generated Secret once; a pass that lost the race to create it
/// keeps the other's value (409), and it is never re-applied, so its value
/// is stable.
async fn create_once(client: &Client, names: &Names, secret: &Secret) -> Result<()> {
    match Api::<Secret>::namespaced(client.clone(), &names.namespace)
        .create(
            &PostParams {
                field_manager: Some(MANAGER.to_owned()),
                ..Default::default()
            },
            secret,
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(source) => Err(Error::Apply {
            what: format!("Secret {}", secret.name_any()),
            source,
        }),
    }
}
