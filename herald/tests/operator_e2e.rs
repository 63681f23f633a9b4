//! The operator end to end on the test bed's real apiserver, with every pod a
//! real `herald` process: the loopback kubelet (`herald_e2e::kubelet`) runs
//! the comet, logic and job pods on their own 127.0.31.x addresses, the
//! user-space service proxy (`herald_e2e::service_proxy`) makes the logic
//! Service's ClusterIP reach a logic pod, and the operator runs in-process
//! with `--service-addresses=cluster-ip` (the test bed has no cluster DNS).
//!
//! One scenario: the PushCluster comes up Available; goim clients push the
//! load past the target and the operator adds a comet, which joins the node
//! list; clients leave, and after the stabilisation window the operator
//! drains the least-loaded comet: its clients get op 18 and reconnect to the
//! other comet, a broadcast sent during the drain reaches every client, and
//! only then is the drained pod removed.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bytes::{Bytes, BytesMut};
use herald_e2e::kubelet::{Config as KubeletConfig, IpPool, Kubelet, pod_ip, pod_ready};
use herald_e2e::service_proxy::ServiceProxy;
use herald_e2e::{eventually, testbed_var, unique_name};
use herald_operator::crd::PushCluster;
use herald_protocol::frame::Limits;
use herald_protocol::{Frame, op};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The pods' /24 (other harness tests use 127.0.20-29.x).
const POD_NET: u8 = 31;
/// Every wait is bounded by this many seconds.
const WAIT: u64 = 60;
/// The push operation the clients accept.
const PUSH_OP: i32 = 1000;
/// Autoscaling target: connections per comet.
const TARGET: usize = 20;
const TCP_PORT: u16 = 3101;
const LOGIC_HTTP: u16 = 3111;
const CLUSTER: &str = "chat";

// ---------------------------------------------------------------- goim client

/// A goim TCP client that asked for Herald's redirect (op 18).
struct GoimClient {
    mid: u64,
    stream: TcpStream,
    buf: BytesMut,
}

impl GoimClient {
    async fn connect(addr: SocketAddr, mid: u64) -> anyhow::Result<GoimClient> {
        let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
            .await
            .with_context(|| format!("connecting to {addr}"))??;
        let mut client = GoimClient {
            mid,
            stream,
            buf: BytesMut::new(),
        };
        let token = json!({"mid": mid, "key": format!("e2e-{mid}"), "room_id": "live://7",
                           "platform": "android", "accepts": [PUSH_OP],
                           "herald": {"redirect": true}});
        let auth = Frame {
            ver: 1,
            op: op::AUTH,
            seq: 1,
            body: Bytes::from(token.to_string()),
        };
        client.stream.write_all(&auth.to_bytes()).await?;
        let reply = client.next_frame(10).await?;
        ensure!(reply.op == op::AUTH_REPLY, "auth to {addr}: {reply:?}");
        Ok(client)
    }

    async fn next_frame(&mut self, secs: u64) -> anyhow::Result<Frame> {
        loop {
            if let Some(frame) = Frame::decode(&mut self.buf, Limits::OUTBOUND)? {
                return Ok(frame);
            }
            let read = tokio::time::timeout(
                Duration::from_secs(secs),
                self.stream.read_buf(&mut self.buf),
            )
            .await
            .with_context(|| format!("client {} waited too long", self.mid))??;
            ensure!(read > 0, "client {}: connection closed", self.mid);
        }
    }
}

/// What a client saw until it had the push (and, on the drained comet,
/// until it was moved).
struct Outcome {
    mid: u64,
    /// Op-18 bodies received.
    redirects: Vec<Value>,
    /// Where the push arrived: `true` on the comet it started on.
    push_on_first_comet: bool,
    /// The connection it ends on, kept open until the test ends.
    client: GoimClient,
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outcome")
            .field("mid", &self.mid)
            .field("redirects", &self.redirects)
            .field("push_on_first_comet", &self.push_on_first_comet)
            .finish_non_exhaustive()
    }
}

