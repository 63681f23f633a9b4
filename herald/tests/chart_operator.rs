//! The operator as the Helm chart installs it: `helm install` puts the
//! operator Deployment, its ServiceAccount and RBAC into the test apiserver,
//! the loopback kubelet runs the operator pod as a real `herald operator`
//! process authenticated as that ServiceAccount, and the operator reconciles
//! a PushCluster. This is what proves the chart's least-privilege RBAC is
//! enough for the operator's real work (RBAC is enforced by the apiserver).
//! Only the operator's namespace is run by the kubelet: the PushCluster's own
//! pods stay Pending (`operator_e2e.rs` runs those). With `watchNamespaces`
//! set the chart grants only Roles in the watched namespace, and the Lease is
//! the chart's: the operator holds it, and `helm uninstall` removes it.

use std::path::{Path, PathBuf};

use anyhow::{Context, ensure};
use herald_e2e::kubelet::{Config as KubeletConfig, IpPool, Kubelet, current_cluster};
use herald_e2e::{eventually, helm, testbed_var, unique_name};
use herald_operator::crd::PushCluster;
use herald_testkit::http;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

mod common;

/// The operator pod's /24 (other harness tests use 127.0.20-31.x).
const POD_NET: u8 = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_installed_operator_reconciles_a_push_cluster() -> anyhow::Result<()> {
    testbed_var("KUBECONFIG");
    let client = Client::try_default().await?;
    let ops = common::k8s::create_namespace(&client, "herald-ops", "chart").await?;
    let chat = common::k8s::create_namespace(&client, "chat", "chart").await?;

    let node = unique_name("loopback-chart");
    let run_dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("chart_operator")
        .join(&node);
    let mut config = KubeletConfig::new(
        &node,
        PathBuf::from(env!("CARGO_BIN_EXE_herald")),
        run_dir.clone(),
        IpPool::slash24(POD_NET),
    );
    config.namespaces = vec![ops.clone()];
    config.api_cluster = Some(current_cluster().map_err(anyhow::Error::msg)?);
    let kubelet = Kubelet::start(client.clone(), config).await?;

    let release = "herald";
    let installed = common::k8s::install_chart(release, &ops, &chat, &[]);
    let result = async {
        installed?;
        // The operator pod: Running and Ready (its /healthz probed on its pod IP).
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ops);
        let leases: Api<Lease> = Api::namespaced(client.clone(), &ops);
        let pod = eventually(60, "the operator pod Ready", || async {
            let list = pods.list(&Default::default()).await?;
            Ok(list.items.into_iter().find(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            }))
        })
        .await?;
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .context("pod IP")?;
        ensure!(
            ip.starts_with("127.0.32."),
            "pod IP {ip} is not the loopback pool's"
        );
        // It leads through the Lease the chart created (its RBAC has no
        // `create` on Leases): the holder is the pod.
        let pod_name = pod.name_any();
        eventually(30, "the operator pod holding the chart's Lease", || async {
            let lease = leases.get("herald-operator").await?;
            Ok(
                (lease.spec.and_then(|s| s.holder_identity).as_deref() == Some(pod_name.as_str()))
                    .then_some(()),
            )
        })
        .await?;

        // The README's example PushCluster in the watched namespace: it names
        // Secrets that do not exist yet, so it is Degraded and nothing is built.
        let cluster: PushCluster = serde_yaml::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/pushcluster.yaml"
        )))?;
        let clusters: Api<PushCluster> = Api::namespaced(client.clone(), &chat);
        let created = clusters.create(&PostParams::default(), &cluster).await?;
        eventually(60, "Degraded: SecretMissing", || async {
            let c = clusters.get("chat").await?;
            Ok(c.status
                .is_some_and(|s| {
                    s.conditions.iter().any(|c| {
                        c.type_ == "Degraded" && c.status == "True" && c.reason == "SecretMissing"
                    })
                })
                .then_some(()))
        })
        .await?;
        // Once the Secrets exist, the children are built, written by the
        // chart's ServiceAccount under the chart's RBAC.
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &chat);
        for (name, key) in [("redis", "password"), ("herald-jwt", "secret")] {
            let secret: Secret = serde_json::from_value(json!({
                "metadata": {"name": name}, "stringData": {key: "test-only"}
            }))?;
            secrets.create(&PostParams::default(), &secret).await?;
        }
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &chat);
        let comet = eventually(60, "the comet ReplicaSet", || async {
            let sets = common::operator::comet_replica_sets(&deployments, "chat").await?;
            Ok(sets.into_iter().next())
        })
        .await?;
        let mut owners = vec![(comet.name_any(), comet.owner_references().to_vec())];
        for name in ["chat-logic", "chat-job"] {
            let d = eventually(60, name, || async { Ok(deployments.get_opt(name).await?) }).await?;
            owners.push((name.to_owned(), d.owner_references().to_vec()));
        }
        for (name, references) in owners {
            let owner = references.first().context("owner reference")?;
            ensure!(
                owner.kind == "PushCluster" && Some(&owner.uid) == created.metadata.uid.as_ref(),
                "{name} is not owned by the PushCluster: {owner:?}"
            );
        }
        // The Secrets do not change the generation: the Degraded status from
        // before them also matches it, so wait for one that is not Degraded.
        let status = eventually(60, "status written after the Secrets", || async {
            let c = clusters.get("chat").await?;
            Ok(c.status.filter(|s| {
                s.observed_generation == c.metadata.generation
                    && !s
                        .conditions
                        .iter()
                        .any(|c| c.type_ == "Degraded" && c.status == "True")
            }))
        })
        .await?;
        let conditions: Vec<&str> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
        ensure!(
            conditions.contains(&"Available") && conditions.contains(&"Progressing"),
            "conditions {conditions:?}"
        );
        let degraded = status.conditions.iter().find(|c| c.type_ == "Degraded");
        ensure!(
            degraded.is_none_or(|c| c.status == "False"),
            "still degraded: {degraded:?}"
        );
        // The pod's /metrics, through the chart's metrics Service port name:
        // the cluster is no longer Degraded there either, and passes are timed.
        let series = format!(r#"{{namespace="{chat}",pushcluster="chat"}}"#);
        let metrics = eventually(30, "cluster_degraded 0 in the pod's /metrics", || async {
            let body = http::get((ip.as_str(), 3180), "/metrics").await?.ok()?.body;
            Ok(body
                .contains(&format!("herald_operator_cluster_degraded{series} 0"))
                .then_some(body))
        })
        .await?;
        for name in [
            format!("herald_operator_cluster_connections{series} "),
            format!("herald_operator_cluster_draining_comets{series} 0"),
            "herald_operator_reconcile_duration_seconds_count ".to_owned(),
        ] {
            ensure!(metrics.contains(&name), "{name} missing:\n{metrics}");
        }
        // What a platform team reads.
        let (header, row) = common::operator::kubectl_get(&chat, "chat").await?;
        ensure!(header == common::operator::KUBECTL_COLUMNS, "{header:?}");
        ensure!(row.get(2).map(String::as_str) == Some("0/2"), "{row:?}");
        Ok::<_, anyhow::Error>(())
    }
    .await;

    let uninstalled = helm(&["uninstall", release, "--namespace", &ops, "--wait"]);
    // The chart owned the Lease: uninstall removed it, and the operator,
    // still stopping, cannot bring it back.
    let lease_left = async {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        Api::<Lease>::namespaced(client.clone(), &ops)
            .get_opt("herald-operator")
            .await
    }
    .await;
    let exits = kubelet.stop().await;
    // The PushCluster's finalizer is released first: its operator is gone.
    for ns in [&ops, &chat] {
        let _ = common::operator::delete_namespace(&client, ns).await;
    }
    if result.is_err() {
        for entry in walk(&run_dir) {
            if let Ok(log) = std::fs::read_to_string(&entry) {
                eprintln!("----- {} -----\n{log}", entry.display());
            }
        }
    }
    result?;
    uninstalled?;
    ensure!(lease_left?.is_none(), "the Lease survived helm uninstall");
    ensure!(!exits.is_empty(), "the kubelet ran no process");
    Ok(())
}

/// Every file below `dir` (the pods' log files).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}
