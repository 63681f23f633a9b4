//! The operator in this process against the test bed's apiserver, and what
//! its tests read back: PushCluster conditions, the comet Deployment's
//! replicas and pods, the node-list ConfigMap, `kubectl get` columns, the
//! operator's Events. And what stands in for a kubelet: a real comet in this
//! process behind a comet pod ([`PodComet`]), with goim clients.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use herald_e2e::kubelet::pod_ready;
use herald_e2e::{eventually, testbed_var};
use herald_operator::crd::PushCluster;
use herald_operator::{Config, Metrics, ServiceAddresses};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde_json::{Value, json};

use super::k8s;
use super::{Stoppable, Stopped};

/// The Lease every operator of a test runs for, in the namespace it watches.
pub(crate) const LEASE: &str = "herald-operator";

/// `herald_operator::lead` in this process, for one namespace.
pub(crate) struct Operator {
    pub(crate) metrics: Arc<Metrics>,
    task: Stoppable<herald_operator::Error>,
}

impl Operator {
    /// Watches `namespace` as `identity`, its [`LEASE`] (4 s) there,
    /// polling every 500 ms, Services addressed by DNS name.
    pub(crate) fn start(client: &Client, namespace: &str, identity: &str) -> Operator {
        Operator::start_with(client, namespace, identity, |_| {})
    }

    /// As [`Operator::start`], with `configure` changing the settings.
    pub(crate) fn start_with(
        client: &Client,
        namespace: &str,
        identity: &str,
        configure: impl FnOnce(&mut Config),
    ) -> Operator {
        let mut config = Config {
            namespaces: vec![namespace.to_owned()],
            lease_name: LEASE.to_owned(),
            lease_namespace: namespace.to_owned(),
            identity: identity.to_owned(),
            lease_secs: 4,
            poll_interval: Duration::from_millis(500),
            service_addresses: ServiceAddresses::Dns,
            metrics_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        configure(&mut config);
        let metrics = Arc::new(Metrics::default());
        let (client, lead_metrics) = (client.clone(), metrics.clone());
        let task = Stoppable::spawn(|stopped| {
            herald_operator::lead(client, config, lead_metrics, stopped)
        });
        Operator { metrics, task }
    }

    /// Tells it to stop (releasing the Lease), without waiting.
    pub(crate) fn signal(&mut self) {
        self.task.signal();
    }

    /// Tells it to stop and waits (30 s) for a clean end.
    pub(crate) async fn stop(mut self) -> Result<()> {
        self.task
            .stop(Duration::from_secs(30))
            .await
            .context("operator")
    }
}

/// A test's client of the apiserver, the PushCluster CRD installed, and a
/// fresh namespace named after `prefix`.
pub(crate) async fn setup(prefix: &str) -> Result<(Client, String)> {
    let client = k8s::client().await?;
    herald_e2e::install_pushcluster_crd(&client).await?;
    let namespace = k8s::create_namespace(&client, prefix, "operator").await?;
    Ok((client, namespace))
}

/// Deletes `namespace` and everything in it, its PushClusters' finalizers
/// removed first: with the operator stopped, nothing else would remove them,
/// and the namespace would stay `Terminating`.
pub(crate) async fn delete_namespace(client: &Client, namespace: &str) -> Result<()> {
    let clusters = Api::<PushCluster>::namespaced(client.clone(), namespace);
    for cluster in clusters.list(&ListParams::default()).await?.items {
        if !cluster.finalizers().is_empty() {
            let release = json!({"metadata": {"finalizers": null}});
            clusters
                .patch(
                    &cluster.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&release),
                )
                .await?;
        }
    }
    k8s::delete_namespace(client, namespace).await
}

// ------------------------------------------------------------ PushCluster

/// A PushCluster `name` on made-up Redis and Kafka addresses, 2 comets;
/// the members of `extra` replace those of the spec.
pub(crate) fn cluster_json(name: &str, extra: Value) -> Value {
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

/// Creates [`cluster_json`]`(name, extra)` in `namespace`.
pub(crate) async fn create_cluster(
    client: &Client,
    namespace: &str,
    name: &str,
    extra: Value,
) -> kube::Result<PushCluster> {
    let value = cluster_json(name, extra);
    let cluster: PushCluster = serde_json::from_value(value).map_err(kube::Error::SerdeError)?;
    Api::<PushCluster>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &cluster)
        .await
}