/// Reads until the push arrives and, with `until_redirected`, until an op
/// 18 moved it. On op 18 it connects to the first node the redirect names
/// (as a client SDK does), tells `reconnected`, and goes on reading there.
async fn follow(
    mut client: GoimClient,
    body: Bytes,
    until_redirected: bool,
    reconnected: tokio::sync::mpsc::UnboundedSender<u64>,
) -> anyhow::Result<Outcome> {
    let mut redirects = Vec::new();
    let mut push_on_first_comet = None;
    while push_on_first_comet.is_none() || (until_redirected && redirects.is_empty()) {
        let frame = client.next_frame(WAIT).await?;
        match frame.op {
            // A late warm-up push is not the one awaited.
            PUSH_OP if frame.body == body => {
                push_on_first_comet.get_or_insert(redirects.is_empty());
            }
            op::REDIRECT => {
                let redirect: Value = serde_json::from_slice(&frame.body)?;
                let host = redirect["nodes"][0]
                    .as_str()
                    .with_context(|| format!("op 18 without nodes: {redirect}"))?;
                let port = redirect["tcp_port"]
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .with_context(|| format!("op 18 without tcp_port: {redirect}"))?;
                let ip: Ipv4Addr = host.parse()?;
                ensure!(ip.is_loopback(), "redirected off loopback: {redirect}");
                let mid = client.mid;
                client = GoimClient::connect(SocketAddr::from((ip, port)), mid).await?;
                redirects.push(redirect);
                let _ = reconnected.send(mid);
            }
            _ => {}
        }
    }
    Ok(Outcome {
        mid: client.mid,
        redirects,
        push_on_first_comet: push_on_first_comet.unwrap_or_default(),
        client,
    })
}

// ---------------------------------------------------------------- cluster

/// The loopback kubelet for `namespace`, giving pods API access as their
/// ServiceAccount (logic and job watch the node-list ConfigMap).
async fn start_kubelet(client: &Client, namespace: &str) -> anyhow::Result<Kubelet> {
    let cluster = herald_e2e::kubelet::current_cluster().map_err(anyhow::Error::msg)?;
    let node = unique_name("loopback-e2e");
    let run_dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("operator_e2e")
        .join(&node);
    let mut config = KubeletConfig::new(
        &node,
        PathBuf::from(env!("CARGO_BIN_EXE_herald")),
        run_dir,
        IpPool::slash24(POD_NET),
    );
    config.namespaces = vec![namespace.to_owned()];
    config.api_cluster = Some(cluster);
    config.shutdown_grace = Duration::from_secs(3);
    Ok(Kubelet::start(client.clone(), config).await?)
}

/// The arguments the operator gave the comet container.
async fn comet_args(deployments: &Api<Deployment>) -> anyhow::Result<Vec<String>> {
    Ok(deployments
        .get(&format!("{CLUSTER}-comet"))
        .await?
        .spec
        .and_then(|s| s.template.spec)
        .map(|s| s.containers[0].args.clone().unwrap_or_default())
        .unwrap_or_default())
}

fn ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none() && pod_ready(pod)
}

/// Ready pods of one component, by name.
async fn ready_pods(pods: &Api<Pod>, component: &str) -> anyhow::Result<BTreeMap<String, Pod>> {
    let list = pods
        .list(&ListParams::default().labels(&format!(
            "app.kubernetes.io/instance={CLUSTER},app.kubernetes.io/component={component}"
        )))
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter(ready)
        .map(|p| (p.name_any(), p))
        .collect())
}

/// The comet names in the node-list ConfigMap, with their draining flag.
async fn node_list(configmaps: &Api<ConfigMap>) -> anyhow::Result<BTreeMap<String, bool>> {
    let Some(cm) = configmaps.get_opt(&format!("{CLUSTER}-nodes")).await? else {
        return Ok(BTreeMap::new());
    };
    let data = cm.data.unwrap_or_default();
    let Some(text) = data.get("nodes.json") else {
        return Ok(BTreeMap::new());
    };
    let list: Value = serde_json::from_str(text)?;
    Ok(list["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            (
                n["name"].as_str().unwrap_or_default().to_owned(),
                n["draining"] == true,
            )
        })
        .collect())
}

