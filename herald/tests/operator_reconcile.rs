//! The operator against the test bed's real kube-apiserver + etcd +
//! controller-manager: the committed CRD and the example, admission of
//! invalid specs, the children of a PushCluster and the pod contract,
//! idempotent passes, recreation of deleted children, status, a missing
//! Secret (on a new cluster, and on a running one, which keeps being
//! observed and scaled), and Lease-based leader election. Scaling (`/scale`, `kubectl get`
//! columns, the autoscaler, drains) is in `operator_scaling.rs`.

use std::collections::BTreeMap;
use std::time::Duration;

use herald_e2e::eventually;
use herald_operator::crd::PushCluster;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

mod common;

use common::operator::{
    Operator, PodComet, cluster_json, condition, create_cluster, delete_namespace, events_of,
    fake_running, goim_client, has_condition, node_list, owned_by, setup, wait_cluster,
    wait_comet_replicas, wait_pods,
};

#[tokio::test]
async fn invalid_specs_are_refused_at_admission() -> anyhow::Result<()> {
    let (client, ns) = setup("op-admit").await?;
    create_cluster(&client, &ns, "good", json!({})).await?;

    let bad = [
        (
            "min-max",
            json!({"comet": {"replicas": 1,
            "autoscaling": {"enabled": true, "minReplicas": 5, "maxReplicas": 2}}}),
        ),
        ("auth-mode", json!({"auth": {"mode": "oauth"}})),
        ("negative", json!({"comet": {"replicas": -1}})),
        (
            "zero-target",
            json!({"comet": {"autoscaling": {"targetConnectionsPerReplica": 0}}}),
        ),
        ("jwt-no-secret", json!({"auth": {"mode": "jwt"}})),
        ("no-brokers", json!({"kafka": {"brokers": []}})),
    ];
    let api = Api::<PushCluster>::namespaced(client.clone(), &ns);
    for (name, extra) in bad {
        // Sent as raw JSON: the Rust types could not even express some of these.
        let object: kube::api::DynamicObject = serde_json::from_value(cluster_json(name, extra))?;
        let raw = Api::<kube::api::DynamicObject>::namespaced_with(
            client.clone(),
            &ns,
            &kube::api::ApiResource::erase::<PushCluster>(&()),
        );
        let refused = raw.create(&PostParams::default(), &object).await;
        assert!(
            matches!(&refused, Err(kube::Error::Api(status)) if status.code == 422),
            "{name}: {refused:?}"
        );
    }
    assert_eq!(api.list(&ListParams::default()).await?.items.len(), 1);
    delete_namespace(&client, &ns).await
}

