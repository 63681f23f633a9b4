//! Scaling a PushCluster on the test bed's real kube-apiserver + etcd +
//! controller-manager, the operator in this process: `/scale` and the
//! `kubectl get` columns, the autoscaler within min and max and over a
//! `kubectl scale`, an Event per scaling and drain, and the scale-down drain
//! of a comet backed by a real comet (pod status is patched to point at it
//! on loopback, as a kubelet would): in this process, and as `herald
//! standalone` processes holding clients; a deleted comet pod out of the
//! node list's rotation while it terminates.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use herald_e2e::eventually;
use herald_operator::crd::PushCluster;
use herald_testkit::{Herald, HeraldProcess};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;

mod common;

use common::operator::{
    CHEAPEST, Operator, PodComet, comet_replicas, create_cluster, delete_namespace, deletion_cost,
    draining, events_of, fake_running, goim_client, has_condition, kubectl, kubectl_get, node_list,
    scale, setup, wait_cluster, wait_comet_pods, wait_comet_replicas, wait_node_flags, wait_pods,
};

#[tokio::test]
async fn kubectl_columns_and_scale_subresource() -> anyhow::Result<()> {
    let (client, ns) = setup("op-scale").await?;
    let operator = Operator::start(&client, &ns, "op-a");
    create_cluster(&client, &ns, "chat", json!({})).await?;
    let clusters = Api::<PushCluster>::namespaced(client.clone(), &ns);
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    wait_cluster(&clusters, "chat", 60, "status", |cluster| {
        cluster
            .status
            .as_ref()
            .and_then(|s| s.comets_ready.as_deref())
            == Some("0/2")
    })
    .await?;

    let (header, row) = kubectl_get(&ns, "chat").await?;
    assert_eq!(header, common::operator::KUBECTL_COLUMNS, "{row:?}");
    assert_eq!(
        &row[..6],
        ["chat", "False", "0/2", "0/2", "0", "0"],
        "{header:?}"
    );

    // /scale reports the spec'd replicas and the comet selector, as an HPA reads it.
    let scale_now = clusters.get_scale("chat").await?;
    assert_eq!(scale_now.spec.and_then(|s| s.replicas), Some(2));
    assert_eq!(
        scale_now.status.and_then(|s| s.selector).as_deref(),
        Some(
            "app.kubernetes.io/component=comet,app.kubernetes.io/instance=chat,app.kubernetes.io/name=herald"
        )
    );

    // kubectl scale (what an HPA does through /scale) up: applied at once.
    kubectl(&["scale", "pushcluster/chat", "--replicas=4", "-n", &ns]).await?;
    wait_comet_replicas(&deployments, "chat", 4, 30).await?;
    // Down: the comets hold no clients (no kubelet runs them, none is ready),
    // so they go without a drain, one step per pass.
    scale(&clusters, "chat", 1).await?;
    wait_comet_replicas(&deployments, "chat", 1, 30).await?;
    let cluster = clusters.get("chat").await?;
    assert_eq!(
        cluster.status.and_then(|s| s.comets_ready).as_deref(),
        Some("0/1")
    );

    operator.stop().await?;
    delete_namespace(&client, &ns).await
}

