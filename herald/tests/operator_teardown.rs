//! Deleting a PushCluster on the test bed's real kube-apiserver + etcd +
//! controller-manager (its garbage collector deletes the children), the
//! operator in this process: the comets are drained while logic still
//! runs, then the finalizer lets the children go; comets that cannot be
//! reached hold the deletion only until the drain deadline.

use std::time::{Duration, Instant};

use herald_e2e::eventually;
use herald_operator::controller::FINALIZER;
use herald_operator::crd::PushCluster;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use serde_json::json;

mod common;

use common::operator::{
    Operator, PodComet, create_cluster, delete_namespace, fake_running, goim_client, setup,
    wait_cluster, wait_pods,
};

fn has_finalizer(cluster: &PushCluster) -> bool {
    cluster.finalizers().iter().any(|f| f == FINALIZER)
}

/// The load a comet reports at `addr`: (connections, draining).
async fn load(addr: &str) -> anyhow::Result<(u64, bool)> {
    let off = herald_runtime::grpc_auth::Token::off();
    let reply = herald_operator::load::load(addr, Duration::from_secs(2), &off).await?;
    Ok((reply.connections, reply.draining))
}

#[tokio::test]
async fn deleting_a_cluster_drains_its_comets_before_its_children_go() -> anyhow::Result<()> {
    let (client, ns) = setup("op-teardown").await?;
    let operator = Operator::start(&client, &ns, "op-a");
    let grpc_port = herald_e2e::free_port();
    let comet = json!({"replicas": 2, "ports": {"grpc": grpc_port},
                       "drain": {"deadlineSeconds": 60, "closeRate": 1}});
    create_cluster(&client, &ns, "chat", json!({ "comet": comet })).await?;
    let clusters = Api::<PushCluster>::namespaced(client.clone(), &ns);
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);

    let names = wait_pods(&pods, "chat", "comet", 2).await?;
    let mut comets = Vec::new();
    let mut clients = Vec::new();
    let mut grpc = Vec::new();
    for (i, (name, count)) in names.iter().zip([2u64, 1]).enumerate() {
        let ip = format!("127.0.0.{}", i + 2);
        let comet = PodComet::start(&pods, name, &ip, grpc_port).await?;
        for mid in 0..count {
            clients.push(goim_client(comet.tcp, mid + 10 * i as u64).await?);
        }
        comets.push(comet);
        grpc.push(format!("{ip}:{grpc_port}"));
    }
    wait_cluster(
        &clusters,
        "chat",
        30,
        "the finalizer and 3 connections",
        |c| has_finalizer(c) && c.status.as_ref().map(|s| s.total_connections) == Some(3),
    )
    .await?;

    let deleted = Instant::now();
    clusters.delete("chat", &DeleteParams::default()).await?;
    // Every comet is told to drain, while the PushCluster and its logic stay.
    eventually(20, "both comets draining", || async {
        let mut all = true;
        for addr in &grpc {
            all &= load(addr).await?.1;
        }
        Ok(all.then_some(()))
    })
    .await?;
    let cluster = clusters.get_opt("chat").await?;
    assert!(
        cluster.is_some_and(|c| c.metadata.deletion_timestamp.is_some()),
        "the PushCluster went before its comets drained"
    );
    let logic = deployments.get_opt("chat-logic").await?;
    assert!(
        logic.is_some_and(|d| d.metadata.deletion_timestamp.is_none()),
        "logic went while comets drain"
    );

    // Once the comets are empty (3 clients closed at 1/s), it goes, and the
    // garbage collector takes the children.
    eventually(30, "the PushCluster gone", || async {
        Ok(clusters.get_opt("chat").await?.is_none().then_some(()))
    })
    .await?;
    for addr in &grpc {
        assert_eq!(load(addr).await?.0, 0, "released with clients on {addr}");
    }
    assert!(
        deleted.elapsed() < Duration::from_secs(30),
        "waited for the 60 s deadline, not for the comets to be empty"
    );
    eventually(30, "logic collected", || async {
        let logic = deployments.get_opt("chat-logic").await?;
        Ok(logic
            .is_none_or(|d| d.metadata.deletion_timestamp.is_some())
            .then_some(()))
    })
    .await?;

    operator.stop().await?;
    drop(clients);
    drop(comets);
    delete_namespace(&client, &ns).await
}

#[tokio::test]
async fn unreachable_comets_hold_a_deletion_only_until_the_drain_deadline() -> anyhow::Result<()> {
    let (client, ns) = setup("op-teardown-bound").await?;
    let operator = Operator::start(&client, &ns, "op-a");
    // The pod runs at an address where no comet listens: its load is unknown.
    let grpc_port = herald_e2e::free_port();
    let comet = json!({"replicas": 1, "ports": {"grpc": grpc_port},
                       "drain": {"deadlineSeconds": 2}});
    create_cluster(&client, &ns, "chat", json!({ "comet": comet })).await?;
    let clusters = Api::<PushCluster>::namespaced(client.clone(), &ns);
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let name = wait_pods(&pods, "chat", "comet", 1).await?;
    fake_running(&pods, &name[0], "127.0.0.9").await?;
    wait_cluster(&clusters, "chat", 30, "the finalizer and the pod", |c| {
        has_finalizer(c) && c.status.as_ref().map(|s| s.pods.len()) == Some(1)
    })
    .await?;

    let deleted = Instant::now();
    clusters.delete("chat", &DeleteParams::default()).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        clusters.get_opt("chat").await?.is_some(),
        "released without waiting for a comet whose load is unknown"
    );
    // Deadline 2 s + 10 s grace after the deletion, then released.
    eventually(40, "the PushCluster gone", || async {
        Ok(clusters.get_opt("chat").await?.is_none().then_some(()))
    })
    .await?;
    let waited = deleted.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(30),
        "released after {waited:?}"
    );

    operator.stop().await?;
    delete_namespace(&client, &ns).await
}