/// A condition's status and reason.
pub(crate) fn condition(cluster: &PushCluster, type_: &str) -> Option<(String, String)> {
    cluster
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// Fails unless `cluster` is the controller owner of the object with
/// `meta` (`what` names it).
pub(crate) fn owned_by(meta: &ObjectMeta, cluster: &PushCluster, what: &str) -> Result<()> {
    let owner = meta
        .owner_references
        .as_ref()
        .and_then(|owners| owners.iter().find(|o| o.controller == Some(true)))
        .with_context(|| format!("{what} has no controller owner"))?;
    ensure!(
        owner.kind == "PushCluster" && Some(&owner.uid) == cluster.meta().uid.as_ref(),
        "{what} owner: {owner:?}"
    );
    Ok(())
}

/// Whether a condition has `status`.
pub(crate) fn has_condition(cluster: &PushCluster, type_: &str, status: &str) -> bool {
    condition(cluster, type_).is_some_and(|c| c.0 == status)
}

/// Waits up to `secs` until PushCluster `name` is as `want` says (`what`
/// names that in the timeout error); the cluster as it was then.
pub(crate) async fn wait_cluster(
    clusters: &Api<PushCluster>,
    name: &str,
    secs: u64,
    what: &str,
    want: impl Fn(&PushCluster) -> bool,
) -> Result<PushCluster> {
    eventually(secs, what, || async {
        let cluster = clusters.get(name).await?;
        Ok(want(&cluster).then_some(cluster))
    })
    .await
}

/// Sets `spec.replicas` through `/scale`, as an HPA or `kubectl scale` does.
pub(crate) async fn scale(clusters: &Api<PushCluster>, name: &str, replicas: i32) -> Result<()> {
    clusters
        .patch_scale(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": replicas}})),
        )
        .await?;
    Ok(())
}

/// The test bed's `kubectl` with `args`; its output.
pub(crate) async fn kubectl(args: &[&str]) -> Result<String> {
    let output = tokio::process::Command::new(testbed_var("HERALD_KUBECTL"))
        .args(args)
        .output()
        .await?;
    ensure!(
        output.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// The columns `kubectl get pushclusters` shows (the CRD's printer columns).
pub(crate) const KUBECTL_COLUMNS: [&str; 7] = [
    "NAME",
    "READY",
    "COMETS",
    "UPDATED",
    "CONNECTIONS",
    "DRAINING",
    "AGE",
];

/// `kubectl get pushclusters` as a user runs it: the header and the row of
/// `cluster`.
pub(crate) async fn kubectl_get(
    namespace: &str,
    cluster: &str,
) -> Result<(Vec<String>, Vec<String>)> {
    let text = kubectl(&["get", "pushclusters", "-n", namespace]).await?;
    let mut lines = text.lines();
    let split = |l: &str| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    let header = split(lines.next().unwrap_or_default());
    let row = lines
        .map(split)
        .find(|r| r.first().map(String::as_str) == Some(cluster))
        .with_context(|| format!("no {cluster} row in:\n{text}"))?;
    Ok((header, row))
}

// ------------------------------------------------------------- children

/// The spec of the comet workload of `cluster`: its comet Deployment under
/// `rollout.strategy: Deployment`, else its newest comet ReplicaSet (one per
/// pod-template revision), in a Deployment spec's shape.
pub(crate) async fn comet_spec(
    deployments: &Api<Deployment>,
    cluster: &str,
) -> Result<Option<DeploymentSpec>> {
    if let Some(deployment) = deployments.get_opt(&format!("{cluster}-comet")).await? {
        return Ok(deployment.spec);
    }
    let newest = comet_replica_sets(deployments, cluster)
        .await?
        .into_iter()
        .max_by_key(|rs| rs.metadata.creation_timestamp.clone().map(|t| t.0));
    Ok(newest.and_then(|rs| rs.spec).map(|spec| DeploymentSpec {
        replicas: spec.replicas,
        selector: spec.selector,
        template: spec.template.unwrap_or_default(),
        ..DeploymentSpec::default()
    }))
}

/// The comet ReplicaSets of `cluster` (in the namespace of `deployments`).
pub(crate) async fn comet_replica_sets(
    deployments: &Api<Deployment>,
    cluster: &str,
) -> Result<Vec<ReplicaSet>> {
    let ns = deployments.namespace().unwrap_or("default").to_owned();
    let sets = Api::<ReplicaSet>::namespaced(deployments.clone().into_client(), &ns)
        .list(&ListParams::default().labels(&format!(
            "app.kubernetes.io/instance={cluster},app.kubernetes.io/component=comet,herald.dev/revision"
        )))
        .await?;
    Ok(sets.items)
}

/// The comets the workloads of `cluster` ask for: the comet Deployment's
/// replicas, or the sum over its comet ReplicaSets (one more than the
/// count asked for while a rollout surges).
pub(crate) async fn comet_replicas(
    deployments: &Api<Deployment>,
    cluster: &str,
) -> Result<Option<i32>> {
    if let Some(deployment) = deployments.get_opt(&format!("{cluster}-comet")).await? {
        return Ok(deployment.spec.and_then(|s| s.replicas));
    }
    let sets = comet_replica_sets(deployments, cluster).await?;
    if sets.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        sets.iter()
            .filter_map(|rs| rs.spec.as_ref()?.replicas)
            .sum(),
    ))
}

/// Waits up to `secs` until the comet Deployment of `cluster` asks for
/// `replicas`.
pub(crate) async fn wait_comet_replicas(
    deployments: &Api<Deployment>,
    cluster: &str,
    replicas: i32,
    secs: u64,
) -> Result<()> {
    eventually(secs, &format!("{replicas} comets"), || async {
        Ok((comet_replicas(deployments, cluster).await? == Some(replicas)).then_some(()))
    })
    .await
}

/// The arguments of the first container a Deployment spec runs (of
/// [`comet_spec`], say).
pub(crate) fn container_args(spec: Option<DeploymentSpec>) -> Vec<String> {
    spec.and_then(|s| s.template.spec)
        .map(|s| s.containers[0].args.clone().unwrap_or_default())
        .unwrap_or_default()
}

/// The Ready pods of one component of `cluster` that are not being
/// deleted, by name.
pub(crate) async fn ready_pods(
    pods: &Api<Pod>,
    cluster: &str,
    component: &str,
) -> Result<BTreeMap<String, Pod>> {
    let list = pods
        .list(&ListParams::default().labels(&format!(
            "app.kubernetes.io/instance={cluster},app.kubernetes.io/component={component}"
        )))
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none() && pod_ready(pod))
        .map(|pod| (pod.name_any(), pod))
        .collect())
}