#[tokio::test]
async fn cluster_gets_owned_children_idempotently_and_recreates_them() -> anyhow::Result<()> {
    let (client, ns) = setup("op-children").await?;
    let operator = Operator::start(&client, &ns, "op-a");
    let created = create_cluster(&client, &ns, "chat", json!({})).await?;

    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    let configmaps = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let clusters = Api::<PushCluster>::namespaced(client.clone(), &ns);

    // Wait for the status to settle: every deployment rolled out (as far as
    // pods without a kubelet go) and Progressing false.
    let cluster = wait_cluster(&clusters, "chat", 60, "a settled status", |cluster| {
        has_condition(cluster, "Progressing", "False")
    })
    .await?;

    for name in ["chat-comet", "chat-logic", "chat-job"] {
        owned_by(&deployments.get(name).await?.metadata, &created, name)?;
    }
    for name in ["chat-comet", "chat-comet-grpc", "chat-logic"] {
        owned_by(&services.get(name).await?.metadata, &created, name)?;
    }
    for name in ["chat-config", "chat-nodes"] {
        owned_by(&configmaps.get(name).await?.metadata, &created, name)?;
    }
    let api_key = secrets.get("chat-api-key").await?;
    owned_by(&api_key.metadata, &created, "api-key Secret")?;
    assert!(api_key.data.unwrap_or_default().contains_key("api-key"));
    let sa = Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .get("chat-herald")
        .await?;
    owned_by(&sa.metadata, &created, "ServiceAccount")?;
    let role = Api::<Role>::namespaced(client.clone(), &ns)
        .get("chat-herald")
        .await?;
    owned_by(&role.metadata, &created, "Role")?;
    let rule = &role.rules.unwrap_or_default()[0];
    assert_eq!(
        rule.resource_names.as_deref(),
        Some(&["chat-nodes".to_owned()][..])
    );
    assert!(rule.verbs.contains(&"watch".to_owned()) && rule.verbs.contains(&"get".to_owned()));
    let binding = Api::<RoleBinding>::namespaced(client.clone(), &ns)
        .get("chat-herald")
        .await?;
    owned_by(&binding.metadata, &created, "RoleBinding")?;
    for name in ["chat-comet", "chat-logic"] {
        let pdb = Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns)
            .get(name)
            .await?;
        owned_by(&pdb.metadata, &created, name)?;
    }

    // The pod contract, as stored by the apiserver.
    let comet = deployments.get("chat-comet").await?;
    let spec = comet.spec.clone().unwrap_or_default();
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.unwrap_or_default();
    assert_eq!(pod.termination_grace_period_seconds, Some(30 + 15));
    let container = &pod.containers[0];
    assert_eq!(container.image.as_deref(), Some("herald:test"));
    assert!(container.command.is_none());
    let args = container.args.clone().unwrap_or_default();
    assert_eq!(args[0], "comet");
    assert!(
        args.contains(&"--server-id=$(POD_NAME)".to_owned()),
        "{args:?}"
    );
    assert!(
        args.contains(&"--grpc-addr=$(POD_IP):3109".to_owned()),
        "{args:?}"
    );
    let env: BTreeMap<_, _> = container
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|e| {
            (
                e.name,
                e.value_from.and_then(|v| v.field_ref).map(|f| f.field_path),
            )
        })
        .collect();
    assert_eq!(env["POD_IP"].as_deref(), Some("status.podIP"));
    assert_eq!(env["POD_NAME"].as_deref(), Some("metadata.name"));
    let probe = container
        .readiness_probe
        .clone()
        .unwrap_or_default()
        .http_get
        .unwrap_or_default();
    assert_eq!(probe.path.as_deref(), Some("/readyz"));
    let logic = deployments.get("chat-logic").await?;
    let logic_args = logic
        .spec
        .unwrap_or_default()
        .template
        .spec
        .unwrap_or_default()
        .containers[0]
        .args
        .clone()
        .unwrap_or_default();
    assert!(logic_args.contains(&"--node-list-configmap=chat-nodes".to_owned()));

    // Status: selector, per-component counts, node list generation.
    let status = cluster.status.clone().unwrap_or_default();
    assert_eq!(
        status.selector.as_deref(),
        Some(
            "app.kubernetes.io/component=comet,app.kubernetes.io/instance=chat,app.kubernetes.io/name=herald"
        )
    );
    assert_eq!(status.comet.desired_replicas, 2);
    assert_eq!(status.comets_ready.as_deref(), Some("0/2"));
    assert_eq!(status.node_list_generation, 1);
    assert_eq!(
        condition(&cluster, "Degraded"),
        Some(("False".to_owned(), "Valid".to_owned()))
    );
    assert_eq!(
        condition(&cluster, "Available").map(|c| c.0),
        Some("False".to_owned()),
        "no pod runs"
    );
    let nodes = node_list(&configmaps, "chat").await?.unwrap_or_default();
    assert_eq!(
        (
            nodes["generation"].as_i64(),
            nodes["nodes"].as_array().map(Vec::len)
        ),
        (Some(1), Some(0))
    );

    // Idempotent: many more passes (poll every 500 ms) write nothing.
    let versions = |cluster: &PushCluster| cluster.resource_version();
    // kube-controller-manager may still be filling in the Deployments'
    // statuses after Progressing turned false, and the cluster's status
    // follows them: start the window once the status held still for three
    // passes. One rewritten on every pass never does, and fails here.
    let mut before_cluster = versions(&clusters.get("chat").await?);
    let settle_by = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let now = versions(&clusters.get("chat").await?);
        if now == before_cluster {
            break;
        }
        assert!(
            std::time::Instant::now() < settle_by,
            "the status never held still for three passes"
        );
        before_cluster = now;
    }
    let mut before = BTreeMap::new();
    for name in ["chat-comet", "chat-comet-grpc", "chat-logic"] {
        before.insert(
            format!("svc/{name}"),
            services.get(name).await?.resource_version(),
        );
    }
    for name in ["chat-config", "chat-nodes"] {
        before.insert(
            format!("cm/{name}"),
            configmaps.get(name).await?.resource_version(),
        );
    }
    before.insert(
        "secret".to_owned(),
        secrets.get("chat-api-key").await?.resource_version(),
    );
    let mut generations = BTreeMap::new();
    for name in ["chat-comet", "chat-logic", "chat-job"] {
        generations.insert(name, deployments.get(name).await?.metadata.generation);
    }
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), &ns);
    let ours = || async {
        let list = events.list(&ListParams::default()).await?;
        anyhow::Ok(
            list.items
                .into_iter()
                .filter(|e| e.reporting_controller.as_deref() == Some("herald-operator"))
                .map(|e| (e.metadata.name, e.series.map(|s| s.count)))
                .collect::<Vec<_>>(),
        )
    };
    let events_before = ours().await?;
    assert!(
        events_before.iter().any(|e| e.0.is_some()),
        "the generated API key was announced"
    );
    let passes = operator.metrics.reconciles();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        ours().await?,
        events_before,
        "events published with nothing changing"
    );
    assert!(
        operator.metrics.reconciles() >= passes + 3,
        "the operator kept polling"
    );
    assert_eq!(
        versions(&clusters.get("chat").await?),
        before_cluster,
        "status rewritten"
    );
    for (key, version) in &before {
        let (kind, name) = key.split_once('/').unwrap_or((key, "chat-api-key"));
        let now = match kind {
            "svc" => services.get(name).await?.resource_version(),
            "cm" => configmaps.get(name).await?.resource_version(),
            _ => secrets.get(name).await?.resource_version(),
        };
        assert_eq!(&now, version, "{key} rewritten");
    }
    for (name, generation) in &generations {
        assert_eq!(
            &deployments.get(name).await?.metadata.generation,
            generation,
            "{name} spec rewritten"
        );
    }

    // A deleted child comes back (a new object, same shape).
    let old_uid = services.get("chat-comet").await?.metadata.uid;
    services
        .delete("chat-comet", &DeleteParams::default())
        .await?;
    let recreated = eventually(30, "the comet Service back", || async {
        Ok(services
            .get_opt("chat-comet")
            .await?
            .filter(|svc| svc.metadata.uid != old_uid))
    })
    .await?;
    owned_by(&recreated.metadata, &created, "recreated Service")?;
    let old_uid = deployments.get("chat-job").await?.metadata.uid;
    deployments
        .delete("chat-job", &DeleteParams::default())
        .await?;
    eventually(30, "the job Deployment back", || async {
        Ok(deployments
            .get_opt("chat-job")
            .await?
            .filter(|d| d.metadata.uid != old_uid))
    })
    .await?;

    operator.stop().await?;
    delete_namespace(&client, &ns).await
}

