//! The operator against the test bed's real kube-apiserver + etcd +
//! controller-manager: the committed CRD, admission of invalid specs, the
//! children of a PushCluster and the pod contract, idempotent passes,
//! recreation of deleted children, status and `kubectl get` columns, `/scale`,
//! Lease-based leader election, and the drain of a comet backed by a real
//! comet process (pod status is patched to point at it on loopback).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use herald_e2e::{eventually, testbed_var, unique_name};
use herald_operator::crd::PushCluster;
use herald_operator::{Config, Metrics};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

async fn client() -> anyhow::Result<Client> {
    // KUBECONFIG comes from the test bed; without it this fails, never skips.
    testbed_var("KUBECONFIG");
    Ok(Client::try_default().await?)
}

/// A fresh labelled namespace with the CRD installed.
async fn setup(prefix: &str) -> anyhow::Result<(Client, String)> {
    let client = client().await?;
    herald_e2e::install_pushcluster_crd(&client).await?;
    let name = unique_name(prefix);
    let namespace: Namespace = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"herald.dev/e2e": "operator"}}
    }))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await?;
    Ok((client, name))
}

async fn teardown(client: &Client, namespace: &str) -> anyhow::Result<()> {
    Api::<Namespace>::all(client.clone())
        .delete(namespace, &DeleteParams::default())
        .await?;
    Ok(())
}

/// An operator instance running in this test's runtime.
struct Operator {
    metrics: Arc<Metrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<herald_operator::Result<()>>,
}