/// Waits up to 60 s for `count` comet pods of `cluster`; their names.
pub(crate) async fn wait_comet_pods(
    pods: &Api<Pod>,
    cluster: &str,
    count: usize,
) -> Result<Vec<String>> {
    let selector =
        format!("app.kubernetes.io/component=comet,app.kubernetes.io/instance={cluster}");
    eventually(60, &format!("{count} comet pods"), || async {
        let list = pods.list(&ListParams::default().labels(&selector)).await?;
        let names: Vec<String> = list.items.iter().map(ResourceExt::name_any).collect();
        Ok((names.len() == count).then_some(names))
    })
    .await
}

/// Marks a pod Running and Ready at `ip`, as a kubelet would.
pub(crate) async fn fake_running(pods: &Api<Pod>, name: &str, ip: &str) -> Result<()> {
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

/// The deletion cost the operator gives a drained comet's pod: the lowest,
/// so the ReplicaSet removes that pod first.
pub(crate) const CHEAPEST: &str = "-2147483648";

/// The pod's `controller.kubernetes.io/pod-deletion-cost`.
pub(crate) fn deletion_cost(pod: &Pod) -> Option<&str> {
    pod.annotations()
        .get("controller.kubernetes.io/pod-deletion-cost")
        .map(String::as_str)
}

/// The node-list document in the ConfigMap `{cluster}-nodes`, once there.
pub(crate) async fn node_list(configmaps: &Api<ConfigMap>, cluster: &str) -> Result<Option<Value>> {
    let Some(cm) = configmaps.get_opt(&format!("{cluster}-nodes")).await? else {
        return Ok(None);
    };
    let data = cm.data.unwrap_or_default();
    let Some(text) = data.get("nodes.json") else {
        return Ok(None);
    };
    Ok(Some(serde_json::from_str(text)?))
}

/// The comets the node list of `cluster` names, with their draining flag
/// (none while there is no list).
pub(crate) async fn node_flags(
    configmaps: &Api<ConfigMap>,
    cluster: &str,
) -> Result<BTreeMap<String, bool>> {
    let list = node_list(configmaps, cluster).await?;
    Ok(list.map(|list| draining(&list)).unwrap_or_default())
}

/// Waits up to `secs` until the [`node_flags`] of `cluster` are as `want`
/// says (`what` names that in the timeout error).
pub(crate) async fn wait_node_flags(
    configmaps: &Api<ConfigMap>,
    cluster: &str,
    secs: u64,
    what: &str,
    want: impl Fn(&BTreeMap<String, bool>) -> bool,
) -> Result<()> {
    eventually(secs, what, || async {
        Ok(want(&node_flags(configmaps, cluster).await?).then_some(()))
    })
    .await
}

/// The comets a node-list document names, with their draining flag.
pub(crate) fn draining(list: &Value) -> BTreeMap<String, bool> {
    list["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            (
                n["name"].as_str().unwrap_or_default().to_owned(),
                n["draining"] == true,
            )
        })
        .collect()
}