#[tokio::test]
async fn missing_secret_degrades_then_recovers() -> anyhow::Result<()> {
    let (client, ns) = setup("op-degraded").await?;
    let operator = Operator::start(&client, &ns, "op-a");
    let auth = json!({"apiKeySecretRef": {"name": "keys", "key": "api"}});
    create_cluster(&client, &ns, "chat", json!({ "auth": auth })).await?;
    let clusters = Api::<PushCluster>::namespaced(client.clone(), &ns);
    let cluster = wait_cluster(&clusters, "chat", 30, "Degraded", |cluster| {
        has_condition(cluster, "Degraded", "True")
    })
    .await?;
    assert_eq!(
        condition(&cluster, "Degraded").map(|c| c.1).as_deref(),
        Some("SecretMissing")
    );
    assert!(
        Api::<Deployment>::namespaced(client.clone(), &ns)
            .get_opt("chat-comet")
            .await?
            .is_none(),
        "nothing is built from an invalid spec"
    );

    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "keys"}, "stringData": {"api": "s3cret"}
    }))?;
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await?;
    wait_cluster(&clusters, "chat", 60, "recovery", |cluster| {
        condition(cluster, "Degraded") == Some(("False".to_owned(), "Valid".to_owned()))
    })
    .await?;
    let reasons: Vec<String> =
        Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), &ns)
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter_map(|e| e.reason)
            .collect();
    assert!(reasons.contains(&"SecretMissing".to_owned()), "{reasons:?}");
    assert!(reasons.contains(&"Recovered".to_owned()), "{reasons:?}");
    let logic = Api::<Deployment>::namespaced(client.clone(), &ns)
        .get("chat-logic")
        .await?;
    let env = logic
        .spec
        .unwrap_or_default()
        .template
        .spec
        .unwrap_or_default()
        .containers[0]
        .env
        .clone()
        .unwrap_or_default();
    let api_key = env
        .iter()
        .find(|e| e.name == "HERALD_LOGIC_API_KEY")
        .and_then(|e| e.value_from.clone());
    assert_eq!(
        api_key
            .and_then(|v| v.secret_key_ref)
            .map(|s| (s.name, s.key)),
        Some(("keys".to_owned(), "api".to_owned()))
    );
    assert!(
        Api::<Secret>::namespaced(client.clone(), &ns)
            .get_opt("chat-api-key")
            .await?
            .is_none(),
        "no generated key when one is referenced"
    );

    operator.stop().await?;
    delete_namespace(&client, &ns).await
}

