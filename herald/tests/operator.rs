//! `herald operator` and `herald crdgen` as a user runs them: the binary
//! against the test bed's kube-apiserver serves `/healthz` and `/metrics`,
//! wins its Lease, and stops cleanly on SIGTERM; crdgen prints the committed CRD.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use herald_testkit::{Herald, http};
use tokio::net::TcpListener;

fn herald(role: &str) -> Herald {
    Herald::new(env!("CARGO_BIN_EXE_herald"), role)
        .dir(Path::new(env!("CARGO_TARGET_TMPDIR")).join("operator"))
}

#[test]
fn crdgen_prints_the_committed_crd() -> Result<()> {
    let output = herald("crdgen").output()?;
    assert!(output.status.success());
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crds/pushcluster.yaml"
    ))?;
    assert_eq!(String::from_utf8(output.stdout)?, committed);
    Ok(())
}

#[tokio::test]
async fn operator_serves_health_and_metrics_and_stops_on_sigterm() -> Result<()> {
    herald_e2e::testbed_var("KUBECONFIG");
    // Self-contained: a fresh test bed has no CRD until some test applies it.
    herald_e2e::install_pushcluster_crd(&kube::Client::try_default().await?).await?;
    let addr = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let lease = herald_e2e::unique_name("herald-operator-bin");
    let mut running = herald("operator")
        .args(["--namespace", "default", "--lease-namespace", "default"])
        .args(["--lease-name", &lease, "--metrics-addr", &addr.to_string()])
        .args(["--poll-interval-ms", "500"])
        .name(lease.clone())
        .start()?;

    let metrics = running
        .wait_until(Duration::from_secs(30), "leadership", || async {
            Ok(http::get(addr, "/metrics")
                .await
                .ok()
                .filter(|m| m.body.contains("herald_operator_leader 1")))
        })
        .await?;
    assert_eq!(metrics.status, 200, "{metrics:?}");
    assert!(
        metrics.body.contains("herald_operator_reconciles_total"),
        "{metrics:?}"
    );
    let health = http::get(addr, "/healthz").await?;
    assert!(
        health.status == 200 && health.body.ends_with("ok"),
        "{health:?}"
    );

    // SIGTERM by pid: the operator releases its Lease and exits 0.
    let exit = running.stop(Duration::from_secs(20)).await?;
    assert!(exit.success(), "{exit}");
    Ok(())
}

mod drain {
    //! Scale-down of a PushCluster whose comet pods are backed by real
    //! `herald standalone` processes on loopback addresses (pod status is
    //! patched to point at them, as a kubelet would): the operator drains the
    //! least-loaded comet, keeps its replica while clients are still being
    //! closed, then removes exactly that pod.

    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::sync::Arc;

    use herald_client::Token;
    use herald_operator::crd::PushCluster;
    use herald_testkit::HeraldProcess;
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
    use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
    use kube::{Client, ResourceExt};
    use serde_json::json;

    use super::*;

    /// `herald standalone` as the comet of pod `name`, at `ip`.
    async fn standalone(
        ip: &str,
        grpc_port: u16,
        name: &str,
    ) -> Result<(HeraldProcess, SocketAddr)> {
        let tcp: SocketAddr = format!("{ip}:{}", herald_e2e::free_port_on(ip.parse()?)).parse()?;
        let addr = |port: u16| format!("{ip}:{port}");
        let mut running = herald("standalone")
            .args(["--tcp-addr", &tcp.to_string()])
            .args(["--ws-addr", &addr(herald_e2e::free_port_on(ip.parse()?))])
            .args(["--grpc-addr", &addr(grpc_port)])
            .args(["--http-addr", &addr(herald_e2e::free_port_on(ip.parse()?))])
            .args([
                "--logic-grpc-addr",
                &addr(herald_e2e::free_port_on(ip.parse()?)),
            ])
            .args(["--server-id", name])
            .name(name)
            .start()?;
        running.wait_for_port(tcp, Duration::from_secs(10)).await?;
        Ok((running, tcp))
    }

    /// A goim TCP client, authenticated (the auth reply has arrived).
    async fn goim_client(addr: SocketAddr, mid: u64) -> Result<herald_client::Client> {
        let mut client = herald_client::Client::connect_tcp(addr)
            .await?
            .with_timeout(Duration::from_secs(10));
        let token = Token::new(mid as i64, format!("k{mid}"))
            .room("live://1")
            .platform("web")
            .accepts([1000]);
        client.auth(&token).await?;
        Ok(client)
    }