/// One value of a Secret, as text.
pub(crate) async fn secret_value(
    client: &Client,
    namespace: &str,
    name: &str,
    key: &str,
) -> Result<String> {
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get(name)
        .await?;
    let Some(value) = secret.data.unwrap_or_default().remove(key) else {
        bail!("Secret {name} has no {key}");
    };
    Ok(String::from_utf8(value.0)?)
}

// ---------------------------------------------------- comets behind pods

/// A real comet in this process, with its own stub logic (which accepts any
/// token), standing in for comet pod `name`: gRPC on `ip:grpc_port`, where
/// the operator polls it; the pod is marked Running and Ready at `ip`.
/// Stopped when dropped.
pub(crate) struct PodComet {
    /// Where goim TCP clients connect.
    pub(crate) tcp: std::net::SocketAddr,
    _logic: herald_testkit::stub::StubLogic,
    _task: Stoppable<herald_comet::Error>,
}

impl PodComet {
    pub(crate) async fn start(
        pods: &Api<Pod>,
        name: &str,
        ip: &str,
        grpc_port: u16,
    ) -> Result<PodComet> {
        use tokio::net::TcpListener;
        let logic = herald_testkit::stub::StubLogic::recording();
        let logic_addr = logic.serve().await?;
        let config = herald_comet::Config::new(name, logic_addr.to_string());
        let listeners = herald_comet::Listeners {
            tcp: TcpListener::bind((ip, 0)).await?,
            ws: TcpListener::bind((ip, 0)).await?,
            wss: None,
            grpc: TcpListener::bind((ip, grpc_port)).await?,
            http: None,
        };
        let tcp = listeners.tcp.local_addr()?;
        let task =
            Stoppable::spawn(|stopped: Stopped| herald_comet::run(config, listeners, stopped));
        fake_running(pods, name, ip).await?;
        Ok(PodComet {
            tcp,
            _logic: logic,
            _task: task,
        })
    }
}

/// A goim TCP client of `addr` as member `mid`, authenticated (the auth
/// reply has arrived).
pub(crate) async fn goim_client(
    addr: std::net::SocketAddr,
    mid: u64,
) -> Result<herald_client::Client> {
    let mut client = herald_client::Client::connect_tcp(addr)
        .await?
        .with_timeout(Duration::from_secs(10));
    let token = herald_client::Token::new(i64::try_from(mid)?, format!("k{mid}"))
        .room("live://1")
        .platform("web")
        .accepts([1000]);
    client.auth(&token).await?;
    Ok(client)
}

