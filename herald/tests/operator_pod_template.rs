//! The PushCluster's pod-template controls against the test bed's real
//! apiserver: the CRD's schemas for the embedded Kubernetes types and its
//! rule on `env`, the settings as the stored Deployments, Services and Pods
//! carry them, and the defaults (restricted security contexts, comets spread
//! across nodes). The namespace enforces the "restricted" Pod Security
//! Standard, so the ReplicaSets can create the pods only if the defaults
//! really are restricted.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use herald_e2e::eventually;
use herald_operator::crd::PushCluster;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, PodSpec, PodTemplateSpec, Service};
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

mod common;

use common::operator::{Operator, cluster_json, comet_spec, create_cluster, setup};

/// Every pod-template control set, on each component, and compliant with
/// the restricted standard (else the namespace would refuse the pods).
fn tuned_settings() -> Value {
    json!({
        "podLabels": {"team": "push", "app.kubernetes.io/component": "not-mine"},
        "podAnnotations": {"example.com/scrape": "true"},
        "nodeSelector": {"pool": "push"},
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 50, "podAffinityTerm": {"topologyKey": "topology.kubernetes.io/zone",
             "labelSelector": {"matchLabels": {"team": "push"}}}}]}},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "push",
                         "effect": "NoSchedule"}],
        "topologySpreadConstraints": [{"maxSkew": 2, "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": {"matchLabels": {"team": "push"}}}],
        "podSecurityContext": {"runAsNonRoot": true, "runAsUser": 1000, "fsGroup": 2000,
                               "seccompProfile": {"type": "RuntimeDefault"}},
        "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": false,
                            "capabilities": {"drop": ["ALL"]}},
        "env": [{"name": "TZ", "value": "UTC"},
                {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]
    })
}

fn with(mut base: Value, extra: Value) -> Value {
    if let (Some(base), Some(extra)) = (base.as_object_mut(), extra.as_object()) {
        base.extend(extra.clone());
    }
    base
}

fn template(deployment: &Deployment) -> Result<&PodTemplateSpec> {
    Ok(&deployment.spec.as_ref().context("no spec")?.template)
}

fn pod_spec(deployment: &Deployment) -> Result<&PodSpec> {
    template(deployment)?.spec.as_ref().context("no pod spec")
}

/// The workloads of `cluster` (comet, logic, job), once all three exist.
async fn deployments_of(api: &Api<Deployment>, cluster: &str) -> Result<Vec<Deployment>> {
    eventually(60, &format!("the Deployments of {cluster}"), || async {
        let mut found = Vec::new();
        // The comets' ReplicaSet, in a Deployment's shape and name.
        match comet_spec(api, cluster).await? {
            Some(spec) => found.push(Deployment {
                metadata: kube::api::ObjectMeta {
                    name: Some(format!("{cluster}-comet")),
                    ..Default::default()
                },
                spec: Some(spec),
                status: None,
            }),
            None => return Ok(None),
        }
        for role in ["logic", "job"] {
            match api.get_opt(&format!("{cluster}-{role}")).await? {
                Some(deployment) => found.push(deployment),
                None => return Ok(None),
            }
        }
        Ok(Some(found))
    })
    .await
}

/// Waits for at least one pod of `cluster`'s `role`, made by its
/// ReplicaSet (there is no kubelet: it stays Pending).
async fn a_pod_of(pods: &Api<Pod>, cluster: &str, role: &str) -> Result<Pod> {
    let selector =
        format!("app.kubernetes.io/instance={cluster},app.kubernetes.io/component={role}");
    eventually(60, &format!("a {role} pod of {cluster}"), || async {
        let list = pods.list(&ListParams::default().labels(&selector)).await?;
        Ok(list.items.into_iter().next())
    })
    .await
}

