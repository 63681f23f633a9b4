//! The README's install steps as one chain, every pod a real `herald`
//! process run by the loopback kubelet (`herald_e2e::kubelet`), Services
//! reached through the user-space proxy (`herald_e2e::service_proxy`):
//!
//! `helm install` (the operator as a pod, under the chart's namespaced RBAC,
//! told to hand out ClusterIPs since the test bed has no cluster DNS) →
//! `examples/pushcluster.yaml` with its JWT Secret, on the test bed's Redis
//! and Kafka → Available → `helm test` (a probe pod pushes to itself through
//! the comet and logic Services) → JWT clients connect to the comets logic
//! names on its client Service (no API key; pushes 404 there, the privileged
//! API 401 without the key) → `kubectl scale` to one comet → the drained comet's JWT clients
//! get op 18, reconnect to the other comet, and a push sent during the drain
//! reaches every client → `kubectl delete pushcluster`: the operator drains
//! the last comet, closing every client, before the cluster goes →
//! `helm uninstall`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, ensure};
use bytes::Bytes;
use herald_client::Token;
use herald_e2e::kubelet::{Kubelet, current_cluster, pod_ip};
use herald_e2e::service_proxy::ServiceProxy;
use herald_e2e::{eventually, helm, testbed_var, unique_name};
use herald_operator::crd::PushCluster;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::api::{Api, PostParams};
use kube::{Client as KubeClient, ResourceExt};
use serde_json::{Value, json};

mod common;

use common::goim::{GoimClient, PUSH_OP, follow, warm_up};
use common::k8s::{create_namespace, install_chart, start_kubelet};
use common::operator::{
    comet_replicas, has_condition, kubectl, ready_pods, secret_value, wait_cluster,
};

/// The pods' /24 (chart_operator.rs uses .32, operator_e2e.rs .31).
const POD_NET: u8 = 33;
/// Every wait is bounded by this many seconds.
const WAIT: u64 = 90;
const RELEASE: &str = "herald";
/// The example's name.
const CLUSTER: &str = "chat";
const TCP_PORT: u16 = 3101;
const LOGIC_HTTP: u16 = 3111;
/// Logic's client port (`spec.logic.ports.client` default).
const LOGIC_CLIENT: u16 = 3112;

