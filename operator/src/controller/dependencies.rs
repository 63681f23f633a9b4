//! Pipeline step: why components are not ready. Every running pod of the
//! cluster that is not Ready is asked for its `/readyz`, where the roles
//! name the cause (`"<Reason>: <detail>"`,
//! `herald_runtime::contract::unready`); the answers become one condition
//! per dependency, so `kubectl describe pushcluster` says "Redis refused the
//! password" instead of "logic 0/2":
//!
//! - `RedisReady`: logic reaches Redis (`RedisUnreachable`, `RedisAuthFailed`);
//! - `KafkaReady`: logic reaches the brokers and the topic exists, and job's
//!   consumer is assigned (`KafkaUnreachable`, `KafkaTopicMissing`,
//!   `KafkaNotAssigned`);
//! - `LogicReachable`: comets reach logic (`LogicUnreachable`).
//!
//! Each is `True` once a pod that depends on it is Ready and none reports it
//! failing, `Unknown` while no such pod has said either way.

use std::time::Duration;

use herald_runtime::contract::unready;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::collections::HashMap;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use super::Context;
use crate::build::JOB_HTTP_PORT;
use crate::crd::PushClusterSpec;

/// What one unready pod said about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Finding {
    /// `comet`, `logic` or `job`.
    pub(super) component: String,
    pub(super) pod: String,
    /// A `contract::unready` reason.
    pub(super) reason: String,
    pub(super) detail: String,
}

/// One dependency condition: `status` is `True`, `False` or `Unknown`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Verdict {
    pub(super) type_: &'static str,
    pub(super) status: &'static str,
    pub(super) reason: String,
    pub(super) message: String,
}

/// Asks every running, unready pod of the cluster (`pods`) for its
/// `/readyz`. A pod that does not answer, or answers without a reason, adds
/// nothing. `replica_sets` are the cluster's, to tell current pods from a
/// rollout's old ones.
pub(super) async fn probe(
    ctx: &Context,
    spec: &PushClusterSpec,
    pods: &[Pod],
    replica_sets: &[ReplicaSet],
) -> Vec<Finding> {
    let current = current_templates(replica_sets);
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(ctx.call_timeout));
    let client: Client<HttpConnector, Empty<bytes::Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    let asks = pods.iter().filter_map(|pod| {
        let component = pod.labels().get("app.kubernetes.io/component")?.clone();
        let port = match component.as_str() {
            "comet" => spec.comet.ports.admin,
            "logic" => spec.logic.ports.http,
            "job" => JOB_HTTP_PORT,
            _ => return None,
        };
        // During a rollout the old pods still say what was wrong with the
        // old settings: only the newest template's pods speak for now.
        let hash = pod.labels().get(TEMPLATE_HASH);
        if hash != current.get(&component) {
            return None;
        }
        let status = pod.status.as_ref()?;
        let ready = status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let running = status.phase.as_deref() == Some("Running");
        if ready || !running || pod.metadata.deletion_timestamp.is_some() {
            return None;
        }
        let ip = status.pod_ip.clone()?;
        let (client, name) = (client.clone(), pod.name_any());
        Some(async move {
            let body = readyz(&client, &ip, port, ctx.call_timeout).await?;
            let (reason, detail) = unready::parse(&body)?;
            Some(Finding {
                component,
                pod: name,
                reason: reason.to_owned(),
                detail: detail.to_owned(),
            })
        })
    });
    futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// The label the ReplicaSet controller puts on each pod of one template.
const TEMPLATE_HASH: &str = "pod-template-hash";

/// The revision the Deployment controller stamps on each of its ReplicaSets.
const REVISION: &str = "deployment.kubernetes.io/revision";

/// Per component, the template hash of its Deployment's current template:
/// that of its ReplicaSet with the highest revision. Pod creation order
/// cannot tell: creation times are in whole seconds, and a rollout's new pod
/// made in the same second as the old one was taken for the old template
/// half the time (the old pod's stale complaint then held its condition for
/// as long as the rollout waited on it). Comets the operator rolls itself
/// have no Deployment and no template hash, so they always speak.
fn current_templates(replica_sets: &[ReplicaSet]) -> HashMap<String, String> {
    let mut newest: HashMap<String, (u64, String)> = HashMap::new();
    for set in replica_sets {
        let labels = set.labels();
        let (Some(component), Some(hash), Some(revision)) = (
            labels.get("app.kubernetes.io/component"),
            labels.get(TEMPLATE_HASH),
            set.annotations()
                .get(REVISION)
                .and_then(|r| r.parse::<u64>().ok()),
        ) else {
            continue;
        };
        if newest
            .get(component)
            .is_none_or(|(seen, _)| revision > *seen)
        {
            newest.insert(component.clone(), (revision, hash.clone()));
        }
    }
    newest.into_iter().map(|(c, (_, hash))| (c, hash)).collect()
}

/// The body of a 503 from `http://ip:port/readyz`, within `timeout`.
async fn readyz(
    client: &Client<HttpConnector, Empty<bytes::Bytes>>,
    ip: &str,
    port: i32,
    timeout: Duration,
) -> Option<String> {
    let uri: http::Uri = format!("http://{ip}:{port}/readyz").parse().ok()?;
    let call = async {
        let resp = client.get(uri).await.ok()?;
        if resp.status() != http::StatusCode::SERVICE_UNAVAILABLE {
            return None;
        }
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(timeout, call).await.ok().flatten()
}

/// Ready pods per component, for the verdicts.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct ReadyCounts {
    pub(super) comet: i32,
    pub(super) logic: i32,
    pub(super) job: i32,
}

