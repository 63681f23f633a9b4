//! The NetworkPolicies that keep each internal port to its callers: comet's
//! gRPC port (pushes, `Drain`) to job and the operator, logic's gRPC port
//! (route writes) to comets, logic's HTTP port (push API, `/metrics`,
//! `/readyz`) to the cluster's namespace, the namespaces the spec lists and
//! the operator. Client ports stay open to all. Each policy selects one
//! component's pods, so a port not named in it is closed.

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{Value, json};

use super::{JOB_HTTP_PORT, Names, Result, typed};
use crate::crd::PushClusterSpec;

/// A rule letting `from` (peers; empty = anyone) reach `ports`.
fn rule(ports: &[i32], from: Vec<Value>) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|port| json!({"protocol": "TCP", "port": port}))
        .collect();
    if from.is_empty() {
        json!({"ports": ports})
    } else {
        json!({"ports": ports, "from": from})
    }
}

/// Pods of one component of this cluster (same namespace).
fn component(names: &Names, component: &str) -> Value {
    json!({"podSelector": {"matchLabels": names.labels(component)}})
}

/// The operator's pods, in whichever namespace.
fn operator(spec: &PushClusterSpec) -> Value {
    json!({"namespaceSelector": {},
           "podSelector": {"matchLabels": spec.network_policy.operator_pod_labels}})
}

fn policy(names: &Names, role: &str, ingress: Vec<Value>) -> Result<NetworkPolicy> {
    typed(
        "NetworkPolicy",
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": names.metadata(&names.component(role), role),
               "spec": {"podSelector": {"matchLabels": names.labels(role)},
                        "policyTypes": ["Ingress"],
                        "ingress": ingress}}),
    )
}

/// The policies for `spec`, none when `networkPolicy.enabled` is off.
///
/// # Errors
/// Only [`super::Error::Shape`].
pub(super) fn network_policies(
    names: &Names,
    spec: &PushClusterSpec,
) -> Result<Vec<NetworkPolicy>> {
    if !spec.network_policy.enabled {
        return Ok(Vec::new());
    }
    let comet = &spec.comet.ports;
    let logic = &spec.logic.ports;
    let mut http_from = vec![json!({"podSelector": {}}), operator(spec)];
    let mut namespaces = spec.network_policy.http_from_namespaces.clone();
    namespaces.sort();
    namespaces.dedup();
    if !namespaces.is_empty() {
        http_from.push(json!({"namespaceSelector": {"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": namespaces}]}}));
    }
    // Clients, and the admin port's probes and scrapes; the WSS port only
    // when comets serve it (`comet.tls`): nothing listens there otherwise.
    let mut open = vec![comet.tcp, comet.ws];
    if spec.comet.tls.is_some() {
        open.push(comet.wss);
    }
    open.push(comet.admin);
    Ok(vec![
        policy(
            names,
            "comet",
            vec![
                rule(&open, vec![]),
                rule(&[comet.grpc], vec![component(names, "job"), operator(spec)]),
            ],
        )?,
        policy(
            names,
            "logic",
            vec![
                rule(&[logic.client], vec![]),
                rule(&[logic.grpc], vec![component(names, "comet")]),
                rule(&[logic.http], http_from),
            ],
        )?,
        // Job serves nothing but its health and metrics.
        policy(names, "job", vec![rule(&[JOB_HTTP_PORT], vec![])])?,
    ])
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::tests::cluster;
    use super::super::{Names, children};

    fn ingress(policy: &k8s_openapi::api::networking::v1::NetworkPolicy) -> serde_json::Value {
        json!(policy.spec.as_ref().unwrap().ingress)
    }

    #[test]
    fn each_internal_port_is_kept_to_its_callers() {
        let mut cluster = cluster();
        cluster.spec.network_policy.http_from_namespaces = vec![
            "backend".to_owned(),
            "monitoring".to_owned(),
            "backend".to_owned(),
        ];
        let names = Names::of(&cluster).unwrap();
        let built = children(&names, &cluster.spec, 2, "chat-logic").unwrap();
        let by_name = |name: &str| {
            built
                .network_policies
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some(name))
                .unwrap()
        };
        let comet = ingress(by_name("chat-comet"));
        assert_eq!(
            comet[0]["from"],
            serde_json::Value::Null,
            "client ports open"
        );
        let open_ports = |comet: &serde_json::Value| -> Vec<i64> {
            comet[0]["ports"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["port"].as_i64().unwrap())
                .collect()
        };
        assert_eq!(open_ports(&comet), [3101, 3102, 3190], "no WSS without TLS");
        assert_eq!(
            comet[1]["ports"],
            json!([{"protocol": "TCP", "port": 3109}])
        );
        assert_eq!(
            comet[1]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
            "job"
        );
        assert_eq!(
            comet[1]["from"][1]["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
            "operator"
        );
        assert_eq!(comet[1]["from"][1]["namespaceSelector"], json!({}));
        let logic = ingress(by_name("chat-logic"));
        assert_eq!(logic[1]["ports"][0]["port"], 3119);
        assert_eq!(
            logic[1]["from"],
            json!([{"podSelector": {"matchLabels": {
                "app.kubernetes.io/component": "comet", "app.kubernetes.io/instance": "chat",
                "app.kubernetes.io/name": "herald"}}}])
        );
        assert_eq!(logic[2]["ports"][0]["port"], 3111);
        assert_eq!(
            logic[2]["from"][0],
            json!({"podSelector": {}}),
            "own namespace"
        );
        assert_eq!(
            logic[2]["from"][2]["namespaceSelector"]["matchExpressions"][0]["values"],
            json!(["backend", "monitoring"])
        );
        let spec = by_name("chat-job").spec.as_ref().unwrap();
        assert_eq!(
            spec.policy_types.as_deref(),
            Some(&["Ingress".to_owned()][..])
        );

        cluster.spec.comet.tls =
            Some(serde_json::from_value(json!({"secretName": "certs"})).unwrap());
        let with_tls = children(&names, &cluster.spec, 2, "chat-logic").unwrap();
        let comet = with_tls
            .network_policies
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some("chat-comet"))
            .map(ingress)
            .unwrap();
        assert_eq!(open_ports(&comet), [3101, 3102, 3103, 3190], "WSS with TLS");

        cluster.spec.network_policy.enabled = false;
        let off = children(&names, &cluster.spec, 2, "chat-logic").unwrap();
        assert!(off.network_policies.is_empty());
    }
}