/// POSTs to logic's HTTP API (with the API key) and checks `"code":0`.
async fn logic_post(addr: SocketAddr, key: &str, path: &str, body: &[u8]) -> anyhow::Result<()> {
    logic_call(addr, key, "POST", path, body).await.map(drop)
}

/// One request to logic's HTTP API through the Service proxy; the JSON
/// answer of a 200 with `code` 0, else an error naming the answer.
async fn logic_call(
    addr: SocketAddr,
    key: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> anyhow::Result<serde_json::Value> {
    let mut stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .context("connecting to logic")??;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: logic\r\nAuthorization: Bearer {key}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .context("logic answer took too long")??;
    let response = String::from_utf8_lossy(&response);
    ensure!(
        response.starts_with("HTTP/1.1 200") && response.contains("\"code\":0"),
        "{method} {path}: {response}"
    );
    let json = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Ok(serde_json::from_str(json)?)
}

/// `kubectl get pushclusters` as a user runs it: header and our row.
fn kubectl_get(namespace: &str) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let output = std::process::Command::new(testbed_var("HERALD_KUBECTL"))
        .args(["get", "pushclusters", "-n", namespace])
        .output()?;
    ensure!(
        output.status.success(),
        "kubectl: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout)?;
    let mut lines = text.lines();
    let split = |l: &str| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    let header = split(lines.next().unwrap_or_default());
    let row = lines
        .map(split)
        .find(|r| r.first().map(String::as_str) == Some(CLUSTER))
        .with_context(|| format!("no {CLUSTER} row in:\n{text}"))?;
    Ok((header, row))
}

/// Everything the scenario started, stopped in order also when it fails.
struct Bed {
    client: Client,
    namespace: String,
    kubelet: Option<Kubelet>,
    proxy: Option<ServiceProxy>,
    /// Stop signal and task of each operator instance.
    operators: Vec<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<herald_operator::Result<()>>,
    )>,
    /// Their metrics, in start order.
    metrics: Vec<Arc<herald_operator::Metrics>>,
}