/// Everything the test started, stopped in order also when it fails.
struct Bed {
    client: KubeClient,
    ops: String,
    chat: String,
    kubelet: Kubelet,
    proxy: ServiceProxy,
    run_dir: PathBuf,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn helm_install_to_helm_test_to_a_drain_with_jwt_clients() -> anyhow::Result<()> {
    common::k8s::log_harness();
    let client = common::k8s::client().await?;
    let ops = create_namespace(&client, "herald-ops", "chart-e2e").await?;
    let chat = create_namespace(&client, "chat", "chart-e2e").await?;
    let api_cluster = current_cluster().map_err(anyhow::Error::msg)?;
    // This run's pod logs, where the probe's report is read from.
    let run_dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("chart_e2e")
        .join(unique_name("run"));
    // Both namespaces' pods run here: the operator's and the cluster's.
    let kubelet = start_kubelet(
        &client,
        "chart_e2e",
        "loopback-chart-e2e",
        POD_NET,
        |config| {
            config.run_dir = run_dir.clone();
            config.namespaces = vec![ops.clone(), chat.clone()];
            config.api_cluster = Some(api_cluster);
            config.shutdown_grace = Duration::from_secs(3);
        },
    )
    .await?;
    let bed = Bed {
        proxy: ServiceProxy::start(client.clone(), vec![chat.clone()]),
        client,
        ops,
        chat,
        kubelet,
        run_dir,
    };
    let result = scenario(&bed).await;
    let uninstalled = helm(&["uninstall", RELEASE, "--namespace", &bed.ops, "--wait"]);
    if result.is_err() {
        eprintln!("pod logs: {}", bed.run_dir.display());
    }
    let Bed {
        client,
        ops,
        chat,
        kubelet,
        proxy,
        run_dir: _,
    } = bed;
    proxy.stop().await;
    kubelet.stop().await;
    for ns in [&ops, &chat] {
        common::operator::delete_namespace(&client, ns).await?;
    }
    result?;
    uninstalled?;
    Ok(())
}

async fn scenario(bed: &Bed) -> anyhow::Result<()> {
    let (client, ops, chat) = (&bed.client, bed.ops.as_str(), bed.chat.as_str());
    let brokers = testbed_var("HERALD_KAFKA_BROKERS");
    let redis_addr = testbed_var("HERALD_REDIS_URL")
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();

    // 1. helm install, as docs/kubernetes.md says, plus what the test bed
    // needs: pod IPs for metrics, ClusterIPs instead of DNS names.
    let test_ns = format!("test.namespace={chat}");
    install_chart(
        RELEASE,
        ops,
        chat,
        &[
            "extraArgs={--service-addresses=cluster-ip}",
            &test_ns,
            "test.pushCluster=chat",
            "test.jwtSecretRef.name=herald-jwt",
            "test.jwtSecretRef.key=secret",
            "test.timeoutSeconds=60",
        ],
    )?;
    let ops_pods: Api<Pod> = Api::namespaced(client.clone(), ops);
    let operator = eventually(WAIT, "the operator pod Ready", || async {
        let ready = ready_pods(&ops_pods, RELEASE, "operator").await?;
        Ok(ready.into_values().next())
    })
    .await?;
    ensure!(
        bed.kubelet
            .pid(ops, &operator.name_any(), "operator")
            .is_some(),
        "no operator process behind {}",
        operator.name_any()
    );

    // 2. The example PushCluster with its JWT Secret, aimed at the test bed
    // (Redis without a password, a Kafka topic of its own), autoscaling off
    // so the test decides when a comet goes, and no nodeList domain (op 18
    // would name it and the test cannot resolve it).
    let jwt_secret = unique_name("jwt");
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "herald-jwt"}, "stringData": {"secret": jwt_secret}
    }))?;
    Api::<Secret>::namespaced(client.clone(), chat)
        .create(&PostParams::default(), &secret)
        .await?;
    let topic = unique_name("chart-e2e");
    common::create_topic(&brokers, &topic, 2).await?;
    let mut example: Value = serde_yaml::from_str(include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/pushcluster.yaml"
    )))?;
    ensure!(
        example["spec"]["auth"]["mode"] == "jwt",
        "the example uses JWT"
    );
    let spec = example["spec"].as_object_mut().context("spec")?;
    spec.insert("redis".to_owned(), json!({"addr": redis_addr}));
    spec.insert(
        "kafka".to_owned(),
        json!({"brokers": brokers.split(',').collect::<Vec<_>>(),
               "topic": topic, "group": format!("{topic}-job")}),
    );
    spec.insert(
        "nodeList".to_owned(),
        json!({"count": 2, "heartbeat": 30, "backoff": 5}),
    );
    let comet = spec["comet"].as_object_mut().context("comet")?;
    comet.insert("replicas".to_owned(), json!(2));
    comet.insert("autoscaling".to_owned(), json!({"enabled": false}));
    comet.insert(
        "drain".to_owned(),
        json!({"deadlineSeconds": 20, "closeRate": 2}),
    );
    comet.insert("serviceType".to_owned(), json!("ClusterIP"));
    spec.insert("logic".to_owned(), json!({"replicas": 1}));
    spec.insert("job".to_owned(), json!({"replicas": 1}));
    let cluster: PushCluster = serde_json::from_value(example)?;
    let clusters: Api<PushCluster> = Api::namespaced(client.clone(), chat);
    clusters.create(&PostParams::default(), &cluster).await?;
    wait_cluster(&clusters, CLUSTER, WAIT, "Available with 2 comets", |c| {
        has_condition(c, "Available", "True")
            && c.status
                .as_ref()
                .is_some_and(|s| s.comet.ready_replicas == 2)
    })
    .await?;

    // 3. helm test: the probe pod, through both Services.
    let tested = helm(&["test", RELEASE, "--namespace", ops, "--timeout", "3m"])?;
    ensure!(tested.contains("Succeeded"), "helm test: {tested}");
    let probe_log = find_log(&bed.run_dir, "probe.log").context("the probe's log")?;
    let said = probe_log
        .lines()
        .find(|l| l.starts_with("herald probe: ok"))
        .with_context(|| format!("probe log: {probe_log}"))?;
    println!("helm test: {said}");

    // 4. JWT clients on the comets logic names, read as a client reads
    // them: through the logic-client Service, without the push API key.
    let services: Api<Service> = Api::namespaced(client.clone(), chat);
    let cluster_ip = |name: String| {
        let services = services.clone();
        async move {
            let ip: Ipv4Addr = services
                .get(&name)
                .await?
                .spec
                .and_then(|s| s.cluster_ip)
                .with_context(|| format!("{name} ClusterIP"))?
                .parse()?;
            anyhow::Ok(ip)
        }
    };
    let logic_http = SocketAddr::from((cluster_ip(format!("{CLUSTER}-logic")).await?, LOGIC_HTTP));
    let logic_client = SocketAddr::from((
        cluster_ip(format!("{CLUSTER}-logic-client")).await?,
        LOGIC_CLIENT,
    ));
    let key = secret_value(client, chat, &format!("{CLUSTER}-api-key"), "api-key").await?;
    let nodes_path = "/goim/nodes/weighted?platform=android";
    let answer = common::logic_call(logic_client, None, "GET", nodes_path, b"").await?;
    // The same read on the privileged API wants the key; the client port
    // serves no push, key or not.
    let refused =
        herald_testkit::http::request_with(logic_http, "GET", nodes_path, &[], b"").await?;
    ensure!(refused.status == 401, "logic without the key: {refused:?}");
    let bearer = format!("Bearer {key}");
    let push = herald_testkit::http::request_with(
        logic_client,
        "POST",
        &format!("/goim/push/all?operation={PUSH_OP}"),
        &[("Authorization", bearer.as_str())],
        b"not through the client port",
    )
    .await?;
    ensure!(push.status == 404, "a push on the client port: {push:?}");
    let named: Vec<String> = serde_json::from_value(answer["data"]["nodes"].clone())?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), chat);
    let comets: BTreeMap<Ipv4Addr, String> = ready_pods(&pods, CLUSTER, "comet")
        .await?
        .into_iter()
        .map(|(name, pod)| Ok((pod_ip(&pod)?, name)))
        .collect::<anyhow::Result<_>>()?;
    let mut by_ip: Vec<Ipv4Addr> = named.iter().map(|n| n.parse()).collect::<Result<_, _>>()?;
    by_ip.sort();
    ensure!(
        by_ip == comets.keys().copied().collect::<Vec<_>>(),
        "logic names {named:?}, the comets are {comets:?}"
    );
    let (drained_ip, kept_ip) = (by_ip[0], by_ip[1]);
    let (drained, kept) = (
        SocketAddr::from((drained_ip, TCP_PORT)),
        SocketAddr::from((kept_ip, TCP_PORT)),
    );
    let token = |mid: u64| -> anyhow::Result<Bytes> {
        let token = Token::new(i64::try_from(mid)?, format!("chart-e2e-{mid}"))
            .room("live://7")
            .platform("android")
            .accepts([PUSH_OP])
            .redirect();
        Ok(herald_bench::probe::sign(&token, &jwt_secret)?.into())
    };
    let broadcast = |body: &'static [u8]| {
        let key = key.clone();
        async move {
            let path = format!("/goim/push/all?operation={PUSH_OP}");
            common::logic_call(logic_http, Some(&key), "POST", &path, body)
                .await
                .map(drop)
        }
    };
    let mut warm = GoimClient::connect(kept, 999, token(999)?).await?.client;
    warm_up(&mut warm, WAIT, || broadcast(b"warm-up")).await?;
    drop(warm);
    // Fewer on the comet to drain: the operator removes the least loaded.
    let mut on_drained = Vec::new();
    for mid in 1000..1004 {
        on_drained.push(GoimClient::connect(drained, mid, token(mid)?).await?);
    }
    let mut on_kept = Vec::new();
    for mid in 2000..2008 {
        on_kept.push(GoimClient::connect(kept, mid, token(mid)?).await?);
    }
    let drained_name = comets[&drained_ip].clone();
    wait_cluster(&clusters, CLUSTER, WAIT, "12 connections seen", |c| {
        c.status.as_ref().is_some_and(|s| {
            s.total_connections == 12
                && s.pods
                    .iter()
                    .any(|p| p.name == drained_name && p.connections == 4)
        })
    })
    .await?;

    // 5. One comet fewer, as a platform team does it.
    let push_body: &'static [u8] = b"sent-during-the-drain";
    let (reconnected_tx, mut reconnected) = tokio::sync::mpsc::unbounded_channel();
    let mut followers = tokio::task::JoinSet::new();
    for c in on_drained {
        followers.spawn(follow(
            c,
            Bytes::from_static(push_body),
            true,
            reconnected_tx.clone(),
        ));
    }
    for c in on_kept {
        followers.spawn(follow(
            c,
            Bytes::from_static(push_body),
            false,
            reconnected_tx.clone(),
        ));
    }
    drop(reconnected_tx);
    kubectl(&[
        "scale",
        "pushcluster",
        CLUSTER,
        "--namespace",
        chat,
        "--replicas=1",
    ])
    .await?;
    tokio::time::timeout(Duration::from_secs(WAIT), reconnected.recv())
        .await
        .context("no JWT client was redirected")?
        .context("followers ended before any redirect")?;
    broadcast(push_body).await?;
    let mut outcomes = Vec::new();
    while let Some(joined) = tokio::time::timeout(Duration::from_secs(WAIT), followers.join_next())
        .await
        .context("a client never got the push")?
    {
        outcomes.push(joined??);
    }
    ensure!(outcomes.len() == 12, "{outcomes:?}");
    let mut moved = 0;
    for outcome in &outcomes {
        if outcome.mid < 2000 {
            ensure!(
                outcome.redirects.len() == 1,
                "client {} of the drained comet: {:?}",
                outcome.mid,
                outcome.redirects
            );
            let redirect = &outcome.redirects[0];
            ensure!(redirect.reason == "drain", "{redirect:?}");
            ensure!(
                redirect.nodes == [kept_ip.to_string()],
                "op 18 must name only the kept comet: {redirect:?}"
            );
            ensure!(
                outcome.client.addr == kept,
                "client {} not moved",
                outcome.mid
            );
            moved += 1;
        } else {
            ensure!(
                outcome.redirects.is_empty(),
                "a client of the kept comet was redirected"
            );
        }
    }
    eventually(WAIT, "the drained comet's pod gone", || async {
        let gone = pods.get_opt(&drained_name).await?.is_none();
        let deployments = Api::namespaced(client.clone(), chat);
        let replicas = comet_replicas(&deployments, CLUSTER).await?;
        Ok((gone && replicas == Some(1)).then_some(()))
    })
    .await?;
    println!(
        "drain with JWT clients: {moved} of 4 moved by op 18 ({moved} reconnects), \
         the push during the drain reached {}/12",
        outcomes.len()
    );

    // 6. Deleting the PushCluster: the operator pod (under the chart's
    // RBAC) drains the last comet while logic still runs, closing every
    // client, then releases its finalizer.
    let started = std::time::Instant::now();
    kubectl(&[
        "delete",
        "pushcluster",
        CLUSTER,
        "--namespace",
        chat,
        "--wait=false",
    ])
    .await?;
    let mut closed = 0;
    for mut outcome in outcomes {
        let client = &mut outcome.client.client;
        client.set_timeout(Some(Duration::from_secs(WAIT)));
        loop {
            match client.next_event().await {
                Ok(_) => {}
                Err(herald_client::Error::Timeout(_)) => {
                    anyhow::bail!("client {} still connected", outcome.mid)
                }
                Err(_) => break,
            }
        }
        closed += 1;
    }
    eventually(WAIT, "the PushCluster gone", || async {
        Ok(clusters.get_opt(CLUSTER).await?.is_none().then_some(()))
    })
    .await?;
    println!(
        "teardown: {closed}/12 clients closed by the drain and the PushCluster gone in {:?}",
        started.elapsed()
    );
    Ok(())
}

/// The content of the first file called `name` below `dir` (a pod's
/// container log, written by the kubelet).
fn find_log(dir: &Path, name: &str) -> Option<String> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_log(&path, name) {
                return Some(found);
            }
        } else if path.file_name().is_some_and(|f| f == name) {
            return std::fs::read_to_string(&path).ok();
        }
    }
    None
}