/// Waits up to 60 s for `count` pods of `component` of `cluster`; their
/// names.
pub(crate) async fn wait_pods(
    pods: &Api<Pod>,
    cluster: &str,
    component: &str,
    count: usize,
) -> Result<Vec<String>> {
    let selector =
        format!("app.kubernetes.io/component={component},app.kubernetes.io/instance={cluster}");
    eventually(60, &format!("{count} {component} pods"), || async {
        let list = pods.list(&ListParams::default().labels(&selector)).await?;
        let names: Vec<String> = list
            .items
            .iter()
            .filter(|pod| pod.metadata.deletion_timestamp.is_none())
            .map(ResourceExt::name_any)
            .collect();
        Ok((names.len() == count).then_some(names))
    })
    .await
}

// ---------------------------------------------------------------- Events

/// The operator's events.k8s.io Events about PushCluster `cluster`, as
/// `(type, reason, note)`, oldest first.
pub(crate) async fn events_of(
    client: &Client,
    namespace: &str,
    cluster: &str,
) -> Result<Vec<(String, String, String)>> {
    let mut list =
        Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), namespace)
            .list(&ListParams::default())
            .await?
            .items;
    list.retain(|e| {
        e.reporting_controller.as_deref() == Some("herald-operator")
            && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(cluster)
    });
    list.sort_by_key(|e| e.event_time.clone().map(|t| t.0));
    Ok(list
        .into_iter()
        .map(|e| {
            (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
            )
        })
        .collect())
}

// ------------------------------------------------- a cluster of real pods

/// What a scenario with real pods runs on, stopped in order also when it
/// fails: the loopback kubelet (pods as `herald` processes on
/// 127.0.`net`.x, with API access as their ServiceAccount), the Service
/// proxy (ClusterIPs reach pods), and in-process operators with
/// `--service-addresses=cluster-ip` (the test bed has no cluster DNS).
pub(crate) struct PodBed {
    pub(crate) client: Client,
    pub(crate) namespace: String,
    pub(crate) kubelet: herald_e2e::kubelet::Kubelet,
    pub(crate) proxy: herald_e2e::service_proxy::ServiceProxy,
    /// The operator instances, in start order.
    pub(crate) operators: Vec<Operator>,
}

impl PodBed {
    /// Kubelet and proxy for `namespace`; the pods' logs go under the test
    /// binary's `dir`.
    pub(crate) async fn start(
        client: &Client,
        namespace: &str,
        dir: &str,
        net: u8,
    ) -> Result<PodBed> {
        let api_cluster = herald_e2e::kubelet::current_cluster().map_err(anyhow::Error::msg)?;
        let node = format!("loopback-{}", dir.replace('_', "-"));
        let kubelet = k8s::start_kubelet(client, dir, &node, net, |config| {
            config.namespaces = vec![namespace.to_owned()];
            config.api_cluster = Some(api_cluster);
            config.shutdown_grace = Duration::from_secs(3);
        })
        .await?;
        Ok(PodBed {
            client: client.clone(),
            namespace: namespace.to_owned(),
            kubelet,
            proxy: herald_e2e::service_proxy::ServiceProxy::start(
                client.clone(),
                vec![namespace.to_owned()],
            ),
            operators: Vec::new(),
        })
    }

    /// An in-process operator for the namespace, polling every 300 ms.
    pub(crate) fn start_operator(&mut self, identity: &str) {
        let operator = Operator::start_with(&self.client, &self.namespace, identity, |config| {
            config.poll_interval = Duration::from_millis(300);
            config.service_addresses = ServiceAddresses::ClusterIp;
        });
        self.operators.push(operator);
    }

    /// Stops the operators (all told at once, so no follower takes over in
    /// between), the proxy and the kubelet, and deletes the namespace.
    pub(crate) async fn stop(self) -> Result<()> {
        let PodBed {
            client,
            namespace,
            kubelet,
            proxy,
            mut operators,
        } = self;
        for operator in &mut operators {
            operator.signal();
        }
        for operator in operators {
            operator.stop().await?;
        }
        proxy.stop().await;
        kubelet.stop().await;
        delete_namespace(&client, &namespace).await
    }
}