#[tokio::test]
async fn pod_template_settings_and_defaults_reach_deployments_services_and_pods() -> Result<()> {
    let (client, ns) = setup("op-podtpl").await?;
    enforce_restricted(&client, &ns).await?;
    let operator = Operator::start(&client, &ns, "op-podtpl");

    let tuned = tuned_settings();
    create_cluster(
        &client,
        &ns,
        "tuned",
        json!({
            "imagePullPolicy": "Never",
            "imagePullSecrets": [{"name": "registry"}],
            "logFormat": "text",
            "comet": with(tuned.clone(), json!({"replicas": 1,
                "serviceAnnotations": {"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"}})),
            "logic": with(tuned.clone(), json!({
                "serviceAnnotations": {"example.com/internal": "true"}})),
            "job": tuned.clone(),
        }),
    )
    .await?;
    create_cluster(&client, &ns, "plain", json!({"comet": {"replicas": 1}})).await?;

    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    for deployment in deployments_of(&deployments, "tuned").await? {
        check_tuned(&deployment)?;
    }
    for deployment in deployments_of(&deployments, "plain").await? {
        check_defaults(&deployment)?;
    }

    let services = Api::<Service>::namespaced(client.clone(), &ns);
    let annotations = |service: Service| service.metadata.annotations.unwrap_or_default();
    assert_eq!(
        annotations(services.get("tuned-comet").await?)
            .get("service.beta.kubernetes.io/aws-load-balancer-type")
            .map(String::as_str),
        Some("nlb")
    );
    assert_eq!(
        annotations(services.get("tuned-logic").await?)
            .get("example.com/internal")
            .map(String::as_str),
        Some("true")
    );
    assert!(
        !annotations(services.get("plain-comet").await?)
            .keys()
            .any(|k| k.starts_with("service.beta")),
    );

    // Admitted under "restricted": the defaults and the tuned settings.
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    for role in ["comet", "logic", "job"] {
        let pod = a_pod_of(&pods, "plain", role).await?;
        let spec = pod.spec.context("pod without spec")?;
        let security = spec.security_context.context("no pod securityContext")?;
        assert_eq!(security.run_as_non_root, Some(true), "plain {role}");
        let pod = a_pod_of(&pods, "tuned", role).await?;
        let spec = pod.spec.context("pod without spec")?;
        assert_eq!(
            spec.node_selector
                .unwrap_or_default()
                .get("pool")
                .map(String::as_str),
            Some("push"),
            "tuned {role}"
        );
        assert_eq!(pod.metadata.labels.unwrap_or_default()["team"], "push");
    }

    refuses_env_the_operator_sets(&client, &ns).await?;

    operator.stop().await?;
    common::operator::delete_namespace(&client, &ns).await
}

/// Labels the namespace to enforce the restricted Pod Security Standard,
/// and checks the apiserver does enforce it (a privileged pod is refused),
/// so that pods appearing later prove their settings comply.
async fn enforce_restricted(client: &Client, ns: &str) -> Result<()> {
    Api::<Namespace>::all(client.clone())
        .patch(
            ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {
                "pod-security.kubernetes.io/enforce": "restricted"}}})),
        )
        .await?;
    let privileged: Pod = serde_json::from_value(json!({
        "metadata": {"name": "privileged"},
        "spec": {"containers": [{"name": "c", "image": "herald:test",
                                 "securityContext": {"privileged": true}}]}
    }))?;
    let refused = Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &privileged)
        .await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(status)) if status.code == 403),
        "a privileged pod under enforce=restricted: {refused:?}"
    );
    Ok(())
}

fn check_tuned(deployment: &Deployment) -> Result<()> {
    let name = deployment.name_any();
    let role = name.trim_start_matches("tuned-");
    let meta = template(deployment)?
        .metadata
        .as_ref()
        .context("no template metadata")?;
    let labels = meta.labels.clone().unwrap_or_default();
    assert_eq!(labels["team"], "push", "{name}");
    assert_eq!(
        labels["app.kubernetes.io/component"], role,
        "{name}: selector label kept"
    );
    let annotations = meta.annotations.clone().unwrap_or_default();
    assert_eq!(annotations["example.com/scrape"], "true", "{name}");
    assert!(annotations.contains_key("herald.dev/config-hash"), "{name}");

    let pod = pod_spec(deployment)?;
    assert_eq!(
        pod.node_selector.clone().unwrap_or_default(),
        BTreeMap::from([("pool".to_owned(), "push".to_owned())]),
        "{name}"
    );
    let anti = json!(pod.affinity);
    assert_eq!(
        anti["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["weight"], 50,
        "{name}: {anti}"
    );
    let tolerations = pod.tolerations.clone().unwrap_or_default();
    assert_eq!(tolerations.len(), 1, "{name}");
    assert_eq!(tolerations[0].effect.as_deref(), Some("NoSchedule"));
    let spread = pod.topology_spread_constraints.clone().unwrap_or_default();
    assert_eq!(
        spread.len(),
        1,
        "{name}: the given spread replaces the default"
    );
    assert_eq!(
        (spread[0].max_skew, spread[0].topology_key.as_str()),
        (2, "topology.kubernetes.io/zone")
    );
    let security = pod
        .security_context
        .clone()
        .context("no pod securityContext")?;
    assert_eq!(
        (security.run_as_user, security.fs_group),
        (Some(1000), Some(2000)),
        "{name}"
    );
    let secrets = pod.image_pull_secrets.clone().unwrap_or_default();
    assert_eq!(secrets.len(), 1, "{name}");
    assert_eq!(secrets[0].name, "registry");

    let container = &pod.containers[0];
    assert_eq!(
        container.image_pull_policy.as_deref(),
        Some("Never"),
        "{name}"
    );
    let security = container
        .security_context
        .clone()
        .context("no container securityContext")?;
    assert_eq!(security.read_only_root_filesystem, Some(false), "{name}");
    let args = container.args.clone().unwrap_or_default();
    assert!(
        args.contains(&"--log-format=text".to_owned()),
        "{name}: {args:?}"
    );
    let env: Vec<String> = container
        .env
        .iter()
        .flatten()
        .map(|e| e.name.clone())
        .collect();
    assert!(
        env.ends_with(&["TZ".to_owned(), "NODE_NAME".to_owned()]),
        "{name}: {env:?}"
    );
    assert_eq!(env[0], "POD_IP", "{name}: the operator's own come first");
    Ok(())
}

fn check_defaults(deployment: &Deployment) -> Result<()> {
    let name = deployment.name_any();
    let pod = pod_spec(deployment)?;
    let security = json!(pod.security_context);
    assert_eq!(
        security,
        json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
               "seccompProfile": {"type": "RuntimeDefault"}}),
        "{name}"
    );
    let container = &pod.containers[0];
    let security = json!(container.security_context);
    assert_eq!(security["allowPrivilegeEscalation"], false, "{name}");
    assert_eq!(security["readOnlyRootFilesystem"], true, "{name}");
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]), "{name}");
    let args = container.args.clone().unwrap_or_default();
    assert!(
        args.contains(&"--log-format=json".to_owned()),
        "{name}: {args:?}"
    );
    assert_eq!(pod.node_selector, None, "{name}");
    assert_eq!(pod.tolerations, None, "{name}");
    assert_eq!(pod.image_pull_secrets, None, "{name}");
    let spread = json!(pod.topology_spread_constraints);
    if name == "plain-comet" {
        assert_eq!(
            spread,
            json!([{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                    "whenUnsatisfiable": "ScheduleAnyway",
                    "labelSelector": {"matchLabels": {
                        "app.kubernetes.io/component": "comet",
                        "app.kubernetes.io/instance": "plain",
                        "app.kubernetes.io/name": "herald"}}}]),
            "{name}"
        );
    } else {
        assert_eq!(spread, Value::Null, "{name}");
    }
    Ok(())
}