impl Bed {
    /// An in-process operator (`--service-addresses=cluster-ip`) for `ns`.
    fn start_operator(&mut self, identity: &str) {
        let metrics = Arc::new(herald_operator::Metrics::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(herald_operator::lead(
            self.client.clone(),
            herald_operator::Config {
                namespaces: vec![self.namespace.clone()],
                lease_name: "herald-operator".to_owned(),
                lease_namespace: self.namespace.clone(),
                identity: identity.to_owned(),
                lease_secs: 4,
                poll_interval: Duration::from_millis(300),
                service_addresses: herald_operator::ServiceAddresses::ClusterIp,
                metrics_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            },
            metrics.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        self.operators.push((stop, task));
        self.metrics.push(metrics);
    }
}

impl Bed {
    async fn stop(mut self) -> anyhow::Result<()> {
        // All are told at once, so no follower takes over in between.
        let (stops, tasks): (Vec<_>, Vec<_>) = self.operators.drain(..).unzip();
        for stop in stops {
            let _ = stop.send(());
        }
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(30), task).await???;
        }
        if let Some(proxy) = self.proxy.take() {
            proxy.stop().await;
        }
        if let Some(kubelet) = self.kubelet.take() {
            kubelet.stop().await;
        }
        Api::<Namespace>::all(self.client.clone())
            .delete(&self.namespace, &DeleteParams::default())
            .await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_runs_a_push_cluster_of_real_pods_and_drains_without_loss() -> anyhow::Result<()> {
    // The harness's, the proxy's and the operator's logs, shown on failure.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,herald_e2e=info".into()),
        )
        .with_test_writer()
        .try_init();
    testbed_var("KUBECONFIG");
    let redis_url = testbed_var("HERALD_REDIS_URL");
    let redis_addr = redis_url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let brokers = testbed_var("HERALD_KAFKA_BROKERS");
    let client = Client::try_default().await?;
    herald_e2e::install_pushcluster_crd(&client).await?;
    let ns = unique_name("op-e2e");
    let namespace: Namespace = serde_json::from_value(
        json!({"metadata": {"name": ns, "labels": {"herald.dev/e2e": "operator"}}}),
    )?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await?;

    // 1. Harness, proxy and operator, all aimed at the fresh namespace.
    let mut bed = Bed {
        client: client.clone(),
        namespace: ns.clone(),
        kubelet: Some(start_kubelet(&client, &ns).await?),
        proxy: Some(ServiceProxy::start(client.clone(), vec![ns.clone()])),
        operators: Vec::new(),
        metrics: Vec::new(),
    };
    bed.start_operator("op-e2e-1");
    eventually(30, "the first operator leads", || async {
        Ok(bed.metrics[0].is_leader().then_some(()))
    })
    .await?;
    // A second instance on the same Lease must stay passive throughout.
    bed.start_operator("op-e2e-2");
    let result = scenario(&client, &ns, &redis_addr, &brokers, &bed).await;
    if result.is_err() {
        // Leave the pods' logs where the failure message can point at them.
        eprintln!(
            "pod logs: {}",
            Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join("operator_e2e")
                .display()
        );
    }
    bed.stop().await?;
    result
}

async fn scenario(
    client: &Client,
    ns: &str,
    redis_addr: &str,
    brokers: &str,
    bed: &Bed,
) -> anyhow::Result<()> {
    let clusters = Api::<PushCluster>::namespaced(client.clone(), ns);
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let deployments = Api::<Deployment>::namespaced(client.clone(), ns);
    let services = Api::<Service>::namespaced(client.clone(), ns);
    let configmaps = Api::<ConfigMap>::namespaced(client.clone(), ns);

    // 2. A PushCluster on the test bed's Redis and Kafka (a topic of its own,
    // provisioned first as in production: logic is Ready only once it exists).
    let topic = unique_name("op-e2e");
    create_topic(brokers, &topic).await?;
    let cluster: PushCluster = serde_json::from_value(json!({
        "apiVersion": "herald.dev/v1alpha1", "kind": "PushCluster",
        "metadata": {"name": CLUSTER},
        "spec": {
            "image": "herald:dev",
            "redis": {"addr": redis_addr},
            "kafka": {"brokers": brokers.split(',').collect::<Vec<_>>(),
                      "topic": topic, "group": format!("{topic}-job")},
            "comet": {
                "replicas": 1,
                "autoscaling": {"enabled": true, "minReplicas": 1, "maxReplicas": 3,
                                "targetConnectionsPerReplica": TARGET,
                                "scaleDownStabilizationSeconds": 3},
                "drain": {"deadlineSeconds": 10, "closeRate": 1},
            },
            // What logic hands clients; count 1 shows it is not goim's 5. The
            // domain comes last (step 6): op 18 would name it, and the test's
            // clients cannot resolve it.
            "nodeList": {"count": 1, "heartbeat": 30, "backoff": 7},
        }
    }))?;
    clusters.create(&PostParams::default(), &cluster).await?;

    // 3. Every component Running and Ready as a real process; Available.
    let (comets, logic_pod) = eventually(WAIT, "comet, logic and job pods Ready", || async {
        let comets = ready_pods(&pods, "comet").await?;
        let logic = ready_pods(&pods, "logic").await?;
        let job = ready_pods(&pods, "job").await?;
        let done = comets.len() == 1 && logic.len() == 1 && job.len() == 1;
        Ok(done.then(|| (comets, logic.into_values().next())))
    })
    .await?;
    let kubelet = bed.kubelet.as_ref().context("kubelet")?;
    for pod in comets.values().chain(logic_pod.iter()) {
        let ip = pod_ip(pod)?;
        ensure!(
            ip.octets()[..3] == [127, 0, POD_NET],
            "pod IP {ip} is not the harness's"
        );
        let container = pod.labels()["app.kubernetes.io/component"].clone();
        ensure!(
            kubelet.pid(ns, &pod.name_any(), &container).is_some(),
            "no process behind {}",
            pod.name_any()
        );
    }
    eventually(WAIT, "Available True", || async {
        let status = clusters.get(CLUSTER).await?.status.unwrap_or_default();
        Ok(status
            .conditions
            .iter()
            .any(|c| c.type_ == "Available" && c.status == "True")
            .then_some(()))
    })
    .await?;
    let owner_uid = clusters.get(CLUSTER).await?.uid().context("uid")?;
    for component in ["comet", "logic", "job"] {
        let deployment = deployments.get(&format!("{CLUSTER}-{component}")).await?;
        let owner = &deployment.owner_references()[0];
        ensure!(
            owner.kind == "PushCluster" && owner.uid == owner_uid && owner.controller == Some(true),
            "{component} owner: {owner:?}"
        );
    }
    for name in ["comet", "comet-grpc", "logic"] {
        let service = services.get(&format!("{CLUSTER}-{name}")).await?;
        ensure!(service.owner_references()[0].uid == owner_uid);
    }
    // The comet was told logic's ClusterIP, which only the proxy serves.
    let logic_ip = services
        .get(&format!("{CLUSTER}-logic"))
        .await?
        .spec
        .and_then(|s| s.cluster_ip)
        .context("logic ClusterIP")?;
    let args = comet_args(&deployments).await?;
    ensure!(
        args.contains(&format!("--logic-addr={logic_ip}:3119")),
        "{args:?}"
    );
    let proxy = bed.proxy.as_ref().context("proxy")?;
    ensure!(proxy.forwarded() > 0, "the comet never reached logic");
    let (header, row) = kubectl_get(ns)?;
    ensure!(
        header[..5] == ["NAME", "READY", "COMETS", "CONNECTIONS", "DRAINING"],
        "{header:?}"
    );
    ensure!(row[1..5] == ["True", "1/1", "0", "0"], "{row:?}");

    // The push path works before anything moves: logic (through the
    // proxy) -> Kafka -> job (node list from the ConfigMap) -> comet. Sent
    // until one arrives, as job may join the new topic after the first.
    let key = secret_value(client, ns, &format!("{CLUSTER}-api-key"), "api-key").await?;
    let logic_http = SocketAddr::from((logic_ip.parse::<Ipv4Addr>()?, LOGIC_HTTP));
    let (first_name, first_pod) = comets.iter().next().context("comet")?;
    let first_name = first_name.clone();
    let first = SocketAddr::from((pod_ip(first_pod)?, TCP_PORT));
    let mut warm = GoimClient::connect(first, 999).await?;
    let warm_deadline = tokio::time::Instant::now() + Duration::from_secs(WAIT);
    'warm: loop {
        logic_post(
            logic_http,
            &key,
            &format!("/goim/push/all?operation={PUSH_OP}"),
            b"warm-up",
        )
        .await?;
        let round = tokio::time::Instant::now() + Duration::from_secs(2);
        while tokio::time::Instant::now() < round {
            match warm.next_frame(1).await {
                Ok(frame) if frame.op == PUSH_OP => break 'warm,
                Ok(_) => {}
                Err(err) if err.to_string().contains("waited too long") => {}
                Err(err) => return Err(err),
            }
        }
        ensure!(
            tokio::time::Instant::now() < warm_deadline,
            "no push ever reached a client"
        );
    }
    drop(warm);

    // 4a. Load past the target: the operator adds a comet, which joins the
    // node list.
    let mut on_first = Vec::new();
    for mid in 0..TARGET as u64 + 5 {
        on_first.push(GoimClient::connect(first, 1000 + mid).await?);
    }
    let (second_name, comets) = eventually(WAIT, "a second comet Ready", || async {
        let comets = ready_pods(&pods, "comet").await?;
        let second = comets.keys().find(|n| **n != first_name).cloned();
        Ok(second.map(|name| (name, comets)))
    })
    .await?;
    let replicas = clusters.get(CLUSTER).await?.spec.comet.replicas;
    ensure!(replicas == 2, "spec.comet.replicas {replicas}");
    eventually(WAIT, "both comets in the node list", || async {
        let list = node_list(&configmaps).await?;
        Ok(
            (list.get(&first_name) == Some(&false) && list.get(&second_name) == Some(&false))
                .then_some(()),
        )
    })
    .await?;
    let second = SocketAddr::from((pod_ip(&comets[&second_name])?, TCP_PORT));

    // spec.nodeList reached logic: PushCluster -> config ConfigMap -> logic's
    // flags -> /goim/nodes/weighted (through the logic Service, as a client).
    let nodes = |platform: &'static str| {
        let key = key.clone();
        async move {
            let path = format!("/goim/nodes/weighted?platform={platform}");
            logic_call(logic_http, &key, "GET", &path, b"").await
        }
    };
    let native = nodes("android").await?;
    ensure!(native["data"]["heartbeat"] == 30, "{native}");
    ensure!(native["data"]["backoff"]["base_delay"] == 7, "{native}");
    let picked = native["data"]["nodes"].as_array().context("nodes")?;
    ensure!(picked.len() == 1, "count 1 with two comets up: {native}");

