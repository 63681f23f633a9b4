//! Why a PushCluster is not ready, as its status says it: real comet, logic
//! and job pods (the loopback kubelet) on a Redis address where nothing
//! listens and a Kafka topic that does not exist yet. The operator reads the
//! unready pods' `/readyz` and reports one condition per dependency
//! (`RedisReady`, `KafkaReady`, `LogicReachable`) with the reason the pods
//! give, and `Available` names the cause; each fix flips its condition.

use std::time::Duration;

use anyhow::ensure;
use herald_e2e::service_proxy::ServiceProxy;
use herald_e2e::{testbed_var, unique_name};
use herald_operator::ServiceAddresses;
use herald_operator::crd::{PushCluster, PushClusterStatus};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

mod common;

use common::k8s::start_kubelet;
use common::operator::{Operator, setup, wait_cluster};

/// The pods' /24 (operator_e2e.rs uses .31, the chart tests .32 and .33).
const POD_NET: u8 = 34;
const WAIT: u64 = 90;
const CLUSTER: &str = "deps";

/// The condition `type_` as `(status, reason, message)`.
fn condition(status: &PushClusterStatus, type_: &str) -> Option<(String, String, String)> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn is(cluster: &PushCluster, type_: &str, status: &str, reason: &str) -> bool {
    cluster
        .status
        .as_ref()
        .and_then(|s| condition(s, type_))
        .is_some_and(|(s, r, _)| s == status && r == reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_names_the_dependency_that_keeps_a_cluster_down() -> anyhow::Result<()> {
    let brokers = testbed_var("HERALD_KAFKA_BROKERS");
    let redis_addr = testbed_var("HERALD_REDIS_URL")
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let (client, ns) = setup("op-deps").await?;
    let api_cluster = herald_e2e::kubelet::current_cluster().map_err(anyhow::Error::msg)?;
    let kubelet = start_kubelet(
        &client,
        "operator_dependencies",
        "loopback-deps",
        POD_NET,
        |c| {
            c.namespaces = vec![ns.clone()];
            c.api_cluster = Some(api_cluster);
            c.shutdown_grace = Duration::from_secs(3);
        },
    )
    .await?;
    let proxy = ServiceProxy::start(client.clone(), vec![ns.clone()]);
    let mut operator = Operator::start_with(&client, &ns, "op-deps", |config| {
        config.poll_interval = Duration::from_millis(300);
        config.service_addresses = ServiceAddresses::ClusterIp;
    });

    let clusters: Api<PushCluster> = Api::namespaced(client.clone(), &ns);
    let result = async {
        // 1. Redis where nothing listens; a topic nobody created.
        let nowhere = format!("127.0.0.1:{}", herald_e2e::free_port());
        let topic = unique_name("op-deps");
        let cluster: PushCluster = serde_json::from_value(json!({
            "apiVersion": "herald.dev/v1alpha1", "kind": "PushCluster",
            "metadata": {"name": CLUSTER},
            "spec": {
                "image": "herald:dev",
                "redis": {"addr": nowhere},
                "kafka": {"brokers": brokers.split(',').collect::<Vec<_>>(),
                          "topic": topic, "group": format!("{topic}-job")},
                "comet": {"replicas": 1},
                "logic": {"replicas": 1},
                "job": {"replicas": 1},
            }
        }))?;
        clusters.create(&PostParams::default(), &cluster).await?;
        let down = wait_cluster(&clusters, CLUSTER, WAIT, "RedisUnreachable reported", |c| {
            is(c, "RedisReady", "False", "RedisUnreachable")
                && is(c, "LogicReachable", "False", "LogicUnreachable")
                && is(c, "Available", "False", "RedisUnreachable")
        })
        .await?;
        let status = down.status.clone().unwrap_or_default();
        let (_, _, available) = condition(&status, "Available").unwrap_or_default();
        ensure!(
            available.contains("logic 0/1") && available.contains("RedisUnreachable"),
            "Available says {available}"
        );
        println!("redis down: Available = {available}");
        // Every condition is stamped with the generation it describes, and
        // the pass time is reported.
        ensure!(
            status
                .conditions
                .iter()
                .all(|c| c.observed_generation == down.metadata.generation),
            "{:?}",
            status.conditions
        );
        ensure!(status.last_reconcile_time.is_some(), "{status:?}");

        // 2. The real Redis: the pods roll onto it, and the next cause shows.
        clusters
            .patch(
                CLUSTER,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"redis": {"addr": redis_addr}}})),
            )
            .await?;
        let missing = wait_cluster(
            &clusters,
            CLUSTER,
            WAIT,
            "KafkaTopicMissing reported",
            |c| {
                is(c, "RedisReady", "True", "Ready")
                    && is(c, "KafkaReady", "False", "KafkaTopicMissing")
            },
        )
        .await?;
        let (_, _, kafka) =
            condition(&missing.status.unwrap_or_default(), "KafkaReady").unwrap_or_default();
        ensure!(kafka.contains("UnknownTopic"), "{kafka}");
        println!("topic missing: KafkaReady = {kafka}");

        // 3. The topic: every dependency ready, the cluster Available, and
        // COMETS counts serving comets.
        common::create_topic(&brokers, &topic, 1).await?;
        let up = wait_cluster(
            &clusters,
            CLUSTER,
            WAIT,
            "Available with every dependency",
            |c| {
                ["RedisReady", "KafkaReady", "LogicReachable"]
                    .iter()
                    .all(|t| is(c, t, "True", "Ready"))
                    && is(c, "Available", "True", "AllReplicasReady")
            },
        )
        .await?;
        let status = up.status.unwrap_or_default();
        ensure!(status.comets_ready.as_deref() == Some("1/1"), "{status:?}");
        anyhow::Ok(())
    }
    .await;
    if result.is_err()
        && let Ok(cluster) = clusters.get(CLUSTER).await
    {
        eprintln!("last status: {:#?}", cluster.status);
    }
    operator.signal();
    operator.stop().await?;
    proxy.stop().await;
    kubelet.stop().await;
    common::operator::delete_namespace(&client, &ns).await?;
    result
}
