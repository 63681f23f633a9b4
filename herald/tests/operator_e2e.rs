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
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, ensure};
use bytes::Bytes;
use herald_e2e::kubelet::pod_ip;
use herald_e2e::{eventually, testbed_var, unique_name};
use herald_operator::crd::PushCluster;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client as KubeClient, ResourceExt};
use serde_json::json;

mod common;

use common::goim::{GoimClient, PUSH_OP, follow, json_token, warm_up};
use common::operator::{
    PodBed, comet_replica_sets, comet_replicas, comet_spec, container_args, has_condition,
    kubectl_get, owned_by, ready_pods, secret_value, setup, wait_cluster, wait_node_flags,
};

/// The pods' /24 (other harness tests use 127.0.20-29.x).
const POD_NET: u8 = 31;
/// Every wait is bounded by this many seconds.
const WAIT: u64 = 60;
/// Autoscaling target: connections per comet.
const TARGET: usize = 20;
const TCP_PORT: u16 = 3101;
const LOGIC_HTTP: u16 = 3111;
/// The comet pods' `/metrics` port (the spec's default `ports.admin`).
const COMET_ADMIN: u16 = 3190;
const CLUSTER: &str = "chat";

// ---------------------------------------------------------------- cluster

/// A broadcast of `body` (op [`PUSH_OP`]) through logic's HTTP API.
async fn broadcast(addr: SocketAddr, key: &str, body: &[u8]) -> anyhow::Result<()> {
    let path = format!("/goim/push/all?operation={PUSH_OP}");
    common::logic_call(addr, Some(key), "POST", &path, body)
        .await
        .map(drop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_runs_a_push_cluster_of_real_pods_and_drains_without_loss() -> anyhow::Result<()> {
    // The harness's, the proxy's and the operator's logs, shown on failure.
    common::k8s::log_harness();
    let redis_url = testbed_var("HERALD_REDIS_URL");
    let redis_addr = redis_url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let brokers = testbed_var("HERALD_KAFKA_BROKERS");
    let (client, ns) = setup("op-e2e").await?;

    // 1. Harness, proxy and operator, all aimed at the fresh namespace. The
    // kubelet gives pods API access as their ServiceAccount (logic and job
    // watch the node-list ConfigMap).
    let mut bed = PodBed::start(&client, &ns, "operator_e2e", POD_NET).await?;
    bed.start_operator("op-e2e-1");
    eventually(30, "the first operator leads", || async {
        Ok(bed.operators[0].metrics.is_leader().then_some(()))
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
    client: &KubeClient,
    ns: &str,
    redis_addr: &str,
    brokers: &str,
    bed: &PodBed,
) -> anyhow::Result<()> {
    let clusters = Api::<PushCluster>::namespaced(client.clone(), ns);
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let deployments = Api::<Deployment>::namespaced(client.clone(), ns);
    let services = Api::<Service>::namespaced(client.clone(), ns);
    let configmaps = Api::<ConfigMap>::namespaced(client.clone(), ns);

    // 2. A PushCluster on the test bed's Redis and Kafka (a topic of its own,
    // provisioned first as in production: logic is Ready only once it exists).
    let topic = unique_name("op-e2e");
    common::create_topic(brokers, &topic, 2).await?;
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
                // WSS with a certificate that is renewed below.
                "tls": {"secretName": "chat-tls"},
            },
            // What logic hands clients; count 1 shows it is not goim's 5. The
            // domain comes last (step 6): op 18 would name it, and the test's
            // clients cannot resolve it.
            "nodeList": {"count": 1, "heartbeat": 30, "backoff": 7},
        }
    }))?;
    // The comets' certificate, as cert-manager would write it.
    let cert_a = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let cert_b = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let tls_secret = |cert: &rcgen::CertifiedKey<rcgen::KeyPair>| -> anyhow::Result<Secret> {
        Ok(serde_json::from_value(json!({
            "metadata": {"name": "chat-tls"}, "type": "kubernetes.io/tls",
            "stringData": {"tls.crt": cert.cert.pem(), "tls.key": cert.signing_key.serialize_pem()}
        }))?)
    };
    let secrets = Api::<Secret>::namespaced(client.clone(), ns);
    secrets
        .create(&PostParams::default(), &tls_secret(&cert_a)?)
        .await?;
    clusters.create(&PostParams::default(), &cluster).await?;

    // 3. Every component Running and Ready as a real process; Available.
    let (comets, logic_pod) = eventually(WAIT, "comet, logic and job pods Ready", || async {
        let comets = ready_pods(&pods, CLUSTER, "comet").await?;
        let logic = ready_pods(&pods, CLUSTER, "logic").await?;
        let job = ready_pods(&pods, CLUSTER, "job").await?;
        let done = comets.len() == 1 && logic.len() == 1 && job.len() == 1;
        Ok(done.then(|| (comets, logic.into_values().next())))
    })
    .await?;
    let kubelet = &bed.kubelet;
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
    wait_cluster(&clusters, CLUSTER, WAIT, "Available True", |cluster| {
        has_condition(cluster, "Available", "True")
    })
    .await?;
    let cluster = clusters.get(CLUSTER).await?;
    for component in ["logic", "job"] {
        let deployment = deployments.get(&format!("{CLUSTER}-{component}")).await?;
        owned_by(&deployment.metadata, &cluster, component)?;
    }
    for set in comet_replica_sets(&deployments, CLUSTER).await? {
        owned_by(&set.metadata, &cluster, "comet ReplicaSet")?;
    }
    for name in ["comet", "comet-grpc", "logic"] {
        let service = services.get(&format!("{CLUSTER}-{name}")).await?;
        owned_by(&service.metadata, &cluster, name)?;
    }
    // The comet was told logic's ClusterIP, which only the proxy serves.
    let logic_ip = services
        .get(&format!("{CLUSTER}-logic"))
        .await?
        .spec
        .and_then(|s| s.cluster_ip)
        .context("logic ClusterIP")?;
    let args = container_args(comet_spec(&deployments, CLUSTER).await?);
    ensure!(
        args.contains(&format!("--logic-addr={logic_ip}:3119")),
        "{args:?}"
    );
    let proxy = &bed.proxy;
    ensure!(proxy.forwarded() > 0, "the comet never reached logic");
    let (header, row) = kubectl_get(ns, CLUSTER).await?;
    ensure!(
        header[..6] == common::operator::KUBECTL_COLUMNS[..6],
        "{header:?}"
    );
    ensure!(row[1..6] == ["True", "1/1", "1/1", "0", "0"], "{row:?}");

    // The push path works before anything moves: logic (through the
    // proxy) -> Kafka -> job (node list from the ConfigMap) -> comet. Sent
    // until one arrives, as job may join the new topic after the first.
    let key = secret_value(client, ns, &format!("{CLUSTER}-api-key"), "api-key").await?;
    let logic_http = SocketAddr::from((logic_ip.parse::<Ipv4Addr>()?, LOGIC_HTTP));
    let (first_name, first_pod) = comets.iter().next().context("comet")?;
    // WSS from the Secret: served, advertised, and renewed in place (the
    // kubelet swaps the files, the comet reloads them; same process).
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_a.cert.der().clone())?;
    roots.add(cert_b.cert.der().clone())?;
    let wss = (pod_ip(first_pod)?, 3103);
    let served = common::k8s::served_certificate(wss, &roots).await?;
    ensure!(
        served == cert_a.cert.der().to_vec(),
        "WSS does not serve the Secret's certificate"
    );
    let listed = common::operator::node_list(&configmaps, CLUSTER)
        .await?
        .context("node list")?;
    ensure!(listed["nodes"][0]["wss_port"] == 3103, "{listed}");
    let pid = bed.kubelet.pid(ns, first_name, "comet");
    let renewed = tls_secret(&cert_b)?;
    secrets
        .patch(
            "chat-tls",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": renewed.data, "stringData": renewed.string_data})),
        )
        .await?;
    eventually(WAIT, "the renewed certificate served", || async {
        let served = common::k8s::served_certificate(wss, &roots).await.ok();
        Ok((served == Some(cert_b.cert.der().to_vec())).then_some(()))
    })
    .await?;
    ensure!(
        bed.kubelet.pid(ns, first_name, "comet") == pid,
        "the comet restarted for a renewed certificate"
    );
    // The comet's gRPC port is the cluster's own: a call without the
    // generated token is refused, one with it answers (the operator polls
    // with it; job pushes with it, below).
    let grpc = format!("{}:3109", pod_ip(first_pod)?);
    let wait = Duration::from_secs(5);
    let off = herald_runtime::grpc_auth::Token::off();
    match herald_operator::load::load(&grpc, wait, &off).await {
        Err(herald_operator::load::Error::Call { status, .. })
            if herald_runtime::grpc_auth::is_refusal(&status) => {}
        other => anyhow::bail!("a call without the token was not refused: {other:?}"),
    }
    let token = secret_value(client, ns, &format!("{CLUSTER}-grpc-token"), "token").await?;
    let token = herald_runtime::grpc_auth::TokenSource::literal(token).start()?;
    herald_operator::load::load(&grpc, wait, &token).await?;
    let first_name = first_name.clone();
    let first = SocketAddr::from((pod_ip(first_pod)?, TCP_PORT));
    let mut warm = GoimClient::connect(first, 999, json_token(999))
        .await?
        .client;
    warm_up(&mut warm, WAIT, || broadcast(logic_http, &key, b"warm-up")).await?;
    drop(warm);

    // 4a. Load past the target: the operator adds a comet, which joins the
    // node list.
    let mut on_first = Vec::new();
    for mid in 0..TARGET as u64 + 5 {
        on_first.push(GoimClient::connect(first, 1000 + mid, json_token(1000 + mid)).await?);
    }
    let (second_name, comets) = eventually(WAIT, "a second comet Ready", || async {
        let comets = ready_pods(&pods, CLUSTER, "comet").await?;
        let second = comets.keys().find(|n| **n != first_name).cloned();
        Ok(second.map(|name| (name, comets)))
    })
    .await?;
    let replicas = clusters.get(CLUSTER).await?.spec.comet.replicas;
    ensure!(replicas == 2, "spec.comet.replicas {replicas}");
    let flags = |first: bool| {
        let (first_name, second_name) = (&first_name, &second_name);
        move |list: &BTreeMap<String, bool>| {
            list.get(first_name) == Some(&first) && list.get(second_name) == Some(&false)
        }
    };
    let what = "both comets in the node list";
    wait_node_flags(&configmaps, CLUSTER, WAIT, what, flags(false)).await?;
    let second = SocketAddr::from((pod_ip(&comets[&second_name])?, TCP_PORT));

    // spec.nodeList reached logic: PushCluster -> config ConfigMap -> logic's
    // flags -> /goim/nodes/weighted (through the logic Service, as a client).
    let nodes = |platform: &'static str| {
        let key = key.clone();
        async move {
            let path = format!("/goim/nodes/weighted?platform={platform}");
            common::logic_call(logic_http, Some(&key), "GET", &path, b"").await
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
        on_second.push(GoimClient::connect(second, 2000 + mid, json_token(2000 + mid)).await?);
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
    broadcast(logic_http, &key, &push_body).await?;

    // The node list marked it before the comet was told to drain, so by the
    // time a client was redirected logic no longer handed it out (job keeps
    // pushing to it).
    let listed = common::operator::node_flags(&configmaps, CLUSTER).await?;
    ensure!(
        flags(true)(&listed),
        "a client was redirected before the node list marked the drained comet: {listed:?}"
    );

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
            ensure!(redirect.reason == "drain", "{redirect:?}");
            ensure!(
                redirect.nodes == [second.ip().to_string()],
                "op 18 must name only the other comet (not {first_ip}): {redirect:?}"
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
        let replicas = comet_replicas(&deployments, CLUSTER).await?;
        Ok((gone && replicas == Some(1)).then_some(()))
    })
    .await?;
    ensure!(
        ready_pods(&pods, CLUSTER, "comet")
            .await?
            .contains_key(&second_name)
    );
    // Every client is now on the kept comet, as the operator sees it.
    let what = "14 connections on the kept comet";
    wait_cluster(&clusters, CLUSTER, WAIT, what, |cluster| {
        let status = cluster.status.clone().unwrap_or_default();
        let kept = status
            .pods
            .iter()
            .find(|p| p.name == second_name)
            .map(|p| p.connections);
        kept == Some(14) && status.total_connections == 14
    })
    .await?;
    for outcome in &outcomes {
        ensure!(
            outcome.client.addr == second,
            "client {} is not on the kept comet",
            outcome.mid
        );
    }
    let what = "node list without the drained comet";
    wait_node_flags(&configmaps, CLUSTER, WAIT, what, |list| {
        !list.contains_key(&first_name) && list.contains_key(&second_name)
    })
    .await?;

    ensure!(
        bed.operators[0].metrics.is_leader() && !bed.operators[1].metrics.is_leader(),
        "leadership moved"
    );
    ensure!(
        bed.operators[1].metrics.reconciles() == 0,
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
            let args = container_args(comet_spec(&deployments, CLUSTER).await?);
            Ok(args
                .contains(&format!("--logic-addr={recreated}:3119"))
                .then_some(()))
        })
        .await?;
    }
    // The proxy follows the recreated Service: logic answers on its address.
    let recreated_http = SocketAddr::from((recreated.parse::<Ipv4Addr>()?, LOGIC_HTTP));
    eventually(WAIT, "logic through the recreated Service", || async {
        let answered = broadcast(recreated_http, &key, b"after-recreate").await;
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
        let answer = common::logic_call(recreated_http, Some(&key), "GET", path, b"").await;
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

    // 7. The drain settings change on the running cluster without moving a
    // client: no comet pod is replaced, the node list carries them, and each
    // comet has read that node list (its generation on comet's /metrics).
    let comets_before = wait_stable_comets(&pods, &deployments).await?;
    let template_before = comet_spec(&deployments, CLUSTER).await?.map(|s| s.template);
    clusters
        .patch(
            CLUSTER,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"comet": {"drain": {"deadlineSeconds": 33, "closeRate": 3}}}}),
            ),
        )
        .await?;
    let generation = eventually(WAIT, "the new drain settings in the node list", || async {
        let list = common::operator::node_list(&configmaps, CLUSTER).await?;
        Ok(list
            .filter(|l| l["drain"] == json!({"deadline_ms": 33_000, "close_rate": 3}))
            .and_then(|l| l["generation"].as_i64()))
    })
    .await?;
    for (name, pod) in &comets_before {
        let metrics = SocketAddr::from((pod_ip(pod)?, COMET_ADMIN));
        eventually(WAIT, "the comet read the new node list", || async {
            let body = herald_testkit::http::get(metrics, "/metrics").await?.body;
            let seen = body
                .lines()
                .find_map(|l| l.strip_prefix("herald_comet_node_list_generation "))
                .and_then(|v| v.trim().parse::<i64>().ok());
            Ok(seen.filter(|g| *g >= generation).map(drop))
        })
        .await
        .with_context(|| format!("comet {name}"))?;
    }
    let template_after = comet_spec(&deployments, CLUSTER).await?.map(|s| s.template);
    ensure!(
        template_before == template_after,
        "the drain change touched the comet pod template"
    );
    let comets_after = ready_pods(&pods, CLUSTER, "comet").await?;
    ensure!(
        comets_after.keys().eq(comets_before.keys()),
        "comets replaced: {:?} -> {:?}",
        comets_before.keys(),
        comets_after.keys()
    );
    Ok(())
}

/// The comet pods once the Deployment has rolled out (every replica Ready,
/// none terminating).
async fn wait_stable_comets(
    pods: &Api<Pod>,
    deployments: &Api<Deployment>,
) -> anyhow::Result<BTreeMap<String, Pod>> {
    eventually(WAIT, "comets rolled out", || async {
        let ready = ready_pods(pods, CLUSTER, "comet").await?;
        let all = pods
            .list(&kube::api::ListParams::default().labels(&format!(
                "app.kubernetes.io/instance={CLUSTER},app.kubernetes.io/component=comet"
            )))
            .await?
            .items
            .len();
        let wanted = comet_replicas(deployments, CLUSTER).await?;
        let stable = wanted == Some(i32::try_from(ready.len())?) && all == ready.len();
        Ok(stable.then_some(ready))
    })
    .await
}