    #[tokio::test]
    async fn scale_down_waits_for_the_drained_comets_clients() -> Result<()> {
        herald_e2e::testbed_var("KUBECONFIG");
        let client = Client::try_default().await?;
        herald_e2e::install_pushcluster_crd(&client).await?;
        let ns = herald_e2e::unique_name("op-drain-bin");
        let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await?;

        let metrics = Arc::new(herald_operator::Metrics::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let operator = tokio::spawn(herald_operator::lead(
            client.clone(),
            herald_operator::Config {
                namespaces: vec![ns.clone()],
                lease_name: "herald-operator".to_owned(),
                lease_namespace: ns.clone(),
                identity: "op-test".to_owned(),
                lease_secs: 4,
                poll_interval: Duration::from_millis(300),
                service_addresses: herald_operator::ServiceAddresses::Dns,
                metrics_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            },
            metrics,
            async move {
                let _ = stopped.await;
            },
        ));

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
        clusters.create(&PostParams::default(), &cluster).await?;

        let pods = Api::<Pod>::namespaced(client.clone(), &ns);
        let names = herald_e2e::eventually(60, "2 comet pods", || async {
            let list = pods
                .list(&ListParams::default().labels("app.kubernetes.io/component=comet"))
                .await?;
            let names: Vec<String> = list.items.iter().map(ResourceExt::name_any).collect();
            Ok((names.len() == 2).then_some(names))
        })
        .await?;
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
            pods.patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Running", "podIP": ip,
                    "podIPs": [{"ip": ip}], "conditions": [{"type": "Ready", "status": "True"}]}})),
            )
            .await?;
        }
        herald_e2e::eventually(30, "8 connections in status", || async {
            let status = clusters.get("chat").await?.status.unwrap_or_default();
            Ok((status.total_connections == 8).then_some(()))
        })
        .await?;

        clusters
            .patch_scale(
                "chat",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": 1}})),
            )
            .await?;
        let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
        let configmaps = Api::<ConfigMap>::namespaced(client.clone(), &ns);
        // While the drained comet still holds clients (closed at 1/s), the
        // condition says so, the node list marks it, and the replica stays.
        let draining = herald_e2e::eventually(20, "Draining True", || async {
            let cluster = clusters.get("chat").await?;
            let status = cluster.status.unwrap_or_default();
            let draining = status
                .conditions
                .iter()
                .any(|c| c.type_ == "Draining" && c.status == "True");
            let pod = status
                .pods
                .iter()
                .find(|p| p.draining && p.connections > 0)
                .map(|p| p.name.clone());
            Ok(if draining { pod } else { None })
        })
        .await?;
        assert_eq!(draining, names[0], "the least-loaded comet is drained");
        let replicas = deployments
            .get("chat-comet")
            .await?
            .spec
            .and_then(|s| s.replicas);
        assert_eq!(replicas, Some(2), "removed before its clients left");
        let data = configmaps.get("chat-nodes").await?.data.unwrap_or_default();
        let list: serde_json::Value = serde_json::from_str(&data["nodes.json"])?;
        let flags: BTreeMap<String, bool> = list["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| {
                (
                    n["name"].as_str().unwrap_or_default().to_owned(),
                    n["draining"] == true,
                )
            })
            .collect();
        assert_eq!(flags.get(&names[0]), Some(&true), "{list}");
        assert_eq!(flags.get(&names[1]), Some(&false), "{list}");

        // Once it is empty: marked cheapest to delete, then one replica less.
        herald_e2e::eventually(30, "1 comet", || async {
            let replicas = deployments
                .get("chat-comet")
                .await?
                .spec
                .and_then(|s| s.replicas);
            Ok((replicas == Some(1)).then_some(()))
        })
        .await?;
        if let Some(pod) = pods.get_opt(&names[0]).await? {
            assert_eq!(
                pod.annotations()
                    .get("controller.kubernetes.io/pod-deletion-cost")
                    .map(String::as_str),
                Some("-2147483648")
            );
        }
        let status = clusters.get("chat").await?.status.unwrap_or_default();
        let kept = status
            .pods
            .iter()
            .find(|p| p.name == names[1])
            .map(|p| p.connections);
        assert_eq!(kept, Some(5), "the other comet's clients are untouched");

        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(30), operator).await???;
        drop(clients);
        drop(processes);
        Api::<Namespace>::all(client)
            .delete(&ns, &DeleteParams::default())
            .await?;
        Ok(())
    }
}
