//! The Helm chart `charts/herald`, rendered and installed by the real helm
//! into the test bed's apiserver: the operator's objects exist, the CRD is
//! served, and RBAC (enforced by the apiserver) gives the operator's
//! ServiceAccount what it needs and nothing beyond it.

use std::time::Duration;

use herald_e2e::{helm, unique_name};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, Role};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client};

fn chart() -> String {
    format!("{}/../charts/herald", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn template_passes_values_through() -> anyhow::Result<()> {
    let rendered = helm(&[
        "template",
        "demo",
        &chart(),
        "--namespace",
        "ops",
        "--set",
        "image.tag=9.9.9",
        "--set",
        "watchNamespaces={chat,games}",
        "--set",
        "metricsHost=$(POD_IP)",
    ])?;
    let deployment: Deployment = serde_yaml::from_str(
        rendered
            .split("\n---")
            .find(|doc| doc.contains("kind: Deployment"))
            .expect("a Deployment in the output"),
    )?;
    let spec = deployment
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod spec");
    let container = &spec.containers[0];
    assert_eq!(container.image.as_deref(), Some("herald:9.9.9"));
    let args = container.args.clone().unwrap_or_default();
    assert_eq!(args[0], "operator");
    assert!(
        args.contains(&"--namespace=chat,games".to_owned()),
        "{args:?}"
    );
    assert_eq!(spec.service_account_name.as_deref(), Some("demo-herald"));
    // Off by default: no example PushCluster.
    assert!(!rendered.contains("kind: PushCluster"));
    Ok(())
}

/// Whether the operator's ServiceAccount may do `verb` on `resource`.
async fn allowed(
    client: &Client,
    user: &str,
    namespace: &str,
    (group, resource, subresource): (&str, &str, &str),
    verb: &str,
) -> anyhow::Result<bool> {
    let review: SubjectAccessReview = serde_json::from_value(serde_json::json!({
        "spec": {"user": user, "groups": ["system:serviceaccounts"],
                 "resourceAttributes": {"namespace": namespace, "group": group,
                     "resource": resource, "subresource": subresource, "verb": verb}}
    }))?;
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

#[tokio::test]
async fn install_creates_operator_rbac_crd_and_example() -> anyhow::Result<()> {
    let namespace = unique_name("chart");
    let release = unique_name("hr");
    helm(&[
        "install",
        &release,
        &chart(),
        "--namespace",
        &namespace,
        "--create-namespace",
        "--set",
        "examplePushCluster.enabled=true",
        "--timeout",
        "60s",
    ])?;
    let client = Client::try_default().await?;
    let name = format!("{release}-herald");

    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(
            crds,
            "pushclusters.herald.dev",
            conditions::is_crd_established(),
        ),
    )
    .await??;

    let deployment = Api::<Deployment>::namespaced(client.clone(), &namespace)
        .get(&name)
        .await?;
    let pod = deployment
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod spec");
    assert_eq!(pod.service_account_name.as_deref(), Some(name.as_str()));
    Api::<ServiceAccount>::namespaced(client.clone(), &namespace)
        .get(&name)
        .await?;
    let role = Api::<ClusterRole>::all(client.clone()).get(&name).await?;
    assert!(!role.rules.unwrap_or_default().is_empty());
    Api::<Role>::namespaced(client.clone(), &namespace)
        .get(&format!("{name}-leader-election"))
        .await?;

    // The example PushCluster was accepted by the CRD's schema.
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "herald.dev",
        "v1alpha1",
        "PushCluster",
    ));
    let example = Api::<DynamicObject>::namespaced_with(client.clone(), &namespace, &resource)
        .get("example")
        .await?;
    assert_eq!(example.data["spec"]["comet"]["replicas"], 2);

    // RBAC as the apiserver enforces it for the operator's ServiceAccount.
    let user = format!("system:serviceaccount:{namespace}:{name}");
    let elsewhere = "some-other-namespace";
    for (target, verb) in [
        (("herald.dev", "pushclusters", ""), "watch"),
        (("herald.dev", "pushclusters", "status"), "patch"),
        (("herald.dev", "pushclusters", "scale"), "update"),
        (("apps", "deployments", ""), "create"),
        (("", "configmaps", ""), "patch"),
        (("rbac.authorization.k8s.io", "roles", ""), "create"),
        (("policy", "poddisruptionbudgets", ""), "create"),
        (("", "pods", ""), "patch"),
        (("events.k8s.io", "events", ""), "create"),
    ] {
        assert!(
            allowed(&client, &user, elsewhere, target, verb).await?,
            "{target:?} {verb}"
        );
    }
    assert!(
        allowed(
            &client,
            &user,
            &namespace,
            ("coordination.k8s.io", "leases", ""),
            "update"
        )
        .await?
    );
    for (target, verb) in [
        (("coordination.k8s.io", "leases", ""), "update"), // only in its own namespace
        (("", "pods", "exec"), "create"),
        (("", "nodes", ""), "delete"),
        (("apps", "daemonsets", ""), "create"),
        (("rbac.authorization.k8s.io", "roles", ""), "escalate"),
        (("herald.dev", "pushclusters", ""), "delete"),
        (("herald.dev", "pushclusters", ""), "patch"), // replicas go through /scale
        (("", "nodes", ""), "patch"),
    ] {
        assert!(
            !allowed(&client, &user, elsewhere, target, verb).await?,
            "{target:?} {verb}"
        );
    }

    helm(&["uninstall", &release, "--namespace", &namespace, "--wait"])?;
    assert!(
        Api::<ClusterRole>::all(client.clone())
            .get_opt(&name)
            .await?
            .is_none(),
        "uninstall removes the ClusterRole"
    );
    Api::<Namespace>::all(client)
        .delete(&namespace, &DeleteParams::default())
        .await?;
    Ok(())
}