impl Operator {
    fn start(client: &Client, namespace: &str, lease: &str, identity: &str) -> Self {
        let metrics = Arc::new(Metrics::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let config = Config {
            namespaces: vec![namespace.to_owned()],
            lease_name: lease.to_owned(),
            lease_namespace: namespace.to_owned(),
            identity: identity.to_owned(),
            lease_secs: 4,
            poll_interval: Duration::from_millis(500),
            service_addresses: herald_operator::ServiceAddresses::Dns,
            metrics_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let task = tokio::spawn(herald_operator::lead(
            client.clone(),
            config,
            metrics.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        Self {
            metrics,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), &mut self.task).await???;
        Ok(())
    }
}

fn cluster_json(name: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut spec = json!({
        "image": "herald:test",
        "redis": {"addr": "redis.example:6379"},
        "kafka": {"brokers": ["kafka.example:9092"]},
        "comet": {"replicas": 2}
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        for (key, value) in extra {
            spec.insert(key.clone(), value.clone());
        }
    }
    json!({"apiVersion": "herald.dev/v1alpha1", "kind": "PushCluster",
           "metadata": {"name": name}, "spec": spec})
}

async fn create_cluster(
    client: &Client,
    namespace: &str,
    value: serde_json::Value,
) -> kube::Result<PushCluster> {
    let cluster: PushCluster = serde_json::from_value(value).map_err(kube::Error::SerdeError)?;
    Api::<PushCluster>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &cluster)
        .await
}

fn condition(cluster: &PushCluster, type_: &str) -> Option<(String, String)> {
    cluster
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

fn assert_owned_by(meta: &kube::api::ObjectMeta, cluster: &PushCluster, what: &str) {
    let owner = meta
        .owner_references
        .as_ref()
        .and_then(|owners| owners.iter().find(|o| o.controller == Some(true)))
        .unwrap_or_else(|| panic!("{what} has no controller owner"));
    assert_eq!(owner.kind, "PushCluster", "{what}");
    assert_eq!(Some(&owner.uid), cluster.meta().uid.as_ref(), "{what}");
}

#[tokio::test]
async fn invalid_specs_are_refused_at_admission() -> anyhow::Result<()> {
    let (client, ns) = setup("op-admit").await?;
    create_cluster(&client, &ns, cluster_json("good", json!({}))).await?;

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
    teardown(&client, &ns).await
}

#[tokio::test]
async fn cluster_gets_owned_children_idempotently_and_recreates_them() -> anyhow::Result<()> {
    let (client, ns) = setup("op-children").await?;
    let operator = Operator::start(&client, &ns, "herald-operator", "op-a");
    let created = create_cluster(&client, &ns, cluster_json("chat", json!({}))).await?;

    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    let configmaps = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let clusters = Api::<PushCluster>::namespaced(client.clone(), &ns);

    // Wait for the status to settle: every deployment rolled out (as far as
    // pods without a kubelet go) and Progressing false.
    let cluster = eventually(60, "a settled status", || async {
        let cluster = clusters.get("chat").await?;
        Ok(
            (condition(&cluster, "Progressing").map(|c| c.0) == Some("False".to_owned()))
                .then_some(cluster),
        )
    })
    .await?;

    for name in ["chat-comet", "chat-logic", "chat-job"] {
        assert_owned_by(&deployments.get(name).await?.metadata, &created, name);
    }
    for name in ["chat-comet", "chat-comet-grpc", "chat-logic"] {
        assert_owned_by(&services.get(name).await?.metadata, &created, name);
    }
    for name in ["chat-config", "chat-nodes"] {
        assert_owned_by(&configmaps.get(name).await?.metadata, &created, name);
    }
    let api_key = secrets.get("chat-api-key").await?;
    assert_owned_by(&api_key.metadata, &created, "api-key Secret");
    assert!(api_key.data.unwrap_or_default().contains_key("api-key"));
    let sa = Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .get("chat-herald")
        .await?;
    assert_owned_by(&sa.metadata, &created, "ServiceAccount");
    let role = Api::<Role>::namespaced(client.clone(), &ns)
        .get("chat-herald")
        .await?;
    assert_owned_by(&role.metadata, &created, "Role");
    let rule = &role.rules.unwrap_or_default()[0];
    assert_eq!(
        rule.resource_names.as_deref(),
        Some(&["chat-nodes".to_owned()][..])
    );
    assert!(rule.verbs.contains(&"watch".to_owned()) && rule.verbs.contains(&"get".to_owned()));
    let binding = Api::<RoleBinding>::namespaced(client.clone(), &ns)
        .get("chat-herald")
        .await?;
    assert_owned_by(&binding.metadata, &created, "RoleBinding");
    for name in ["chat-comet", "chat-logic"] {
        let pdb = Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns)
            .get(name)
            .await?;
        assert_owned_by(&pdb.metadata, &created, name);
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
    let nodes = configmaps.get("chat-nodes").await?.data.unwrap_or_default();
    let nodes: serde_json::Value = serde_json::from_str(&nodes["nodes.json"])?;
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
    assert_owned_by(&recreated.metadata, &created, "recreated Service");
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
    teardown(&client, &ns).await
}

#[tokio::test]
async fn kubectl_columns_and_scale_subresource() -> anyhow::Result<()> {
    let (client, ns) = setup("op-scale").await?;
    let operator = Operator::start(&client, &ns, "herald-operator", "op-a");
    create_cluster(&client, &ns, cluster_json("chat", json!({}))).await?;
    let clusters = Api::<PushCluster>::namespaced(client.clone(), &ns);
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    eventually(60, "status", || async {
        let cluster = clusters.get("chat").await?;
        Ok(cluster
            .status
            .and_then(|s| s.comets_ready)
            .filter(|c| c == "0/2"))
    })
    .await?;

    let kubectl = testbed_var("HERALD_KUBECTL");
    let output = tokio::process::Command::new(&kubectl)
        .args(["get", "pushclusters", "-n", &ns])
        .output()
        .await?;
    let table = String::from_utf8(output.stdout)?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "READY", "COMETS", "CONNECTIONS", "DRAINING", "AGE"],
        "{table}"
    );
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(&row[..5], ["chat", "False", "0/2", "0", "0"], "{table}");

    // /scale reports the spec'd replicas and the comet selector, as an HPA reads it.
    let scale = clusters.get_scale("chat").await?;
    assert_eq!(scale.spec.and_then(|s| s.replicas), Some(2));
    assert_eq!(
        scale.status.and_then(|s| s.selector).as_deref(),
        Some(
            "app.kubernetes.io/component=comet,app.kubernetes.io/instance=chat,app.kubernetes.io/name=herald"
        )
    );

    // kubectl scale (what an HPA does through /scale) up: applied at once.
    let output = tokio::process::Command::new(&kubectl)
        .args(["scale", "pushcluster/chat", "--replicas=4", "-n", &ns])
        .output()
        .await?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    eventually(30, "4 comets", || async {
        let replicas = deployments
            .get("chat-comet")
            .await?
            .spec
            .and_then(|s| s.replicas);
        Ok((replicas == Some(4)).then_some(()))
    })
    .await?;
    // Down: the comets hold no clients (no kubelet runs them, none is ready),
    // so they go without a drain, one step per pass.
    clusters
        .patch_scale(
            "chat",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 1}})),
        )
        .await?;
    eventually(30, "1 comet", || async {
        let replicas = deployments
            .get("chat-comet")
            .await?
            .spec
            .and_then(|s| s.replicas);
        Ok((replicas == Some(1)).then_some(()))
    })
    .await?;
    let cluster = clusters.get("chat").await?;
    assert_eq!(
        cluster.status.and_then(|s| s.comets_ready).as_deref(),
        Some("0/1")
    );

    operator.stop().await?;
    teardown(&client, &ns).await
}