#[tokio::test]
async fn autoscaler_follows_load_within_min_and_max() -> anyhow::Result<()> {
    let (client, ns) = setup("op-auto").await?;
    let operator = Operator::start(&client, &ns, "op-a");
    // No comet holds connections, so the load asks for minReplicas.
    let autoscaling = |replicas: i32, min: i32, window: i32| {
        json!({"comet": {"replicas": replicas, "autoscaling": {"enabled": true,
            "minReplicas": min, "maxReplicas": 5, "scaleDownStabilizationSeconds": window}}})
    };
    create_cluster(&client, &ns, "up", autoscaling(1, 3, 0)).await?;
    let start = tokio::time::Instant::now();
    create_cluster(&client, &ns, "down", autoscaling(4, 1, 2)).await?;
    let clusters = Api::<PushCluster>::namespaced(client.clone(), &ns);
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let replicas = |name: &'static str| {
        let (clusters, deployments) = (clusters.clone(), deployments.clone());
        async move {
            let spec = clusters.get(name).await?.spec.comet.replicas;
            let deployed = comet_replicas(&deployments, name).await?;
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
    delete_namespace(&client, &ns).await
}

/// `kubectl scale` while autoscaling is on: the autoscaler wins (as over an
/// HPA's target), undoes it on the next pass, and says so in a Warning Event
/// and the `AutoscalingOverride` condition, naming both counts.
#[tokio::test]
async fn kubectl_scale_is_overridden_by_the_autoscaler_and_said_so() -> anyhow::Result<()> {
    let (client, ns) = setup("op-override").await?;
    let operator = Operator::start(&client, &ns, "op-a");
    let comet = json!({"replicas": 1, "autoscaling": {"enabled": true, "minReplicas": 1,
        "maxReplicas": 4, "scaleDownStabilizationSeconds": 300}});
    create_cluster(&client, &ns, "chat", json!({ "comet": comet })).await?;
    let clusters = Api::<PushCluster>::namespaced(client.clone(), &ns);
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    wait_cluster(
        &clusters,
        "chat",
        30,
        "the autoscaler in control",
        |cluster| {
            let status = cluster.status.clone().unwrap_or_default();
            status.scaled_replicas == Some(1)
                && has_condition(cluster, "AutoscalingOverride", "False")
        },
    )
    .await?;
    wait_comet_replicas(&deployments, "chat", 1, 30).await?;

    kubectl(&["scale", "pushcluster/chat", "--replicas=3", "-n", &ns]).await?;
    let overridden = |cluster: &PushCluster| {
        let status = cluster.status.clone().unwrap_or_default();
        status
            .conditions
            .into_iter()
            .find(|c| c.type_ == "AutoscalingOverride" && c.status == "True")
    };
    let cluster = wait_cluster(&clusters, "chat", 30, "AutoscalingOverride True", |c| {
        overridden(c).is_some() && c.spec.comet.replicas == 1
    })
    .await?;
    let why = overridden(&cluster).unwrap_or_default();
    assert_eq!(why.reason, "ManualScaleOverridden");
    assert!(
        why.message.contains("set to 3 by kubectl") && why.message.contains("keeps 1 comets"),
        "{}",
        why.message
    );
    assert_eq!(
        comet_replicas(&deployments, "chat").await?,
        Some(1),
        "the manual count never reached the Deployment"
    );
    let events = events_of(&client, &ns, "chat").await?;
    assert!(
        events.iter().any(|(type_, reason, note)| type_ == "Warning"
            && reason == "ManualScaleOverridden"
            && note == &why.message),
        "{events:?}"
    );

    // The override holds: the spec stays at the autoscaler's count, and the
    // condition stays True through the passes its own /scale write wakes
    // (which can see the status from before it).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cluster = clusters.get("chat").await?;
    assert_eq!(cluster.spec.comet.replicas, 1);
    assert_eq!(
        overridden(&cluster).map(|c| c.message),
        Some(why.message.clone()),
        "the condition went back before the autoscaler moved the count"
    );
    assert_eq!(comet_replicas(&deployments, "chat").await?, Some(1));

    operator.stop().await?;
    delete_namespace(&client, &ns).await
}

/// Scaling 1 -> 2 -> 3 -> 1 through the spec (autoscaling off) and the two
/// drains that takes: each is an Event with its own, accurate note, not one
/// series that keeps the first; only the very same note again (1 -> 2 once
/// more) counts in its Event's series. Each of those, a recreated child and
/// a `Degraded` transition both ways are also an info line of the
/// operator's log, as an SRE reads it.
#[tokio::test]
async fn each_action_is_its_own_event_and_an_info_log() -> anyhow::Result<()> {
    let logs = OperatorLogs::capture()?;
    let (client, ns) = setup("op-events").await?;
    let operator = Operator::start(&client, &ns, "op-a");
    let grpc_port = herald_e2e::free_port();
    let comet =
        json!({"replicas": 1, "ports": {"grpc": grpc_port}, "drain": {"deadlineSeconds": 20}});
    create_cluster(&client, &ns, "chat", json!({ "comet": comet })).await?;
    let clusters = Api::<PushCluster>::namespaced(client.clone(), &ns);
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let configmaps = Api::<ConfigMap>::namespaced(client.clone(), &ns);

    // A real comet behind every comet pod, each on its own address.
    let mut comets: BTreeMap<String, PodComet> = BTreeMap::new();
    for count in [1, 2, 3] {
        if count > 1 {
            scale(&clusters, "chat", count).await?;
        }
        let names = wait_pods(&pods, "chat", "comet", usize::try_from(count)?).await?;
        for name in names {
            if !comets.contains_key(&name) {
                let ip = format!("127.0.0.{}", comets.len() + 2);
                comets.insert(
                    name.clone(),
                    PodComet::start(&pods, &name, &ip, grpc_port).await?,
                );
            }
        }
        let what = format!("{count} comets in the node list");
        wait_node_flags(&configmaps, "chat", 30, &what, |listed| {
            listed.len() == comets.len()
        })
        .await?;
    }

    // 3 -> 1: two drains, one comet at a time.
    scale(&clusters, "chat", 1).await?;
    wait_comet_replicas(&deployments, "chat", 1, 60).await?;
    let events = events_of(&client, &ns, "chat").await?;
    let notes = |reason: &str| -> Vec<String> {
        events
            .iter()
            .filter(|e| e.1 == reason)
            .map(|e| e.2.clone())
            .collect()
    };
    assert_eq!(
        notes("ScaledComets"),
        [
            "comets 1 -> 2 (comet.replicas)",
            "comets 2 -> 3 (comet.replicas)",
            "comets 3 -> 1 (comet.replicas)"
        ],
        "{events:?}"
    );
    let started = notes("DrainStarted");
    assert_eq!(started.len(), 2, "{events:?}");
    let drained: Vec<&String> = comets
        .keys()
        .filter(|name| started.contains(&format!("draining comet {name}")))
        .collect();
    assert_eq!(drained.len(), 2, "both drained pods named: {started:?}");
    let finished = notes("DrainFinished");
    assert_eq!(
        finished,
        [
            format!(
                "comet {} drained; comets 3 -> 2",
                started[0].trim_start_matches("draining comet ")
            ),
            format!(
                "comet {} drained; comets 2 -> 1",
                started[1].trim_start_matches("draining comet ")
            ),
        ],
        "{events:?}"
    );

    // The same change again is the same note: one Event, counted twice.
    scale(&clusters, "chat", 2).await?;
    wait_comet_replicas(&deployments, "chat", 2, 30).await?;
    let again = "comets 1 -> 2 (comet.replicas)";
    let counts = eventually(30, "the repeated note in its series", || async {
        let list = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), &ns)
            .list(&ListParams::default())
            .await?;
        let counts: Vec<Option<i32>> = list
            .items
            .into_iter()
            .filter(|e| e.note.as_deref() == Some(again))
            .map(|e| e.series.map(|s| s.count))
            .collect();
        Ok((counts.iter().any(Option::is_some)).then_some(counts))
    })
    .await?;
    assert_eq!(counts, [Some(2)], "one Event for the repeated note");

    // A deleted child comes back; a Secret reference that names nothing
    // degrades the cluster until it is taken out again.
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    services
        .delete("chat-logic", &DeleteParams::default())
        .await?;
    eventually(30, "the logic Service recreated", || async {
        Ok(services.get_opt("chat-logic").await?.map(drop))
    })
    .await?;
    let reference = |key_ref: serde_json::Value| {
        let patch = json!({"spec": {"auth": {"apiKeySecretRef": key_ref}}});
        let clusters = clusters.clone();
        async move {
            clusters
                .patch("chat", &PatchParams::default(), &Patch::Merge(&patch))
                .await
        }
    };
    reference(json!({"name": "gone-keys", "key": "api"})).await?;
    wait_cluster(&clusters, "chat", 30, "Degraded", |cluster| {
        has_condition(cluster, "Degraded", "True")
    })
    .await?;
    reference(serde_json::Value::Null).await?;
    wait_cluster(&clusters, "chat", 30, "recovered", |cluster| {
        has_condition(cluster, "Degraded", "False")
    })
    .await?;

    // Every one of those is an info line, naming what it did.
    let (first, second) = (
        started[0].trim_start_matches("draining comet "),
        started[1].trim_start_matches("draining comet "),
    );
    let wanted: Vec<Vec<String>> = [
        vec!["comet.replicas changed", "from=1 to=2"],
        vec!["comet.replicas changed", "from=2 to=3"],
        vec!["comet.replicas changed", "from=3 to=1"],
        vec!["comet drain started", first],
        vec!["comet drain started", second],
        vec!["comet drained; removing it", first, "replicas=2"],
        vec!["comet drained; removing it", second, "replicas=1"],
        vec![
            "recreated a deleted child",
            "kind=Service",
            "name=chat-logic",
        ],
        vec!["degraded", "SecretMissing", "detail=Secret gone-keys"],
        vec!["recovered", "SecretMissing"],
    ]
    .into_iter()
    .map(|parts| parts.into_iter().map(str::to_owned).collect())
    .collect();
    logs.wait_for(&ns, &wanted).await?;

    operator.stop().await?;
    drop(comets);
    delete_namespace(&client, &ns).await
}

