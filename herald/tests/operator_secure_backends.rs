//! A PushCluster on the test bed's TLS Redis (an ACL user) and SASL_SSL
//! Kafka (a SCRAM user), every credential and CA from a Secret, every pod a
//! real `herald` process (the loopback kubelet): a wrong Kafka password is
//! `KafkaReady=False KafkaAuthFailed` while Redis over TLS already works;
//! pointed at the right password, logic and job roll onto it and the
//! cluster is Available.

use anyhow::ensure;
use herald_e2e::{testbed_var, unique_name};
use herald_operator::crd::{PushCluster, PushClusterStatus};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

mod common;

use common::operator::{PodBed, setup, wait_cluster};

/// The pods' /24 (others: operator_e2e .31, chart tests .32/.33,
/// operator_dependencies .34, operator_rollout .35/.36/.37).
const POD_NET: u8 = 38;
const WAIT: u64 = 90;
const CLUSTER: &str = "secure";

fn is(cluster: &PushCluster, type_: &str, status: &str, reason: &str) -> bool {
    let status_of = |s: &PushClusterStatus| {
        s.conditions
            .iter()
            .any(|c| c.type_ == type_ && c.status == status && c.reason == reason)
    };
    cluster.status.as_ref().is_some_and(status_of)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_tls_and_kafka_sasl_from_secrets() -> anyhow::Result<()> {
    common::k8s::log_harness();
    let redis = testbed_var("HERALD_REDIS_TLS_URL")
        .trim_start_matches("rediss://")
        .trim_end_matches('/')
        .to_owned();
    let kafka = testbed_var("HERALD_KAFKA_SASL_SSL_BROKERS");
    let (client, ns) = setup("op-secure").await?;
    let mut bed = PodBed::start(&client, &ns, "operator_secure_backends", POD_NET).await?;
    bed.start_operator("op-secure");

    let result = async {
        let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
        let read = |var: &str| std::fs::read_to_string(testbed_var(var));
        for (name, data) in [
            (
                "redis-auth",
                json!({"user": testbed_var("HERALD_REDIS_TLS_USER"),
                       "password": testbed_var("HERALD_REDIS_TLS_PASSWORD")}),
            ),
            ("redis-ca", json!({"ca.pem": read("HERALD_REDIS_TLS_CA")?})),
            (
                "kafka-auth",
                json!({"user": testbed_var("HERALD_KAFKA_SASL_USER"),
                       "password": testbed_var("HERALD_KAFKA_SASL_PASSWORD"),
                       "wrong": "not-the-password"}),
            ),
            ("kafka-ca", json!({"ca.pem": read("HERALD_KAFKA_TLS_CA")?})),
        ] {
            let secret: Secret =
                serde_json::from_value(json!({"metadata": {"name": name}, "stringData": data}))?;
            secrets.create(&PostParams::default(), &secret).await?;
        }
        // Topics are provisioned beside Herald (here over the plain listener
        // of the same broker).
        let topic = unique_name("op-secure");
        common::create_topic(&testbed_var("HERALD_KAFKA_BROKERS"), &topic, 1).await?;
        let cluster: PushCluster = serde_json::from_value(json!({
            "apiVersion": "herald.dev/v1alpha1", "kind": "PushCluster",
            "metadata": {"name": CLUSTER},
            "spec": {
                "image": "herald:dev",
                "redis": {"addr": redis, "tls": true,
                          "usernameSecretRef": {"name": "redis-auth", "key": "user"},
                          "passwordSecretRef": {"name": "redis-auth", "key": "password"},
                          "caSecretRef": {"name": "redis-ca", "key": "ca.pem"}},
                "kafka": {"brokers": kafka.split(',').collect::<Vec<_>>(),
                          "topic": topic, "group": format!("{topic}-job"),
                          "securityProtocol": "SASL_SSL", "saslMechanism": "SCRAM-SHA-256",
                          "usernameSecretRef": {"name": "kafka-auth", "key": "user"},
                          "passwordSecretRef": {"name": "kafka-auth", "key": "wrong"},
                          "caSecretRef": {"name": "kafka-ca", "key": "ca.pem"}},
                "comet": {"replicas": 1},
            }
        }))?;
        let clusters = Api::<PushCluster>::namespaced(client.clone(), &ns);
        clusters.create(&PostParams::default(), &cluster).await?;
        wait_cluster(
            &clusters,
            CLUSTER,
            WAIT,
            "KafkaAuthFailed, Redis ready",
            |c| {
                is(c, "KafkaReady", "False", "KafkaAuthFailed")
                    && is(c, "RedisReady", "True", "Ready")
            },
        )
        .await?;

        clusters
            .patch(
                CLUSTER,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"kafka": {"passwordSecretRef":
                    {"name": "kafka-auth", "key": "password"}}}})),
            )
            .await?;
        let up = wait_cluster(&clusters, CLUSTER, WAIT, "Available", |c| {
            is(c, "Available", "True", "AllReplicasReady")
                && is(c, "KafkaReady", "True", "Ready")
                && is(c, "RedisReady", "True", "Ready")
        })
        .await?;
        let status = up.status.unwrap_or_default();
        ensure!(
            status.logic.ready_replicas == 1 && status.job.ready_replicas == 1,
            "{status:?}"
        );
        anyhow::Ok(())
    }
    .await;
    bed.stop().await?;
    result
}