/// The env Secret reference `HERALD_LOGIC_API_KEY` of the logic Deployment.
async fn logic_api_key_ref(deployments: &Api<Deployment>) -> anyhow::Result<Option<String>> {
    let logic = deployments.get("chat-logic").await?;
    let env = logic
        .spec
        .and_then(|s| s.template.spec)
        .map(|s| s.containers[0].env.clone().unwrap_or_default())
        .unwrap_or_default();
    Ok(env
        .into_iter()
        .find(|e| e.name == "HERALD_LOGIC_API_KEY")
        .and_then(|e| e.value_from?.secret_key_ref)
        .map(|s| s.name))
}

async fn create_secret(
    client: &kube::Client,
    ns: &str,
    name: &str,
    key: &str,
) -> anyhow::Result<()> {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name}, "stringData": {key: "s3cret"}
    }))?;
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await?;
    Ok(())
}

/// A running cluster whose Secret references are changed to two missing
/// Secrets: `Degraded` names both, while `Available` still follows the
/// replicas, connections are still counted and the autoscaler still scales
/// (the running workload is left as it is, only its comet replicas move);
/// once the Secrets exist, `Recovered` and the spec is applied.
#[tokio::test]
async fn missing_secrets_leave_a_running_cluster_observed_and_scaled() -> anyhow::Result<()> {
    let (client, ns) = setup("op-secret-run").await?;
    create_secret(&client, &ns, "keys", "api").await?;
    create_secret(&client, &ns, "jwt", "secret").await?;
    let operator = Operator::start(&client, &ns, "op-a");
    let grpc_port = herald_e2e::free_port();
    let auth = json!({"apiKeySecretRef": {"name": "keys", "key": "api"},
                      "jwtSecretRef": {"name": "jwt", "key": "secret"}});
    let comet = json!({"replicas": 1, "ports": {"grpc": grpc_port},
        "autoscaling": {"enabled": true, "minReplicas": 1, "maxReplicas": 2,
                        "targetConnectionsPerReplica": 2, "scaleDownStabilizationSeconds": 300}});
    create_cluster(&client, &ns, "chat", json!({"auth": auth, "comet": comet})).await?;
    let clusters = Api::<PushCluster>::namespaced(client.clone(), &ns);
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), &ns);

    // Every component runs: a real comet behind the comet pod, logic and
    // job pods marked ready (nothing polls them).
    let comet_pod = wait_pods(&pods, "chat", "comet", 1).await?;
    let comet = PodComet::start(&pods, &comet_pod[0], "127.0.0.2", grpc_port).await?;
    for (component, ip) in [("logic", "127.0.0.3"), ("job", "127.0.0.4")] {
        let name = wait_pods(&pods, "chat", component, 1).await?;
        fake_running(&pods, &name[0], ip).await?;
    }
    let mut clients = vec![goim_client(comet.tcp, 1).await?];
    wait_cluster(
        &clusters,
        "chat",
        60,
        "Available with 1 connection",
        |cluster| {
            has_condition(cluster, "Available", "True")
                && has_condition(cluster, "Degraded", "False")
                && cluster.status.as_ref().map(|s| s.total_connections) == Some(1)
        },
    )
    .await?;

    // Both references now name Secrets that do not exist.
    let missing = json!({"spec": {"auth": {
        "apiKeySecretRef": {"name": "gone-keys", "key": "api"},
        "jwtSecretRef": {"name": "gone-jwt", "key": "secret"}}}});
    clusters
        .patch("chat", &PatchParams::default(), &Patch::Merge(&missing))
        .await?;
    let degraded = |cluster: &PushCluster| {
        let status = cluster.status.clone().unwrap_or_default();
        status
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Degraded" && c.status == "True")
    };
    let cluster =
        wait_cluster(&clusters, "chat", 30, "Degraded", |c| degraded(c).is_some()).await?;
    let why = degraded(&cluster).unwrap_or_default();
    assert_eq!(why.reason, "SecretMissing");
    assert!(
        why.message.contains("gone-keys") && why.message.contains("gone-jwt"),
        "every missing Secret named: {}",
        why.message
    );
    assert!(
        has_condition(&cluster, "Available", "True"),
        "Available follows the replicas: {:?}",
        cluster.status
    );

    // Still observed and scaled: two more clients are 3 connections, over
    // 2 per comet, so the autoscaler asks for a second comet.
    for mid in 2..4 {
        clients.push(goim_client(comet.tcp, mid).await?);
    }
    let cluster = wait_cluster(
        &clusters,
        "chat",
        30,
        "3 connections, 2 comets",
        |cluster| {
            let status = cluster.status.clone().unwrap_or_default();
            status.total_connections == 3 && cluster.spec.comet.replicas == 2
        },
    )
    .await?;
    assert!(
        degraded(&cluster).is_some(),
        "still Degraded: {:?}",
        cluster.status
    );
    wait_comet_replicas(&deployments, "chat", 2, 30).await?;
    assert_eq!(
        logic_api_key_ref(&deployments).await?.as_deref(),
        Some("keys"),
        "the running workload is not rolled onto a missing Secret"
    );
    let events = events_of(&client, &ns, "chat").await?;
    assert!(
        events.iter().any(|(type_, reason, note)| type_ == "Warning"
            && reason == "SecretMissing"
            && note.contains("gone-keys")
            && note.contains("gone-jwt")),
        "{events:?}"
    );

    // The Secrets appear: recovered, and the spec applied.
    create_secret(&client, &ns, "gone-keys", "api").await?;
    create_secret(&client, &ns, "gone-jwt", "secret").await?;
    wait_cluster(&clusters, "chat", 30, "recovery", |cluster| {
        condition(cluster, "Degraded") == Some(("False".to_owned(), "Valid".to_owned()))
    })
    .await?;
    let events = events_of(&client, &ns, "chat").await?;
    assert!(
        events.iter().any(|(_, reason, _)| reason == "Recovered"),
        "{events:?}"
    );
    eventually(30, "logic rolled onto the new Secret", || async {
        Ok((logic_api_key_ref(&deployments).await?.as_deref() == Some("gone-keys")).then_some(()))
    })
    .await?;

    operator.stop().await?;
    drop(clients);
    delete_namespace(&client, &ns).await
}