/// The operator's log lines at info and above, as its text format writes
/// them: a global subscriber for this test binary (the operator's
/// controllers run in tasks of their own, which a subscriber set for one
/// task would not reach). Tests running at once share it; each reads the
/// lines of its own namespace, which the `controller` span of every line
/// names.
struct OperatorLogs(&'static std::sync::Mutex<Vec<u8>>);

impl OperatorLogs {
    fn capture() -> anyhow::Result<OperatorLogs> {
        static LOGS: std::sync::OnceLock<Result<&'static std::sync::Mutex<Vec<u8>>, String>> =
            std::sync::OnceLock::new();
        let logs = LOGS.get_or_init(|| {
            let buffer: &'static std::sync::Mutex<Vec<u8>> = Box::leak(Box::default());
            tracing_subscriber::fmt()
                .with_env_filter("herald_operator=info")
                .with_ansi(false)
                .with_writer(move || LogWriter(buffer))
                .try_init()
                .map_err(|err| err.to_string())?;
            Ok(buffer)
        });
        match logs {
            Ok(buffer) => Ok(OperatorLogs(buffer)),
            Err(err) => anyhow::bail!("cannot capture the operator's logs: {err}"),
        }
    }

    /// The captured lines that name `namespace`.
    fn lines(&self, namespace: &str) -> Vec<String> {
        let text = self.0.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&text)
            .lines()
            .filter(|line| line.contains(namespace))
            .map(str::to_owned)
            .collect()
    }

    /// Waits up to 10 s until, for each of `wanted`, an info line of
    /// `namespace` holds all its parts.
    async fn wait_for(&self, namespace: &str, wanted: &[Vec<String>]) -> anyhow::Result<()> {
        let missing = |lines: &[String]| -> Vec<Vec<String>> {
            wanted
                .iter()
                .filter(|parts| {
                    !lines.iter().any(|line| {
                        line.contains(" INFO ") && parts.iter().all(|p| line.contains(p.as_str()))
                    })
                })
                .cloned()
                .collect()
        };
        let waited = eventually(10, "the operator's info lines", || async {
            Ok(missing(&self.lines(namespace)).is_empty().then_some(()))
        })
        .await;
        if waited.is_err() {
            let lines = self.lines(namespace);
            anyhow::bail!(
                "no info line for {:?} in:\n{}",
                missing(&lines),
                lines.join("\n")
            );
        }
        Ok(())
    }
}

