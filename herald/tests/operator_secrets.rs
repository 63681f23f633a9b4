//! A PushCluster whose referenced Secrets are missing, on the test bed's
//! real kube-apiserver + etcd + controller-manager, the operator in this
//! process: a new cluster is `Degraded` and built once the Secret exists; a
//! running one (a real comet behind its comet pod, clients connected) stays
//! observed, scaled and reported while `Degraded` names every missing Secret.

use herald_e2e::eventually;
use herald_operator::crd::PushCluster;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

mod common;

use common::operator::{
    Operator, PodComet, comet_spec, condition, create_cluster, delete_namespace, events_of,
    fake_running, goim_client, has_condition, node_list, setup, wait_cluster, wait_comet_replicas,
    wait_pods,
};

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
        comet_spec(&Api::<Deployment>::namespaced(client.clone(), &ns), "chat")
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
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);

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
    // The node list logic hands out follows the comet's load too.
    let configmaps = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    let list = node_list(&configmaps, "chat").await?.unwrap_or_default();
    let listed = list["nodes"].as_array().cloned().unwrap_or_default();
    assert!(
        listed
            .iter()
            .any(|n| n["name"] == comet_pod[0].as_str() && n["connections"] == 3),
        "{list}"
    );
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
