//! The contract between the operator and the roles it deploys: every command
//! line and environment the operator generates for comet, logic and job is
//! resolved as a kubelet would (`envFrom` the config ConfigMap, then `env` in
//! order with `$(VAR)` references, downward-API fields, Secret values) and run
//! through the role's real parser: `herald <role> ... --check-config`, with
//! nothing else in the environment. A flag the role does not know, a variable
//! it does not read, or a value it refuses fails here, not in a cluster.

use std::collections::BTreeMap;
use std::process::Command;

use herald_operator::build::{self, Names};
use herald_operator::crd::PushCluster;
use k8s_openapi::api::core::v1::{ConfigMap, Container};
use serde_json::json;

/// What the pod's downward API would give.
const POD_IP: &str = "127.0.0.7";
const POD_NAME: &str = "chat-comet-7d9f-abcde";
const NAMESPACE: &str = "ns";

fn cluster() -> PushCluster {
    serde_json::from_value(json!({
        "apiVersion": "herald.dev/v1alpha1", "kind": "PushCluster",
        "metadata": {"name": "chat", "namespace": NAMESPACE, "uid": "u-1", "generation": 1},
        "spec": {
            "image": "herald:dev",
            "redis": {"addr": "redis:6379", "passwordSecretRef": {"name": "redis", "key": "password"}},
            "kafka": {"brokers": ["k1:9092", "k2:9092"], "topic": "chat-push", "group": "chat-job"},
            "auth": {"mode": "jwt", "jwtSecretRef": {"name": "jwt", "key": "secret"},
                     "apiKeySecretRef": {"name": "api", "key": "key"}},
            "nodeList": {"domain": "push.example.test", "count": 3, "heartbeat": 30, "backoff": 7},
            "comet": {"replicas": 2, "drain": {"deadlineSeconds": 40, "closeRate": 100}}
        }
    }))
    .expect("a valid PushCluster")
}

/// The container's environment and argument list, resolved like kubelet.
fn resolve(container: &Container, config: &ConfigMap) -> (Vec<(String, String)>, Vec<String>) {
    let mut env: Vec<(String, String)> = Vec::new();
    for from in container.env_from.iter().flatten() {
        let name = from.config_map_ref.as_ref().map(|r| r.name.as_str());
        assert_eq!(
            name,
            config.metadata.name.as_deref(),
            "envFrom names the config ConfigMap"
        );
        env.extend(config.data.clone().unwrap_or_default());
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(value), _) => {
                let known: BTreeMap<&str, &str> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                herald_e2e::kubelet::expand(value, |name| known.get(name).copied())
            }
            (None, Some(from)) => match (&from.field_ref, &from.secret_key_ref) {
                (Some(field), _) => match field.field_path.as_str() {
                    "status.podIP" => POD_IP.to_owned(),
                    "metadata.name" => POD_NAME.to_owned(),
                    "metadata.namespace" => NAMESPACE.to_owned(),
                    other => panic!("{}: unexpected field {other}", var.name),
                },
                (None, Some(secret)) => format!("secret-{}-{}", secret.name, secret.key),
                _ => panic!("{}: unexpected value source", var.name),
            },
            (None, None) => String::new(),
        };
        env.retain(|(name, _)| *name != var.name);
        env.push((var.name.clone(), value));
    }
    let known: BTreeMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let args = container
        .args
        .iter()
        .flatten()
        .map(|arg| herald_e2e::kubelet::expand(arg, |name| known.get(name).copied()))
        .collect();
    (env, args)
}

/// Runs `herald ARGS --check-config` with exactly `env`; its stdout, or a
/// panic with stderr when the role refuses.
fn check(env: &[(String, String)], args: &[String]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(args)
        .arg("--check-config")
        .output()
        .expect("herald runs");
    assert!(
        out.status.success(),
        "herald {args:?} refused its settings: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn every_generated_command_line_parses_with_the_roles_own_parser() {
    let cluster = cluster();
    let names = Names::of(&cluster).expect("names");
    let children = build::children(&names, &cluster.spec, 2, "chat-logic").expect("children");
    let mut seen = BTreeMap::new();
    for template in children.pod_templates() {
        let pod = template.spec.as_ref().expect("pod spec");
        let container = &pod.containers[0];
        let (env, args) = resolve(container, &children.config);
        let role = args
            .first()
            .cloned()
            .expect("the role is the first argument");
        seen.insert(role, check(&env, &args));
    }
    let roles: Vec<&str> = seen.keys().map(String::as_str).collect();
    assert_eq!(roles, ["comet", "job", "logic"]);

    // What the spec says reaches each role's configuration.
    let logic = &seen["logic"];
    for expected in [
        r#"node_domain: "push.example.test""#,
        "node_count: 3,",
        "node_backoff: 7s,",
        "heartbeat: 30s,",
        "token_mode: Jwt,",
        r#"brokers: "k1:9092,k2:9092""#,
        r#"topic: "chat-push""#,
        // The password reached logic (spliced into the URL and as its own
        // variable); logic never prints it, nor a URL that holds one.
        r#"url: "<with password>""#,
        r#""<redacted>""#,
        // So did the JWT secret ("secret-jwt-secret") and the API key
        // ("secret-api-key"), shown only by their lengths.
        "jwt_secret: Some(\n        <redacted: 17 bytes>,",
        "api_key: Some(\n            <redacted: 14 bytes>,",
        r#"name: "chat-nodes""#,
        "http_addr: 127.0.0.7:",
    ] {
        assert!(logic.contains(expected), "logic lacks {expected}:\n{logic}");
    }
    for (role, shown) in &seen {
        for secret in [
            "secret-jwt-secret",
            "secret-api-key",
            "secret-redis-password",
        ] {
            assert!(!shown.contains(secret), "{role} shows {secret}:\n{shown}");
        }
    }
    let job = &seen["job"];
    for expected in [
        r#"group: "chat-job""#,
        r#"topic: "chat-push""#,
        r#"namespace: "ns""#,
        r#"name: "chat-nodes""#,
    ] {
        assert!(job.contains(expected), "job lacks {expected}:\n{job}");
    }
    let comet = &seen["comet"];
    for expected in [
        r#"server_id: "chat-comet-7d9f-abcde""#,
        "tcp_addr: 127.0.0.7:",
        "chat-logic:",
        // The drain settings come from the node list, read live.
        r#"namespace: "ns""#,
        r#"name: "chat-nodes""#,
    ] {
        assert!(comet.contains(expected), "comet lacks {expected}:\n{comet}");
    }
}

/// The check itself can fail: an unknown flag or a refused value exits
/// non-zero, so the test above would catch a drifted name.
#[test]
fn the_check_refuses_what_a_role_would_refuse() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_herald"))
            .env_clear()
            .args(args)
            .arg("--check-config")
            .output()
            .expect("herald runs")
    };
    let unknown = run(&["logic", "--node-domian=x"]);
    assert!(!unknown.status.success());
    let refused = run(&["logic", "--node-count=0"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--node-count"));
    let jwt_without_secret = run(&["logic", "--token-mode=jwt"]);
    assert_eq!(jwt_without_secret.status.code(), Some(2));
}