struct LogWriter(&'static std::sync::Mutex<Vec<u8>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ------------------------------------------------ drain, comets in process

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
    let operator = Operator::start(&client, &ns, "op-a");
    let comet =
        json!({"replicas": 2, "ports": {"grpc": grpc_port}, "drain": {"deadlineSeconds": 20}});
    create_cluster(&client, &ns, "chat", json!({ "comet": comet })).await?;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let names = wait_comet_pods(&pods, "chat", 2).await?;
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
        let list = node_list(&configmaps, "chat").await?;
        Ok(list.filter(|nodes| nodes["nodes"].as_array().map(Vec::len) == Some(2)))
    })
    .await?;
    assert!(nodes["generation"].as_i64() >= Some(2));
    for node in nodes["nodes"].as_array().into_iter().flatten() {
        let name = node["name"].as_str().unwrap_or_default();
        assert_eq!(node["grpc"], format!("{}:{grpc_port}", ips[name]));
        assert_eq!(node["draining"], false);
        assert_eq!(node["connections"], 0);
    }
    // The node list is written before the status in a pass, so the status
    // is polled too rather than read once.
    let clusters = Api::<PushCluster>::namespaced(client.clone(), &ns);
    eventually(30, "2 pods in status", || async {
        let status = clusters.get("chat").await?.status.unwrap_or_default();
        Ok((status.pods.len() == 2).then_some(()))
    })
    .await?;

    // Scale down through /scale: one comet is drained, then removed.
    scale(&clusters, "chat", 1).await?;
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    wait_comet_replicas(&deployments, "chat", 1, 30).await?;
    // The drained comet was told to drain, and marked cheapest to delete
    // before the replicas went down.
    let mut drained = Vec::new();
    for name in &names {
        let pod = pods.get_opt(name).await?;
        let started = pod.filter(|p| p.annotations().contains_key("herald.dev/drain-started"));
        if let Some(pod) = started {
            assert_eq!(deletion_cost(&pod), Some(CHEAPEST));
            drained.push(name.clone());
        }
        let load = herald_operator::load::load(
            &format!("{}:{grpc_port}", ips[name]),
            Duration::from_secs(2),
            &herald_runtime::grpc_auth::Token::off(),
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
    let what = "the drained pod gone from the node list";
    wait_node_flags(&configmaps, "chat", 30, what, |listed| {
        listed.keys().eq([kept[0]])
    })
    .await?;
    // Draining turns False once the drained pod is terminating; the status
    // lists it until a later reconcile no longer finds it.
    let what = "Draining False and one pod in the status";
    wait_cluster(&clusters, "chat", 30, what, |cluster| {
        let drained = has_condition(cluster, "Draining", "False");
        let pods = cluster.status.as_ref().map(|s| s.pods.len());
        drained && pods == Some(1)
    })
    .await?;

    operator.stop().await?;
    for stop in comets {
        let _ = stop.send(());
    }
    delete_namespace(&client, &ns).await
}

/// Behind a load balancer clients are handed its address, not pod IPs: once
/// the comet Service has an ingress (what a cloud's controller writes; here
/// through the status subresource) the node list's `addrs` carry it, while
/// job and the operator still reach each comet at its pod.
/// A comet pod being deleted (a `kubectl delete`, a node drain: its comet
/// is about to get SIGTERM and drain on its own) is out of rotation in the
/// node list from the operator's next poll: `draining`, weight 0, still
/// listed with its clients while the pod exists (job still pushes to them),
/// and gone once the pod is. The pods are bound to a node no kubelet runs,
/// so a deleted one stays terminating until the test, as its kubelet,
/// removes it; the comet is never told to drain, so the mark comes from the
/// deletion alone.
#[tokio::test]
async fn a_deleted_comet_is_out_of_rotation_until_its_pod_is_gone() -> anyhow::Result<()> {
    let (client, ns) = setup("op-deleted").await?;
    let operator = Operator::start(&client, &ns, "op-a");
    let grpc_port = herald_e2e::free_port();
    let comet = json!({"replicas": 2, "ports": {"grpc": grpc_port}});
    create_cluster(&client, &ns, "chat", json!({ "comet": comet })).await?;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let configmaps = Api::<ConfigMap>::namespaced(client.clone(), &ns);

    let names = wait_pods(&pods, "chat", "comet", 2).await?;
    let mut comets = BTreeMap::new();
    for (n, name) in names.iter().enumerate() {
        bind(&pods, name, "no-kubelet").await?;
        let ip = format!("127.0.0.{}", n + 2);
        comets.insert(
            name.clone(),
            PodComet::start(&pods, name, &ip, grpc_port).await?,
        );
    }
    let (leaving, kept) = (names[0].clone(), names[1].clone());
    let clients = [
        goim_client(comets[&leaving].tcp, 1).await?,
        goim_client(comets[&leaving].tcp, 2).await?,
    ];
    let entry = |list: &serde_json::Value, name: &str| {
        list["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["name"] == name)
            .cloned()
    };
    eventually(30, "both comets listed, the clients counted", || async {
        let list = node_list(&configmaps, "chat").await?.unwrap_or_default();
        let counted = entry(&list, &leaving).is_some_and(|n| n["connections"] == 2);
        let serving = [&leaving, &kept]
            .iter()
            .all(|name| entry(&list, name).is_some_and(|n| n["draining"] == false));
        Ok((counted && serving).then_some(()))
    })
    .await?;

    let grace = DeleteParams {
        grace_period_seconds: Some(30),
        ..DeleteParams::default()
    };
    pods.delete(&leaving, &grace).await?;
    let list = eventually(10, "the deleted comet marked draining", || async {
        let list = node_list(&configmaps, "chat").await?.unwrap_or_default();
        let marked = entry(&list, &leaving).is_some_and(|n| n["draining"] == true);
        Ok(marked.then_some(list))
    })
    .await?;
    let marked = entry(&list, &leaving).unwrap_or_default();
    assert_eq!(
        (&marked["weight"], &marked["connections"]),
        (&json!(0), &json!(2)),
        "out of rotation, its clients still listed: {list}"
    );
    let other = entry(&list, &kept).unwrap_or_default();
    assert!(
        other["draining"] == false && other["weight"].as_u64() > Some(0),
        "the other comet keeps serving: {list}"
    );
    let pod = pods.get(&leaving).await?;
    assert!(
        pod.metadata.deletion_timestamp.is_some(),
        "marked while the pod is still there, terminating"
    );

    // Its comet ends and the kubelet removes the pod: it leaves the list.
    drop(clients);
    comets.remove(&leaving);
    let now = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    pods.delete(&leaving, &now).await?;
    wait_node_flags(
        &configmaps,
        "chat",
        30,
        "the deleted comet unlisted",
        |listed| !listed.contains_key(&leaving) && listed.get(&kept) == Some(&false),
    )
    .await?;

    operator.stop().await?;
    drop(comets);
    delete_namespace(&client, &ns).await
}

/// Binds pod `name` to `node`, as a scheduler would: a pod on a node is
/// deleted gracefully (it stays, terminating, until its kubelet removes
/// it), where an unscheduled one goes at once.
async fn bind(pods: &Api<Pod>, name: &str, node: &str) -> anyhow::Result<()> {
    let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                         "target": {"apiVersion": "v1", "kind": "Node", "name": node}});
    pods.create_subresource::<_, serde_json::Value>(
        "binding",
        name,
        &kube::api::PostParams::default(),
        &binding,
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn clients_get_the_load_balancer_address_once_there_is_one() -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Service;
    use kube::api::{Patch, PatchParams};
    let (client, ns) = setup("op-lb").await?;
    let grpc_port = herald_e2e::free_port();
    let operator = Operator::start(&client, &ns, "op-a");
    let comet = json!({"replicas": 1, "serviceType": "LoadBalancer", "ports": {"grpc": grpc_port}});
    create_cluster(&client, &ns, "chat", json!({ "comet": comet })).await?;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let names = wait_comet_pods(&pods, "chat", 1).await?;
    let ip = "127.0.0.2";
    let stop = start_comet(ip, grpc_port, &names[0]).await?;
    fake_running(&pods, &names[0], ip).await?;
    let configmaps = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    let addrs = |want: &'static str| {
        let configmaps = configmaps.clone();
        async move {
            let list = node_list(&configmaps, "chat").await?;
            Ok(list.filter(|l| {
                l["nodes"][0]["addrs"] == json!([want])
                    && l["nodes"][0]["grpc"] == format!("{ip}:{grpc_port}")
            }))
        }
    };
    eventually(30, "the pod IP for clients", || addrs(ip)).await?;
    Api::<Service>::namespaced(client.clone(), &ns)
        .patch_status(
            "chat-comet",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": [{"ip": "127.0.0.77"}]}}})),
        )
        .await?;
    eventually(30, "the load balancer's address for clients", || {
        addrs("127.0.0.77")
    })
    .await?;
    operator.stop().await?;
    let _ = stop.send(());
    delete_namespace(&client, &ns).await
}

