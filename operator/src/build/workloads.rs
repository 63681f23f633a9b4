//! The workloads: comet, logic and job Deployments, one pod template shape
//! for all three (the pod contract in [`super`]), each with its role's flags,
//! env (downward API, Secrets by reference) and probes.

use herald_runtime::contract;
use k8s_openapi::api::apps::v1::Deployment;
use serde_json::{Value, json};

use super::{API_KEY_KEY, JOB_HTTP_PORT, Names, Result, TERMINATION_MARGIN_SECS, typed};
use crate::crd::{PushClusterSpec, Resources, SecretKeyRef};

fn downward_env() -> Vec<Value> {
    [
        (contract::POD_IP, "status.podIP"),
        (contract::POD_NAME, "metadata.name"),
        (contract::POD_NAMESPACE, "metadata.namespace"),
    ]
    .into_iter()
    .map(|(name, path)| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}))
    .collect()
}

fn secret_env(name: &str, secret: &SecretKeyRef) -> Value {
    json!({"name": name, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}}})
}

/// Redis URL env; a password comes from its Secret and is spliced in by the
/// kubelet's `$(VAR)` expansion, so it never appears in the Deployment.
fn redis_env(spec: &PushClusterSpec) -> Vec<Value> {
    match &spec.redis.password_secret_ref {
        Some(secret) => vec![
            secret_env(contract::REDIS_PASSWORD, secret),
            json!({"name": contract::REDIS_URL,
                   "value": format!("redis://:$({})@{}", contract::REDIS_PASSWORD, spec.redis.addr)}),
        ],
        None => vec![
            json!({"name": contract::REDIS_URL, "value": format!("redis://{}", spec.redis.addr)}),
        ],
    }
}

fn resources(resources: Option<&Resources>) -> Value {
    match resources {
        Some(r) => json!({"requests": r.requests, "limits": r.limits}),
        None => json!({}),
    }
}

fn probe(path: &str, port: i32) -> Value {
    json!({"httpGet": {"path": path, "port": port}, "periodSeconds": 5, "failureThreshold": 3})
}

struct Container<'a> {
    role: &'a str,
    args: Vec<String>,
    env: Vec<Value>,
    ports: Vec<(&'a str, i32)>,
    http_port: i32,
    resources: Option<&'a Resources>,
}

fn deployment(
    names: &Names,
    spec: &PushClusterSpec,
    replicas: i32,
    config_hash: &str,
    container: Container<'_>,
    pod_extra: Value,
) -> Result<Deployment> {
    let Container {
        role,
        args,
        env,
        ports,
        http_port,
        resources: limits,
    } = container;
    let mut all_args = vec![role.to_owned()];
    all_args.extend(args);
    let mut all_env = downward_env();
    all_env.extend(env);
    let mut pod_spec = json!({
        "containers": [{
            "name": role,
            "image": spec.image,
            "args": all_args,
            "env": all_env,
            "envFrom": [{"configMapRef": {"name": names.config()}}],
            "ports": ports.iter().map(|(name, port)| json!({"name": name, "containerPort": port, "protocol": "TCP"})).collect::<Vec<_>>(),
            "readinessProbe": probe("/readyz", http_port),
            "livenessProbe": probe("/healthz", http_port),
            "resources": resources(limits),
        }],
    });
    if let (Some(pod), Some(extra)) = (pod_spec.as_object_mut(), pod_extra.as_object()) {
        pod.extend(extra.clone());
    }
    typed(
        "Deployment",
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": names.metadata(&names.component(role), role),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": names.labels(role)},
            "template": {
                "metadata": {"labels": names.labels(role),
                             "annotations": {"herald.dev/config-hash": config_hash}},
                "spec": pod_spec,
            }
        }}),
    )
}

pub(super) fn comet_deployment(
    names: &Names,
    spec: &PushClusterSpec,
    replicas: i32,
    config_hash: &str,
    logic_host: &str,
) -> Result<Deployment> {
    let ports = &spec.comet.ports;
    let drain = &spec.comet.drain;
    let args = vec![
        format!("--tcp-addr=$(POD_IP):{}", ports.tcp),
        format!("--ws-addr=$(POD_IP):{}", ports.ws),
        format!("--grpc-addr=$(POD_IP):{}", ports.grpc),
        format!("--http-addr=$(POD_IP):{}", ports.admin),
        "--server-id=$(POD_NAME)".to_owned(),
        format!("--logic-addr={logic_host}:{}", spec.logic.ports.grpc),
        format!("--drain-deadline-ms={}", drain.deadline_seconds * 1000),
        format!("--drain-close-rate={}", drain.close_rate),
    ];
    deployment(
        names,
        spec,
        replicas,
        config_hash,
        Container {
            role: "comet",
            args,
            env: vec![],
            ports: vec![
                ("tcp", ports.tcp),
                ("ws", ports.ws),
                ("grpc", ports.grpc),
                ("admin", ports.admin),
            ],
            http_port: ports.admin,
            resources: spec.comet.resources.as_ref(),
        },
        json!({"terminationGracePeriodSeconds": drain.deadline_seconds + TERMINATION_MARGIN_SECS}),
    )
}

pub(super) fn logic_deployment(
    names: &Names,
    spec: &PushClusterSpec,
    config_hash: &str,
) -> Result<Deployment> {
    let ports = &spec.logic.ports;
    let mut env = redis_env(spec);
    if let Some(secret) = &spec.auth.jwt_secret_ref {
        env.push(secret_env(contract::JWT_SECRET, secret));
    }
    let api_key = spec
        .auth
        .api_key_secret_ref
        .clone()
        .unwrap_or_else(|| SecretKeyRef {
            name: names.api_key(),
            key: API_KEY_KEY.to_owned(),
        });
    env.push(secret_env(contract::API_KEY, &api_key));
    deployment(
        names,
        spec,
        spec.logic.replicas,
        config_hash,
        Container {
            role: "logic",
            args: vec![
                format!("--http-addr=$(POD_IP):{}", ports.http),
                format!("--grpc-addr=$(POD_IP):{}", ports.grpc),
                format!("--node-list-configmap={}", names.nodes()),
            ],
            env,
            ports: vec![("http", ports.http), ("grpc", ports.grpc)],
            http_port: ports.http,
            resources: spec.logic.resources.as_ref(),
        },
        json!({"serviceAccountName": names.service_account()}),
    )
}

pub(super) fn job_deployment(
    names: &Names,
    spec: &PushClusterSpec,
    config_hash: &str,
) -> Result<Deployment> {
    deployment(
        names,
        spec,
        spec.job.replicas,
        config_hash,
        Container {
            role: "job",
            args: vec![
                format!("--http-addr=$(POD_IP):{JOB_HTTP_PORT}"),
                format!("--node-list-configmap={}", names.nodes()),
            ],
            env: vec![],
            ports: vec![("http", JOB_HTTP_PORT)],
            http_port: JOB_HTTP_PORT,
            resources: spec.job.resources.as_ref(),
        },
        json!({"serviceAccountName": names.service_account()}),
    )
}
