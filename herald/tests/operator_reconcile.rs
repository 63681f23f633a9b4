//! The operator against the test bed's real kube-apiserver + etcd +
//! controller-manager: the committed CRD and the example, admission of
//! invalid specs, the children of a PushCluster and the pod contract,
//! idempotent passes, recreation of deleted children, status, and
//! Lease-based leader election. Missing Secrets are in
//! `operator_secrets.rs`, scaling (`/scale`, `kubectl get` columns, the
//! autoscaler, drains) in `operator_scaling.rs`, deletion in
//! `operator_teardown.rs`.

use std::collections::BTreeMap;
use std::time::Duration;

use herald_e2e::eventually;
use herald_operator::crd::PushCluster;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

mod common;

use common::operator::{
    Operator, cluster_json, comet_replica_sets, comet_spec, condition, create_cluster,
    delete_namespace, has_condition, node_list, owned_by, setup, wait_cluster,
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

    for name in ["chat-logic", "chat-job"] {
        owned_by(&deployments.get(name).await?.metadata, &created, name)?;
    }
    // Comets run in one ReplicaSet per pod-template revision (no comet
    // Deployment under the default `rollout.strategy: Drain`).
    assert!(deployments.get_opt("chat-comet").await?.is_none());
    let sets = comet_replica_sets(&deployments, "chat").await?;
    assert_eq!(sets.len(), 1, "one revision");
    let comet_set = sets[0].name_any();
    assert!(comet_set.starts_with("chat-comet-"), "{comet_set}");
    owned_by(&sets[0].metadata, &created, &comet_set)?;
    for name in ["chat-comet", "chat-comet-grpc", "chat-logic"] {
        owned_by(&services.get(name).await?.metadata, &created, name)?;
    }
    for name in ["chat-config", "chat-nodes"] {
        owned_by(&configmaps.get(name).await?.metadata, &created, name)?;
    }
    let api_key = secrets.get("chat-api-key").await?;
    owned_by(&api_key.metadata, &created, "api-key Secret")?;
    assert!(api_key.data.unwrap_or_default().contains_key("api-key"));
    // The internal gRPC token, generated once, handed to every role.
    let token = secrets.get("chat-grpc-token").await?;
    owned_by(&token.metadata, &created, "gRPC-token Secret")?;
    let value = token
        .data
        .unwrap_or_default()
        .remove("token")
        .unwrap_or_default();
    assert_eq!(value.0.len(), 48, "a generated 24-byte token in hex");
    // One NetworkPolicy per component, written (the test bed stores, not
    // enforces them: what they say is checked by the builder's tests).
    let policies = Api::<NetworkPolicy>::namespaced(client.clone(), &ns);
    for name in ["chat-comet", "chat-logic", "chat-job"] {
        owned_by(&policies.get(name).await?.metadata, &created, name)?;
    }
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
    let spec = comet_spec(&deployments, "chat").await?.unwrap_or_default();
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.unwrap_or_default();
    // 30 s deadline + 15 s margin, rounded up to 300 s: deadline changes
    // within the step reach the comets through the node list, no roll.
    assert_eq!(pod.termination_grace_period_seconds, Some(300));
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
    for name in ["chat-logic", "chat-job"] {
        generations.insert(name, deployments.get(name).await?.metadata.generation);
    }
    let comet_generation = |sets: Vec<k8s_openapi::api::apps::v1::ReplicaSet>| {
        sets.into_iter()
            .map(|rs| (rs.name_any(), rs.metadata.generation))
            .collect::<Vec<_>>()
    };
    let comet_before = comet_generation(comet_replica_sets(&deployments, "chat").await?);
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
    assert_eq!(
        comet_generation(comet_replica_sets(&deployments, "chat").await?),
        comet_before,
        "comet ReplicaSet rewritten or another revision made"
    );

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
    // A deleted NetworkPolicy comes back; switched off, all three go.
    policies
        .delete("chat-comet", &DeleteParams::default())
        .await?;
    eventually(30, "the comet NetworkPolicy back", || async {
        Ok(policies.get_opt("chat-comet").await?.map(|_| ()))
    })
    .await?;
    clusters
        .patch(
            "chat",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"networkPolicy": {"enabled": false}}})),
        )
        .await?;
    eventually(30, "the NetworkPolicies removed", || async {
        let left = policies.list(&ListParams::default()).await?.items;
        Ok(left.is_empty().then_some(()))
    })
    .await?;

    operator.stop().await?;
    delete_namespace(&client, &ns).await
}