// ------------------------------------------- drain, `herald standalone`s

/// `herald standalone` as the comet of pod `name`, at `ip`.
async fn standalone(
    ip: &str,
    grpc_port: u16,
    name: &str,
) -> anyhow::Result<(HeraldProcess, SocketAddr)> {
    let tcp: SocketAddr = format!("{ip}:{}", herald_e2e::free_port_on(ip.parse()?)).parse()?;
    let addr = |port: u16| format!("{ip}:{port}");
    let mut running = Herald::new(env!("CARGO_BIN_EXE_herald"), "standalone")
        .dir(Path::new(env!("CARGO_TARGET_TMPDIR")).join("operator"))
        .args(["--tcp-addr", &tcp.to_string()])
        .args(["--ws-addr", &addr(herald_e2e::free_port_on(ip.parse()?))])
        .args(["--grpc-addr", &addr(grpc_port)])
        .args(["--http-addr", &addr(herald_e2e::free_port_on(ip.parse()?))])
        .args([
            "--logic-grpc-addr",
            &addr(herald_e2e::free_port_on(ip.parse()?)),
        ])
        .args([
            "--comet-http-addr",
            &addr(herald_e2e::free_port_on(ip.parse()?)),
        ])
        .args(["--server-id", name])
        .name(name)
        .start()?;
    running.wait_for_port(tcp, Duration::from_secs(10)).await?;
    Ok((running, tcp))
}