    // 4b. Clients leave until one comet is enough; the first keeps fewer
    // clients than the second, so it is the one drained.
    let mut on_second = Vec::new();
    for mid in 0..8 {
        on_second.push(GoimClient::connect(second, 2000 + mid).await?);
    }
    on_first.truncate(6);
    let push_body = Bytes::from_static(b"sent-during-the-drain");
    let (reconnected_tx, mut reconnected) = tokio::sync::mpsc::unbounded_channel();
    let mut followers = tokio::task::JoinSet::new();
    for c in on_first {
        followers.spawn(follow(c, push_body.clone(), true, reconnected_tx.clone()));
    }
    for c in on_second {
        followers.spawn(follow(c, push_body.clone(), false, reconnected_tx.clone()));
    }
    drop(reconnected_tx);

    // The first redirected client is back (on the other comet) while the
    // drained comet still holds the rest (closed at 1/s over ~5 s): push now.
    let first_back = tokio::time::timeout(Duration::from_secs(WAIT), reconnected.recv())
        .await
        .context("no client was redirected")?
        .context("followers ended before any redirect")?;
    // Through the logic Service's ClusterIP: the proxy forwards to the pod.
    logic_post(
        logic_http,
        &key,
        &format!("/goim/push/all?operation={PUSH_OP}"),
        &push_body,
    )
    .await?;