/// `Progressing` outside a comet rollout: `True`/`RollingOut` while the
/// Deployments converge on the spec (a new cluster, then logic scaled to
/// 2), `False`/`Stable` once they have. Every status write is seen through
/// a watch, so a short-lived `RollingOut` is not missed between polls.
#[tokio::test]
async fn progressing_while_deployments_converge() -> anyhow::Result<()> {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};

    let (client, ns) = setup("op-progress").await?;
    let clusters = Api::<PushCluster>::namespaced(client.clone(), &ns);
    // Each distinct `Progressing` the status shows: (its observedGeneration,
    // status, reason), in order.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let watch = tokio::spawn({
        let (clusters, seen) = (clusters.clone(), seen.clone());
        async move {
            let config = watcher::Config::default().fields("metadata.name=chat");
            let mut stream = std::pin::pin!(watcher(clusters, config).applied_objects());
            while let Some(Ok(cluster)) = stream.next().await {
                let conditions = cluster.status.unwrap_or_default().conditions;
                let Some(c) = conditions.into_iter().find(|c| c.type_ == "Progressing") else {
                    continue;
                };
                let state = (c.observed_generation, c.status, c.reason);
                let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                if seen.last() != Some(&state) {
                    seen.push(state);
                }
            }
        }
    });
    let operator = Operator::start(&client, &ns, "op-a");
    let stable = |generation: i64| {
        move |cluster: &PushCluster| {
            cluster.status.as_ref().is_some_and(|s| {
                s.conditions.iter().any(|c| {
                    c.type_ == "Progressing"
                        && (c.status.as_str(), c.reason.as_str()) == ("False", "Stable")
                        && c.observed_generation == Some(generation)
                })
            })
        }
    };
    // What was seen for `generation`, up to (and with) the first Stable.
    let states_of = |generation: i64| {
        let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut states: Vec<(String, String)> = Vec::new();
        for (observed, status, reason) in seen.iter() {
            if *observed == Some(generation) {
                states.push((status.clone(), reason.clone()));
                if reason == "Stable" {
                    break;
                }
            }
        }
        states
    };
    let rolling_then_stable = |states: &[(String, String)]| {
        let rolling = ("True".to_owned(), "RollingOut".to_owned());
        let settled = ("False".to_owned(), "Stable".to_owned());
        states.contains(&rolling) && states.last() == Some(&settled)
    };

    // A new cluster: its Deployments start with nothing rolled out.
    create_cluster(&client, &ns, "chat", json!({})).await?;
    wait_cluster(&clusters, "chat", 60, "Progressing Stable", stable(1)).await?;
    let states = states_of(1);
    assert!(rolling_then_stable(&states), "new cluster: {states:?}");

    // Logic scaled: RollingOut again until its Deployment has the replicas.
    let patch = json!({"spec": {"logic": {"replicas": 2}}});
    let scaled = clusters
        .patch(
            "chat",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await?;
    let generation = scaled.metadata.generation.unwrap_or_default();
    assert!(generation > 1, "the spec change is a new generation");
    let what = "Progressing Stable after the scale";
    wait_cluster(&clusters, "chat", 60, what, stable(generation)).await?;
    let states = states_of(generation);
    assert!(rolling_then_stable(&states), "logic scaled: {states:?}");
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let logic = deployments.get("chat-logic").await?;
    assert_eq!(logic.spec.and_then(|s| s.replicas), Some(2));

    watch.abort();
    operator.stop().await?;
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
        Ok(comet_spec(&deployments, "chat").await?.map(|_| ()))
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