/// Scale-down of a PushCluster whose comet pods are backed by `herald
/// standalone` processes: the operator drains the least-loaded comet, keeps
/// its replica while clients are still being closed, then removes exactly
/// that pod.
#[tokio::test]
async fn scale_down_waits_for_the_drained_comets_clients() -> anyhow::Result<()> {
    let (client, ns) = setup("op-drain-bin").await?;
    let operator = Operator::start_with(&client, &ns, "op-test", |config| {
        config.poll_interval = Duration::from_millis(300);
    });

    let grpc_port = herald_e2e::free_port();
    let cluster: PushCluster = serde_json::from_value(json!({
        "apiVersion": "herald.dev/v1alpha1", "kind": "PushCluster",
        "metadata": {"name": "chat"},
        "spec": {"image": "herald:test", "redis": {"addr": "r:6379"},
                 "kafka": {"brokers": ["k:9092"]},
                 "comet": {"replicas": 2, "ports": {"grpc": grpc_port},
                           "drain": {"deadlineSeconds": 60, "closeRate": 1}}}
    }))?;
    let clusters = Api::<PushCluster>::namespaced(client.clone(), &ns);
    clusters
        .create(&kube::api::PostParams::default(), &cluster)
        .await?;

    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let names = wait_comet_pods(&pods, "chat", 2).await?;
    // Pod 0 gets 3 clients, pod 1 gets 5: pod 0 is the one to drain.
    let mut processes = Vec::new();
    let mut clients = Vec::new();
    for (i, (name, count)) in names.iter().zip([3u64, 5]).enumerate() {
        let ip = format!("127.0.0.{}", i + 2);
        let (process, tcp) = standalone(&ip, grpc_port, name).await?;
        processes.push(process);
        for mid in 0..count {
            clients.push(goim_client(tcp, mid + 100 * i as u64).await?);
        }
        fake_running(&pods, name, &ip).await?;
    }
    wait_cluster(
        &clusters,
        "chat",
        30,
        "8 connections in status",
        |cluster| cluster.status.as_ref().map(|s| s.total_connections) == Some(8),
    )
    .await?;

    scale(&clusters, "chat", 1).await?;
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let configmaps = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    // While the drained comet still holds clients (closed at 1/s), the
    // condition says so, the node list marks it, and the replica stays.
    let draining_pod = |cluster: &PushCluster| {
        let status = cluster.status.clone().unwrap_or_default();
        let draining = status
            .conditions
            .iter()
            .any(|c| c.type_ == "Draining" && c.status == "True");
        let pod = status
            .pods
            .iter()
            .find(|p| p.draining && p.connections > 0)
            .map(|p| p.name.clone());
        if draining { pod } else { None }
    };
    let cluster = wait_cluster(&clusters, "chat", 20, "Draining True", |cluster| {
        draining_pod(cluster).is_some()
    })
    .await?;
    assert_eq!(
        draining_pod(&cluster).as_ref(),
        Some(&names[0]),
        "the least-loaded comet is drained"
    );
    let replicas = comet_replicas(&deployments, "chat").await?;
    assert_eq!(replicas, Some(2), "removed before its clients left");
    let list = node_list(&configmaps, "chat").await?.unwrap_or_default();
    let flags = draining(&list);
    assert_eq!(flags.get(&names[0]), Some(&true), "{list}");
    assert_eq!(flags.get(&names[1]), Some(&false), "{list}");

    // Once it is empty: marked cheapest to delete, then one replica less.
    wait_comet_replicas(&deployments, "chat", 1, 30).await?;
    if let Some(pod) = pods.get_opt(&names[0]).await? {
        assert_eq!(deletion_cost(&pod), Some(CHEAPEST));
    }
    let status = clusters.get("chat").await?.status.unwrap_or_default();
    let kept = status
        .pods
        .iter()
        .find(|p| p.name == names[1])
        .map(|p| p.connections);
    assert_eq!(kept, Some(5), "the other comet's clients are untouched");

    operator.stop().await?;
    drop(clients);
    drop(processes);
    delete_namespace(&client, &ns).await
}