    // The node list marks it on the operator's next pass (job keeps pushing
    // to it; logic stops handing it out).
    eventually(10, "the drained comet marked in the node list", || async {
        let list = node_list(&configmaps).await?;
        Ok(
            (list.get(&first_name) == Some(&true) && list.get(&second_name) == Some(&false))
                .then_some(()),
        )
    })
    .await?;

    let mut outcomes = Vec::new();
    while let Some(joined) = tokio::time::timeout(Duration::from_secs(WAIT), followers.join_next())
        .await
        .context("a client never got the push")?
    {
        outcomes.push(joined??);
    }
    outcomes.sort_by_key(|o| o.mid);
    ensure!(outcomes.len() == 14, "{outcomes:?}");
    let first_ip = first.ip().to_string();
    for outcome in &outcomes {
        for redirect in &outcome.redirects {
            ensure!(
                outcome.mid < 2000,
                "a client of the kept comet was redirected"
            );
            ensure!(redirect["reason"] == "drain", "{redirect}");
            ensure!(
                redirect["nodes"] == json!([second.ip().to_string()]),
                "op 18 must name only the other comet (not {first_ip}): {redirect}"
            );
        }
    }
    let moved = outcomes.iter().filter(|o| o.redirects.len() == 1).count();
    ensure!(
        moved == 6,
        "every client of the drained comet gets one op 18: {outcomes:?}"
    );
    let via_drained = outcomes
        .iter()
        .filter(|o| o.mid < 2000 && o.push_on_first_comet)
        .count();
    let redirected_before = outcomes
        .iter()
        .filter(|o| o.mid == first_back)
        .all(|o| !o.push_on_first_comet);
    ensure!(
        redirected_before,
        "client {first_back} reconnected before the push, so got it on the new comet"
    );
    ensure!(
        via_drained > 0,
        "no client still on the draining comet got the push: {outcomes:?}"
    );
    println!(
        "push during drain: {} clients, {via_drained} reached on the draining comet, {} after op 18",
        outcomes.len(),
        outcomes.iter().filter(|o| !o.redirects.is_empty()).count()
    );