#[tokio::test]
async fn missing_secret_degrades_then_recovers() -> anyhow::Result<()> {
    let (client, ns) = setup("op-degraded").await?;
    let operator = Operator::start(&client, &ns, "herald-operator", "op-a");
    create_cluster(
        &client,
        &ns,
        cluster_json(
            "chat",
            json!({"auth": {"apiKeySecretRef": {"name": "keys", "key": "api"}}}),
        ),
    )
    .await?;
    let clusters = Api::<PushCluster>::namespaced(client.clone(), &ns);
    let cluster = eventually(30, "Degraded", || async {
        let cluster = clusters.get("chat").await?;
        Ok(
            (condition(&cluster, "Degraded").map(|c| c.0) == Some("True".to_owned()))
                .then_some(cluster),
        )
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
    eventually(60, "recovery", || async {
        let cluster = clusters.get("chat").await?;
        Ok(
            (condition(&cluster, "Degraded") == Some(("False".to_owned(), "Valid".to_owned())))
                .then_some(()),
        )
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
    teardown(&client, &ns).await
}

#[tokio::test]
async fn only_the_lease_holder_acts() -> anyhow::Result<()> {
    let (client, ns) = setup("op-lease").await?;
    let first = Operator::start(&client, &ns, "herald-operator", "op-a");
    let second = Operator::start(&client, &ns, "herald-operator", "op-b");
    create_cluster(&client, &ns, cluster_json("chat", json!({}))).await?;
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
    teardown(&client, &ns).await
}

/// Marks a pod Running and Ready at `ip`, as a kubelet would.
async fn fake_running(pods: &Api<Pod>, name: &str, ip: &str) -> anyhow::Result<()> {
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}]
        }})),
    )
    .await?;
    Ok(())
}

#[derive(clap::Parser)]
struct CometCli {
    #[command(flatten)]
    args: herald_comet::Args,
}

/// A real comet (the library `herald comet` runs) on `ip`, gRPC on `grpc_port`.
async fn start_comet(
    ip: &str,
    grpc_port: u16,
    server_id: &str,
) -> anyhow::Result<tokio::sync::oneshot::Sender<()>> {
    use clap::Parser;
    let cli = CometCli::try_parse_from([
        "comet".to_owned(),
        format!("--tcp-addr={ip}:0"),
        format!("--ws-addr={ip}:0"),
        format!("--grpc-addr={ip}:{grpc_port}"),
        format!("--http-addr={ip}:0"),
        format!("--server-id={server_id}"),
        // No logic: the admin service works without one.
        "--logic-addr=127.0.0.1:9".to_owned(),
        "--drain-deadline-ms=2000".to_owned(),
    ])?;
    let listeners = cli.args.bind().await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(herald_comet::run(
        cli.args.config(),
        listeners,
        async move {
            let _ = stopped.await;
        },
    ));
    Ok(stop)
}

