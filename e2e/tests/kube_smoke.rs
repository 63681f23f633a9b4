//! The test bed's Kubernetes is a real kube-apiserver on etcd with
//! kube-controller-manager: kube-rs can create a namespace, apply a CRD and a
//! custom object, and a Deployment really becomes a ReplicaSet and Pods.

use std::time::Duration;

use herald_e2e::{eventually, unique_name};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::wait::{await_condition, conditions};

const MANAGER: &str = "herald-e2e";

const CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.smoke.herald.dev
spec:
  group: smoke.herald.dev
  scope: Namespaced
  names: {kind: Widget, plural: widgets, singular: widget}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              required: [size]
              properties:
                size: {type: integer, minimum: 1}
"#;

async fn client() -> anyhow::Result<Client> {
    // KUBECONFIG comes from the test bed; without it this fails, never skips.
    herald_e2e::testbed_var("KUBECONFIG");
    Ok(Client::try_default().await?)
}

async fn create_namespace(client: &Client) -> anyhow::Result<String> {
    let name = unique_name("smoke");
    let namespace: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"herald.dev/e2e": "smoke"}}
    }))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await?;
    Ok(name)
}

#[tokio::test]
async fn crd_and_custom_object_round_trip() -> anyhow::Result<()> {
    let client = client().await?;
    let namespace = create_namespace(&client).await?;

    let crd: CustomResourceDefinition = serde_yaml::from_str(CRD)?;
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    crds.patch(
        "widgets.smoke.herald.dev",
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await?;
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(
            crds,
            "widgets.smoke.herald.dev",
            conditions::is_crd_established(),
        ),
    )
    .await??;

    let resource =
        ApiResource::from_gvk(&GroupVersionKind::gvk("smoke.herald.dev", "v1", "Widget"));
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), &namespace, &resource);
    let good: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "smoke.herald.dev/v1", "kind": "Widget",
        "metadata": {"name": "good"}, "spec": {"size": 3}
    }))?;
    widgets.create(&PostParams::default(), &good).await?;
    let stored = widgets.get("good").await?;
    assert_eq!(stored.data["spec"]["size"], 3);

    // The schema is enforced by the real apiserver.
    let bad: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "smoke.herald.dev/v1", "kind": "Widget",
        "metadata": {"name": "bad"}, "spec": {"size": 0}
    }))?;
    let refused = widgets.create(&PostParams::default(), &bad).await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(status)) if status.code == 422),
        "{refused:?}"
    );

    Api::<Namespace>::all(client)
        .delete(&namespace, &DeleteParams::default())
        .await?;
    Ok(())
}

#[tokio::test]
async fn deployment_becomes_replicaset_and_pods() -> anyhow::Result<()> {
    let client = client().await?;
    let namespace = create_namespace(&client).await?;

    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "herald:smoke"}]}
            }
        }
    }))?;
    let deployments = Api::<Deployment>::namespaced(client.clone(), &namespace);
    deployments
        .patch(
            "web",
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&deployment),
        )
        .await?;
    let uid = deployments.get("web").await?.metadata.uid;

    // The deployment controller (in kube-controller-manager) creates a
    // ReplicaSet owned by the Deployment.
    let replicasets = Api::<ReplicaSet>::namespaced(client.clone(), &namespace);
    let replicaset = eventually(60, "a ReplicaSet", || async {
        let list = replicasets
            .list(&ListParams::default().labels("app=web"))
            .await?;
        Ok(list.items.into_iter().next())
    })
    .await?;
    let owner = replicaset
        .metadata
        .owner_references
        .unwrap_or_default()
        .into_iter()
        .find(|owner| owner.controller == Some(true))
        .expect("controller owner reference");
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Deployment", "web")
    );
    assert_eq!(Some(owner.uid), uid);

    // The replicaset controller creates the pods (Pending: no node runs them).
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace);
    let count = eventually(60, "2 pods", || async {
        let list = pods.list(&ListParams::default().labels("app=web")).await?;
        Ok((list.items.len() == 2).then_some(list.items.len()))
    })
    .await?;
    assert_eq!(count, 2);

    // Scaling down through the /scale subresource (what an HPA writes) is
    // carried out by the controllers too.
    deployments
        .patch_scale(
            "web",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 1}})),
        )
        .await?;
    eventually(60, "1 pod", || async {
        let list = pods.list(&ListParams::default().labels("app=web")).await?;
        let live = list
            .items
            .iter()
            .filter(|pod| pod.metadata.deletion_timestamp.is_none())
            .count();
        Ok((live == 1).then_some(()))
    })
    .await?;

    Api::<Namespace>::all(client)
        .delete(&namespace, &DeleteParams::default())
        .await?;
    Ok(())
}