    // 4c. The drained comet is removed only once empty; the other stays.
    eventually(WAIT, "the drained comet's pod gone", || async {
        let gone = pods.get_opt(&first_name).await?.is_none();
        let replicas = deployments
            .get(&format!("{CLUSTER}-comet"))
            .await?
            .spec
            .and_then(|s| s.replicas);
        Ok((gone && replicas == Some(1)).then_some(()))
    })
    .await?;
    ensure!(ready_pods(&pods, "comet").await?.contains_key(&second_name));
    // Every client is now on the kept comet, as the operator sees it.
    eventually(WAIT, "14 connections on the kept comet", || async {
        let status = clusters.get(CLUSTER).await?.status.unwrap_or_default();
        let kept = status
            .pods
            .iter()
            .find(|p| p.name == second_name)
            .map(|p| p.connections);
        Ok((kept == Some(14) && status.total_connections == 14).then_some(()))
    })
    .await?;
    for outcome in &outcomes {
        ensure!(
            outcome.client.stream.peer_addr()? == second,
            "client {} is not on the kept comet",
            outcome.mid
        );
    }
    eventually(WAIT, "node list without the drained comet", || async {
        let list = node_list(&configmaps).await?;
        Ok((!list.contains_key(&first_name) && list.contains_key(&second_name)).then_some(()))
    })
    .await?;

    ensure!(
        bed.metrics[0].is_leader() && !bed.metrics[1].is_leader(),
        "leadership moved"
    );
    ensure!(
        bed.metrics[1].reconciles() == 0,
        "the passive operator reconciled"
    );

    // 5. A deleted child Service is recreated (and proxied again).
    services
        .delete(&format!("{CLUSTER}-logic"), &DeleteParams::default())
        .await?;
    let recreated = eventually(WAIT, "logic Service recreated", || async {
        let service = services.get_opt(&format!("{CLUSTER}-logic")).await?;
        Ok(service.and_then(|s| s.spec?.cluster_ip))
    })
    .await?;
    if recreated != logic_ip {
        // A new ClusterIP: the comet pods are rolled onto it.
        eventually(WAIT, "comet args follow the new ClusterIP", || async {
            Ok(comet_args(&deployments)
                .await?
                .contains(&format!("--logic-addr={recreated}:3119"))
                .then_some(()))
        })
        .await?;
    }
    // The proxy follows the recreated Service: logic answers on its address.
    let recreated_http = SocketAddr::from((recreated.parse::<Ipv4Addr>()?, LOGIC_HTTP));
    eventually(WAIT, "logic through the recreated Service", || async {
        let answered = logic_post(
            recreated_http,
            &key,
            &format!("/goim/push/all?operation={PUSH_OP}"),
            b"after-recreate",
        )
        .await;
        Ok(answered.ok())
    })
    .await?;

    // 6. A domain set on the running cluster reaches logic's answer once the
    // pods roll onto the new settings.
    clusters
        .patch(
            CLUSTER,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"nodeList": {"domain": "push.example.test"}}})),
        )
        .await?;
    let web = eventually(WAIT, "the domain in logic's node answer", || async {
        let path = "/goim/nodes/weighted?platform=web";
        let answer = logic_call(recreated_http, &key, "GET", path, b"").await;
        Ok(answer
            .ok()
            .filter(|web| web["data"]["domain"] == "push.example.test"))
    })
    .await?;
    ensure!(
        web["data"]["nodes"] == json!(["push.example.test"]),
        "{web}"
    );
    ensure!(web["data"]["heartbeat"] == 30, "{web}");
    Ok(())
}

async fn create_topic(brokers: &str, topic: &str) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, 2, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    for result in results {
        result.map_err(|(name, code)| anyhow::anyhow!("create topic {name}: {code}"))?;
    }
    Ok(())
}

async fn secret_value(client: &Client, ns: &str, name: &str, key: &str) -> anyhow::Result<String> {
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(name)
        .await?;
    let Some(value) = secret.data.unwrap_or_default().remove(key) else {
        bail!("Secret {name} has no {key}");
    };
    Ok(String::from_utf8(value.0)?)
}