#[tokio::test]
async fn only_the_lease_holder_acts() -> anyhow::Result<()> {
    let (client, ns) = setup("op-lease").await?;
    let first = Operator::start(&client, &ns, "op-a");
    let second = Operator::start(&client, &ns, "op-b");
    create_cluster(&client, &ns, "chat", json!({})).await?;
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    eventually(60, "children", || async {
        Ok(deployments.get_opt("chat-comet").await?.map(|_| ()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let (leader, follower) = if first.metrics.is_leader() {
        (first, second)
    } else {
        (second, first)
    };
    assert!(leader.metrics.is_leader());
    assert!(!follower.metrics.is_leader(), "both lead");
    assert!(leader.metrics.reconciles() > 0);
    assert_eq!(follower.metrics.reconciles(), 0, "the follower reconciled");

    // The leader stops (releasing the Lease): the other one takes over.
    leader.stop().await?;
    eventually(30, "the follower to lead", || async {
        Ok((follower.metrics.is_leader() && follower.metrics.reconciles() > 0).then_some(()))
    })
    .await?;
    // And it acts: a deleted child comes back.
    deployments
        .delete("chat-logic", &DeleteParams::default())
        .await?;
    eventually(30, "logic back", || async {
        Ok(deployments
            .get_opt("chat-logic")
            .await?
            .filter(|d| d.metadata.deletion_timestamp.is_none())
            .map(|_| ()))
    })
    .await?;

    follower.stop().await?;
    delete_namespace(&client, &ns).await
}

#[tokio::test]
async fn example_is_accepted_by_the_apiserver() -> anyhow::Result<()> {
    let (client, ns) = setup("op-example").await?;
    let example: PushCluster =
        serde_yaml::from_str(include_str!("../../examples/pushcluster.yaml"))?;
    let created = Api::<PushCluster>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &example)
        .await?;
    assert_eq!(created.spec, example.spec);
    delete_namespace(&client, &ns).await
}