#[tokio::test]
async fn scale_down_drains_a_real_comet_first() -> anyhow::Result<()> {
    let (client, ns) = setup("op-drain").await?;
    let grpc_port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?.port()
    };
    let operator = Operator::start(&client, &ns, "herald-operator", "op-a");
    create_cluster(
        &client,
        &ns,
        cluster_json(
            "chat",
            json!({"comet": {"replicas": 2, "ports": {"grpc": grpc_port},
                             "drain": {"deadlineSeconds": 20}}}),
        ),
    )
    .await?;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let selector = "app.kubernetes.io/component=comet,app.kubernetes.io/instance=chat";
    let names = eventually(60, "2 comet pods", || async {
        let list = pods.list(&ListParams::default().labels(selector)).await?;
        let names: Vec<String> = list.items.iter().map(ResourceExt::name_any).collect();
        Ok((names.len() == 2).then_some(names))
    })
    .await?;
    // Each pod gets its own loopback address, where a real comet listens.
    let mut comets = Vec::new();
    let mut ips = BTreeMap::new();
    for (i, name) in names.iter().enumerate() {
        let ip = format!("127.0.0.{}", i + 2);
        comets.push(start_comet(&ip, grpc_port, name).await?);
        fake_running(&pods, name, &ip).await?;
        ips.insert(name.clone(), ip);
    }

    // Polled: both comets in status and in the node list.
    let configmaps = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    let nodes = eventually(30, "2 nodes", || async {
        let Some(data) = configmaps
            .get_opt("chat-nodes")
            .await?
            .and_then(|cm| cm.data)
        else {
            return Ok(None);
        };
        let nodes: serde_json::Value = serde_json::from_str(&data["nodes.json"])?;
        Ok((nodes["nodes"].as_array().map(Vec::len) == Some(2)).then_some(nodes))
    })
    .await?;
    assert!(nodes["generation"].as_i64() >= Some(2));
    for node in nodes["nodes"].as_array().into_iter().flatten() {
        let name = node["name"].as_str().unwrap_or_default();
        assert_eq!(node["grpc"], format!("{}:{grpc_port}", ips[name]));
        assert_eq!(node["draining"], false);
        assert_eq!(node["connections"], 0);
    }
    let clusters = Api::<PushCluster>::namespaced(client.clone(), &ns);
    let status = clusters.get("chat").await?.status.unwrap_or_default();
    assert_eq!(status.pods.len(), 2, "{status:?}");

    // Scale down through /scale: one comet is drained, then removed.
    clusters
        .patch_scale(
            "chat",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 1}})),
        )
        .await?;
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    eventually(30, "1 comet", || async {
        let replicas = deployments
            .get("chat-comet")
            .await?
            .spec
            .and_then(|s| s.replicas);
        Ok((replicas == Some(1)).then_some(()))
    })
    .await?;
    // The drained comet was told to drain, and marked cheapest to delete
    // before the replicas went down.
    let mut drained = Vec::new();
    for name in &names {
        if let Some(pod) = pods.get_opt(name).await? {
            let annotations = pod.annotations();
            if annotations.contains_key("herald.dev/drain-started") {
                assert_eq!(
                    annotations
                        .get("controller.kubernetes.io/pod-deletion-cost")
                        .map(String::as_str),
                    Some("-2147483648")
                );
                drained.push(name.clone());
            }
        }
        let load = herald_operator::load::load(
            &format!("{}:{grpc_port}", ips[name]),
            Duration::from_secs(2),
        )
        .await?;
        if load.draining {
            drained.push(name.clone());
        }
    }
    drained.dedup();
    assert_eq!(drained.len(), 1, "exactly one comet drained: {drained:?}");

    // The ReplicaSet removes that pod; the node list and status follow.
    let kept: Vec<&String> = names.iter().filter(|n| **n != drained[0]).collect();
    eventually(30, "the drained pod gone from the node list", || async {
        let Some(data) = configmaps
            .get_opt("chat-nodes")
            .await?
            .and_then(|cm| cm.data)
        else {
            return Ok(None);
        };
        let nodes: serde_json::Value = serde_json::from_str(&data["nodes.json"])?;
        let names: Vec<&str> = nodes["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["name"].as_str())
            .collect();
        Ok((names == [kept[0].as_str()]).then_some(()))
    })
    .await?;
    // Draining turns False once the drained pod is terminating; the status
    // lists it until a later reconcile no longer finds it.
    eventually(30, "Draining False and one pod in the status", || async {
        let cluster = clusters.get("chat").await?;
        let drained = condition(&cluster, "Draining").map(|c| c.0) == Some("False".to_owned());
        let pods = cluster.status.as_ref().map(|s| s.pods.len());
        Ok((drained && pods == Some(1)).then_some(()))
    })
    .await?;

    operator.stop().await?;
    for stop in comets {
        let _ = stop.send(());
    }
    teardown(&client, &ns).await
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
    teardown(&client, &ns).await
}

#[tokio::test]
async fn autoscaler_follows_load_within_min_and_max() -> anyhow::Result<()> {
    let (client, ns) = setup("op-auto").await?;
    let operator = Operator::start(&client, &ns, "herald-operator", "op-a");
    // No comet holds connections, so the load asks for minReplicas.
    create_cluster(
        &client,
        &ns,
        cluster_json(
            "up",
            json!({"comet": {"replicas": 1, "autoscaling": {"enabled": true,
                "minReplicas": 3, "maxReplicas": 5, "scaleDownStabilizationSeconds": 0}}}),
        ),
    )
    .await?;
    let start = tokio::time::Instant::now();
    create_cluster(
        &client,
        &ns,
        cluster_json(
            "down",
            json!({"comet": {"replicas": 4, "autoscaling": {"enabled": true,
                "minReplicas": 1, "maxReplicas": 5, "scaleDownStabilizationSeconds": 2}}}),
        ),
    )
    .await?;
    let clusters = Api::<PushCluster>::namespaced(client.clone(), &ns);
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let replicas = |name: &'static str| {
        let (clusters, deployments) = (clusters.clone(), deployments.clone());
        async move {
            let spec = clusters.get(name).await?.spec.comet.replicas;
            let deployed = deployments
                .get_opt(&format!("{name}-comet"))
                .await?
                .and_then(|d| d.spec?.replicas);
            anyhow::Ok((spec, deployed))
        }
    };
    eventually(30, "scale up to minReplicas", || async {
        Ok((replicas("up").await? == (3, Some(3))).then_some(()))
    })
    .await?;
    // Down waits for the stabilisation window, then goes to the minimum.
    eventually(60, "scale down to minReplicas", || async {
        Ok((replicas("down").await? == (1, Some(1))).then_some(()))
    })
    .await?;
    assert!(
        start.elapsed() >= Duration::from_secs(2),
        "scaled down inside the window"
    );
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await?;
    assert!(
        events
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("ScaledComets")),
        "a ScaledComets event"
    );

    operator.stop().await?;
    teardown(&client, &ns).await
}