/// The CRD's rule on `env`, as the real apiserver runs it: a name the
/// operator sets is refused with a message naming it; others pass. And the
/// schemas of the new fields refuse what does not fit them.
async fn refuses_env_the_operator_sets(client: &Client, ns: &str) -> Result<()> {
    let raw = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        ns,
        &ApiResource::erase::<PushCluster>(&()),
    );
    let env =
        |name: &str| json!({"env": [{"name": "TZ", "value": "UTC"}, {"name": name, "value": "x"}]});
    for (component, name) in [
        ("comet", "HERALD_REDIS_URL"),
        ("logic", "POD_IP"),
        ("job", "HERALD_KAFKA_TOPIC"),
    ] {
        let object: DynamicObject = serde_json::from_value(cluster_json(
            &format!("env-{}", component),
            json!({component: env(name)}),
        ))?;
        let refused = raw.create(&PostParams::default(), &object).await;
        match &refused {
            Err(kube::Error::Api(status)) if status.code == 422 => assert!(
                status
                    .message
                    .contains(&format!("env {name} is set by the operator")),
                "{component}: {}",
                status.message
            ),
            other => panic!("{component} env {name}: {other:?}"),
        }
    }
    // The embedded Kubernetes types keep their schemas: wrong shapes are
    // refused as they would be in a Deployment.
    for (what, extra) in [
        (
            "affinity",
            json!({"comet": {"affinity": {"nodeAffinity": 5}}}),
        ),
        (
            "tolerations",
            json!({"logic": {"tolerations": "dedicated"}}),
        ),
        (
            "spread",
            json!({"job": {"topologySpreadConstraints": [{"maxSkew": "one"}]}}),
        ),
        (
            "security",
            json!({"comet": {"securityContext": {"capabilities": {"drop": "ALL"}}}}),
        ),
        ("env", json!({"comet": {"env": [{"value": "no name"}]}})),
        ("pull-policy", json!({"imagePullPolicy": "Sometimes"})),
        ("log-format", json!({"logFormat": "xml"})),
    ] {
        let object: DynamicObject =
            serde_json::from_value(cluster_json(&format!("bad-{what}"), extra))?;
        let refused = raw.create(&PostParams::default(), &object).await;
        assert!(
            matches!(&refused, Err(kube::Error::Api(status)) if status.code == 422),
            "{what}: {refused:?}"
        );
    }
    let allowed: DynamicObject = serde_json::from_value(cluster_json(
        "env-ok",
        json!({"job": env("HERALD_JOB_SOMETHING_ELSE")}),
    ))?;
    raw.create(&PostParams::default(), &allowed).await?;
    Ok(())
}