/// The three dependency conditions from the findings and the ready counts.
pub(super) fn verdicts(findings: &[Finding], ready: ReadyCounts) -> Vec<Verdict> {
    // The most specific reason any pod gives (`reasons` is in that order),
    // with every pod that gives it.
    let failing = |reasons: &[&str]| {
        let reason = reasons
            .iter()
            .find(|r| findings.iter().any(|f| f.reason == **r))?;
        let found: Vec<&Finding> = findings.iter().filter(|f| f.reason == *reason).collect();
        let pods: Vec<&str> = found.iter().map(|f| f.pod.as_str()).collect();
        Some((
            (*reason).to_owned(),
            format!("{} ({})", found[0].detail, pods.join(", ")),
        ))
    };
    let verdict = |type_, failed: Option<(String, String)>, ok: bool, what: &str| match failed {
        Some((reason, message)) => Verdict {
            type_,
            status: "False",
            reason,
            message,
        },
        None if ok => Verdict {
            type_,
            status: "True",
            reason: "Ready".to_owned(),
            message: what.to_owned(),
        },
        None => Verdict {
            type_,
            status: "Unknown",
            reason: "NotReported".to_owned(),
            message: "no pod that depends on it is Ready or has said why not".to_owned(),
        },
    };
    // Logic checks Redis before Kafka: a logic pod that complains about
    // Kafka got past Redis.
    let past_redis = findings.iter().any(|f| {
        f.component == "logic"
            && [
                unready::KAFKA_UNREACHABLE,
                unready::KAFKA_TOPIC_MISSING,
                unready::KAFKA_AUTH_FAILED,
            ]
            .contains(&f.reason.as_str())
    });
    vec![
        verdict(
            "RedisReady",
            failing(&[unready::REDIS_AUTH_FAILED, unready::REDIS_UNREACHABLE]),
            ready.logic > 0 || past_redis,
            "logic reaches Redis",
        ),
        verdict(
            "KafkaReady",
            failing(&[
                unready::KAFKA_AUTH_FAILED,
                unready::KAFKA_TOPIC_MISSING,
                unready::KAFKA_UNREACHABLE,
                unready::KAFKA_NOT_ASSIGNED,
            ]),
            ready.logic > 0 && ready.job > 0,
            "logic writes to the topic and job consumes it",
        ),
        verdict(
            "LogicReachable",
            failing(&[unready::LOGIC_UNREACHABLE]),
            ready.comet > 0,
            "comets reach logic",
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(component: &str, pod: &str, reason: &str) -> Finding {
        Finding {
            component: component.to_owned(),
            pod: pod.to_owned(),
            reason: reason.to_owned(),
            detail: format!("{reason} detail"),
        }
    }

    #[test]
    fn each_dependency_gets_the_reason_its_pods_give() {
        let findings = [
            finding("logic", "chat-logic-a", unready::REDIS_AUTH_FAILED),
            finding("logic", "chat-logic-b", unready::REDIS_AUTH_FAILED),
            finding("comet", "chat-comet-a", unready::LOGIC_UNREACHABLE),
        ];
        let v = verdicts(&findings, ReadyCounts::default());
        assert_eq!(v[0].type_, "RedisReady");
        assert_eq!(
            (v[0].status, v[0].reason.as_str()),
            ("False", "RedisAuthFailed")
        );
        assert!(v[0].message.contains("chat-logic-a, chat-logic-b"), "{v:?}");
        // Nothing said about Kafka and no logic Ready: unknown, not True.
        assert_eq!((v[1].type_, v[1].status), ("KafkaReady", "Unknown"));
        assert_eq!(
            (v[2].status, v[2].reason.as_str()),
            ("False", "LogicUnreachable")
        );
        // Everything Ready and nobody complaining: all True.
        let ready = ReadyCounts {
            comet: 2,
            logic: 1,
            job: 1,
        };
        assert!(verdicts(&[], ready).iter().all(|v| v.status == "True"));
        // A missing topic wins over a ready logic elsewhere, and over the
        // job that cannot be assigned because of it.
        let v = verdicts(
            &[
                finding("job", "j", unready::KAFKA_NOT_ASSIGNED),
                finding("logic", "l", unready::KAFKA_TOPIC_MISSING),
            ],
            ready,
        );
        assert_eq!(
            (v[1].status, v[1].reason.as_str()),
            ("False", "KafkaTopicMissing")
        );
        // A logic complaining about Kafka reached Redis, Ready or not.
        let v = verdicts(
            &[finding("logic", "l", unready::KAFKA_TOPIC_MISSING)],
            ReadyCounts::default(),
        );
        assert_eq!((v[0].status, v[1].status), ("True", "False"));
    }

    fn replica_set(component: &str, hash: &str, revision: Option<&str>) -> ReplicaSet {
        let mut set = ReplicaSet::default();
        set.metadata.labels = Some(
            [
                ("app.kubernetes.io/component", component),
                (TEMPLATE_HASH, hash),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        );
        set.metadata.annotations =
            revision.map(|r| [(REVISION.to_owned(), r.to_owned())].into_iter().collect());
        set
    }

    #[test]
    fn the_current_template_is_the_highest_revision_not_the_newest_listed() {
        // Revisions compare as numbers (10 > 9), whatever the list order;
        // a ReplicaSet without a revision (not a Deployment's) is ignored.
        let sets = [
            replica_set("logic", "new", Some("10")),
            replica_set("logic", "old", Some("9")),
            replica_set("job", "j1", Some("1")),
            replica_set("job", "stray", None),
        ];
        let current = current_templates(&sets);
        assert_eq!(current.get("logic").map(String::as_str), Some("new"));
        assert_eq!(current.get("job").map(String::as_str), Some("j1"));
        assert_eq!(current.get("comet"), None);
    }
}
