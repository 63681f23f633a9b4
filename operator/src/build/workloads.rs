//! The workloads: comet, logic and job Deployments, one pod template shape
//! for all three (the pod contract in [`super`]), each with its role's flags,
//! env (downward API, Secrets by reference) and probes, and the spec's
//! pod-template settings on top of the defaults below.
//!
//! Precedence, so that user settings can never break what the operator
//! relies on: the selector labels and the config-hash annotation win over
//! `podLabels`/`podAnnotations`; `env` entries naming a variable the operator
//! sets are dropped (admission refuses them already); the role's flags win
//! over any `HERALD_*` variable, as flags do.

use std::collections::BTreeMap;

use herald_runtime::contract;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use serde_json::{Value, json};

use super::{
    API_KEY_KEY, GRPC_TOKEN_KEY, JOB_HTTP_PORT, Names, Result, TERMINATION_MARGIN_SECS, typed,
};
use crate::crd::{
    KafkaSecurityProtocol, OPERATOR_ENV, PodTemplate, PushClusterSpec, Resources, SecretKeyRef,
};
use crate::validate::{TLS_CERT_KEY, TLS_KEY_KEY};

/// The pod annotation carrying the config hash (a change rolls the pods).
pub(super) const CONFIG_HASH: &str = "herald.dev/config-hash";
/// User and group the pods run as by default (the usual "nonroot" id; the
/// chart runs the operator as the same).
pub(super) const DEFAULT_UID: i64 = 65532;

/// The pod security context when the spec sets none: the restricted Pod
/// Security Standard's pod-level half, with a numeric user so the kubelet
/// can check `runAsNonRoot` whatever the image's `USER`.
fn default_pod_security() -> Value {
    json!({"runAsNonRoot": true, "runAsUser": DEFAULT_UID, "runAsGroup": DEFAULT_UID,
           "seccompProfile": {"type": "RuntimeDefault"}})
}

/// The container security context when the spec sets none. The root
/// filesystem can be read-only: no role writes a file (logs go to stderr,
/// the node list comes from the API, Kafka and Redis clients keep no files).
fn default_container_security() -> Value {
    json!({"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
           "runAsNonRoot": true, "capabilities": {"drop": ["ALL"]}})
}

/// Comets hold long-lived connections: one node going away should take as
/// few as possible, so spread them across nodes, as a preference.
fn default_comet_spread(names: &Names) -> Value {
    json!([{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": names.labels("comet")}}])
}

/// The spec's pod-template settings as members of the pod spec, defaults
/// filled in; `spread` is the topology default when the spec sets none.
fn pod_settings(spec: &PushClusterSpec, pod: &PodTemplate, spread: Option<Value>) -> Value {
    let mut settings = serde_json::Map::new();
    let mut set = |key: &str, value: Value| {
        settings.insert(key.to_owned(), value);
    };
    if !pod.node_selector.is_empty() {
        set("nodeSelector", json!(pod.node_selector));
    }
    if let Some(affinity) = &pod.affinity {
        set("affinity", json!(affinity));
    }
    if !pod.tolerations.is_empty() {
        set("tolerations", json!(pod.tolerations));
    }
    match (&pod.topology_spread_constraints, spread) {
        (Some(constraints), _) if !constraints.is_empty() => {
            set("topologySpreadConstraints", json!(constraints));
        }
        (None, Some(default)) => set("topologySpreadConstraints", default),
        _ => {}
    }
    set(
        "securityContext",
        pod.pod_security_context
            .as_ref()
            .map_or_else(default_pod_security, |context| json!(context)),
    );
    if !spec.image_pull_secrets.is_empty() {
        set("imagePullSecrets", json!(spec.image_pull_secrets));
    }
    Value::Object(settings)
}

/// The user's `env`, without the variables the operator sets.
fn user_env(pod: &PodTemplate) -> impl Iterator<Item = Value> + '_ {
    pod.env
        .iter()
        .filter(|var| !OPERATOR_ENV.contains(&var.name.as_str()))
        .map(|var| json!(var))
}

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
/// kubelet's `$(VAR)` expansion, so it never appears in the Deployment. An
/// ACL user name comes from its Secret too; `tls` makes it `rediss://`.
fn redis_env(spec: &PushClusterSpec) -> Vec<Value> {
    let redis = &spec.redis;
    let scheme = if redis.tls { "rediss" } else { "redis" };
    let mut env = Vec::new();
    if let Some(secret) = &redis.username_secret_ref {
        env.push(secret_env(contract::REDIS_USERNAME, secret));
    }
    match &redis.password_secret_ref {
        Some(secret) => {
            env.push(secret_env(contract::REDIS_PASSWORD, secret));
            env.push(json!({"name": contract::REDIS_URL,
                   "value": format!("{scheme}://:$({})@{}", contract::REDIS_PASSWORD, redis.addr)}));
        }
        None => env.push(
            json!({"name": contract::REDIS_URL, "value": format!("{scheme}://{}", redis.addr)}),
        ),
    }
    env
}

/// Where the CA certificates of Redis and Kafka are mounted.
const BACKEND_CA_DIR: &str = "/etc/herald/ca";

/// A CA Secret key mounted at `BACKEND_CA_DIR/<name>/ca.crt`: the env naming
/// the file, the container's mount and the pod's volume.
fn ca_file(name: &str, variable: &str, secret: &SecretKeyRef) -> (Value, Value, Value) {
    let dir = format!("{BACKEND_CA_DIR}/{name}");
    (
        json!({"name": variable, "value": format!("{dir}/ca.crt")}),
        json!({"name": name, "mountPath": dir, "readOnly": true}),
        json!({"name": name, "secret": {"secretName": secret.name,
                                        "items": [{"key": secret.key, "path": "ca.crt"}]}}),
    )
}

/// What a role needs to reach Kafka (logic, job) and, with `redis`, Redis
/// (logic) securely: env (credentials from Secrets, the protocol), CA
/// mounts and their volumes.
fn backend_security(spec: &PushClusterSpec, redis: bool) -> (Vec<Value>, Vec<Value>, Vec<Value>) {
    let (mut env, mut mounts, mut volumes) = (Vec::new(), Vec::new(), Vec::new());
    let kafka = &spec.kafka;
    if kafka.security_protocol != KafkaSecurityProtocol::Plaintext {
        env.push(json!({"name": contract::KAFKA_SECURITY_PROTOCOL,
                        "value": kafka.security_protocol.as_str()}));
        env.push(json!({"name": contract::KAFKA_SASL_MECHANISM,
                        "value": kafka.sasl_mechanism.as_str()}));
    }
    if let Some(secret) = &kafka.username_secret_ref {
        env.push(secret_env(contract::KAFKA_USERNAME, secret));
    }
    if let Some(secret) = &kafka.password_secret_ref {
        env.push(secret_env(contract::KAFKA_PASSWORD, secret));
    }
    let mut cas = vec![];
    if let Some(secret) = &kafka.ca_secret_ref {
        cas.push(ca_file("kafka-ca", contract::KAFKA_CA_FILE, secret));
    }
    if let (true, Some(secret)) = (redis, &spec.redis.ca_secret_ref) {
        cas.push(ca_file("redis-ca", contract::REDIS_CA_FILE, secret));
    }
    for (variable, mount, volume) in cas {
        env.push(variable);
        mounts.push(mount);
        volumes.push(volume);
    }
    (env, mounts, volumes)
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
    pod: &'a PodTemplate,
    /// The topology spread when `pod` sets none.
    spread: Option<Value>,
    /// `volumeMounts` of the container.
    mounts: Vec<Value>,
}

fn deployment(
    names: &Names,
    spec: &PushClusterSpec,
    replicas: i32,
    config_hash: &str,
    container: Container<'_>,
    pod_extra: Value,
) -> Result<Deployment> {
    let role = container.role;
    let template = pod_template(names, spec, config_hash, container, pod_extra);
    typed(
        "Deployment",
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": names.metadata(&names.component(role), role),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": names.labels(role)},
            "template": template,
        }}),
    )
}

/// The pod template of a role: the container by the pod contract, the
/// spec's pod settings, and the settings hash that rolls it.
fn pod_template(
    names: &Names,
    spec: &PushClusterSpec,
    config_hash: &str,
    container: Container<'_>,
    pod_extra: Value,
) -> Value {
    let Container {
        role,
        args,
        env,
        ports,
        http_port,
        resources: limits,
        pod,
        spread,
        mounts,
    } = container;
    let mut all_args = vec![
        role.to_owned(),
        format!("--log-format={}", spec.log_format.as_str()),
    ];
    all_args.extend(args);
    let mut all_env = downward_env();
    all_env.extend(env);
    // Every role both serves and calls gRPC, so every role holds the token.
    if spec.auth.grpc_token {
        all_env.push(secret_env(
            contract::GRPC_TOKEN,
            &SecretKeyRef {
                name: names.grpc_token(),
                key: GRPC_TOKEN_KEY.to_owned(),
            },
        ));
    }
    all_env.extend(user_env(pod));
    let mut main = json!({
        "name": role,
        "image": spec.image,
        "args": all_args,
        "env": all_env,
        "envFrom": [{"configMapRef": {"name": names.config()}}],
        "ports": ports.iter().map(|(name, port)| json!({"name": name, "containerPort": port, "protocol": "TCP"})).collect::<Vec<_>>(),
        "readinessProbe": probe("/readyz", http_port),
        "livenessProbe": probe("/healthz", http_port),
        "resources": resources(limits),
        "securityContext": pod.security_context.as_ref()
            .map_or_else(default_container_security, |context| json!(context)),
    });
    if let (Some(main), false) = (main.as_object_mut(), mounts.is_empty()) {
        main.insert("volumeMounts".to_owned(), Value::Array(mounts));
    }
    if let (Some(main), Some(policy)) = (main.as_object_mut(), spec.image_pull_policy) {
        main.insert("imagePullPolicy".to_owned(), policy.as_str().into());
    }
    let mut pod_spec = json!({"containers": [main]});
    if let Some(pod_spec) = pod_spec.as_object_mut() {
        for extra in [pod_settings(spec, pod, spread), pod_extra] {
            if let Value::Object(extra) = extra {
                pod_spec.extend(extra);
            }
        }
    }
    let mut labels = pod.pod_labels.clone();
    labels.extend(names.labels(role));
    let mut annotations: BTreeMap<String, String> = pod.pod_annotations.clone();
    annotations.insert(CONFIG_HASH.to_owned(), config_hash.to_owned());
    json!({
        "metadata": {"labels": labels, "annotations": annotations},
        "spec": pod_spec,
    })
}

/// The label naming a comet pod's revision (a digest of its template):
/// each revision's ReplicaSet selects on it, and a rollout tells old comets
/// from new by it.
pub const REVISION_LABEL: &str = "herald.dev/revision";

/// The comet container and its pod-level extras, shared by the comet
/// Deployment (`rollout.strategy: Deployment`) and the operator's
/// per-revision ReplicaSets (`Drain`).
fn comet_container<'a>(
    names: &Names,
    spec: &'a PushClusterSpec,
    logic_host: &str,
) -> (Container<'a>, Value) {
    let ports = &spec.comet.ports;
    let drain = &spec.comet.drain;
    let mut args = vec![
        format!("--tcp-addr=$(POD_IP):{}", ports.tcp),
        format!("--ws-addr=$(POD_IP):{}", ports.ws),
        format!("--grpc-addr=$(POD_IP):{}", ports.grpc),
        format!("--http-addr=$(POD_IP):{}", ports.admin),
        "--server-id=$(POD_NAME)".to_owned(),
        format!("--logic-addr={logic_host}:{}", spec.logic.ports.grpc),
        // Drain deadline and pace come from the node list, read live: a
        // change to them rolls no comet and moves no client.
        format!("--node-list-configmap={}", names.nodes()),
    ];
    let mut container_ports = vec![
        ("tcp", ports.tcp),
        ("ws", ports.ws),
        ("grpc", ports.grpc),
        ("admin", ports.admin),
    ];
    let mut extra = json!({"terminationGracePeriodSeconds": grace_period(drain.deadline_seconds),
                           "serviceAccountName": names.service_account()});
    let mut mounts = Vec::new();
    if let Some(tls) = &spec.comet.tls {
        // The Secret as files; the kubelet swaps them when it is renewed
        // and comet reloads the pair (no restart, no rollout).
        args.extend([
            format!("--wss-addr=$(POD_IP):{}", ports.wss),
            format!("--tls-cert={TLS_DIR}/{TLS_CERT_KEY}"),
            format!("--tls-key={TLS_DIR}/{TLS_KEY_KEY}"),
        ]);
        container_ports.push(("wss", ports.wss));
        mounts.push(json!({"name": "tls", "mountPath": TLS_DIR, "readOnly": true}));
        extra["volumes"] = json!([{"name": "tls", "secret": {"secretName": tls.secret_name}}]);
    }
    (
        Container {
            role: "comet",
            args,
            env: vec![],
            ports: container_ports,
            http_port: ports.admin,
            resources: spec.comet.resources.as_ref(),
            pod: &spec.comet.pod,
            spread: Some(default_comet_spread(names)),
            mounts,
        },
        extra,
    )
}

/// Where comet pods mount `comet.tls.secretName`.
const TLS_DIR: &str = "/etc/herald/tls";

/// The comet Deployment of `rollout.strategy: Deployment`: Kubernetes'
/// rolling update replaces the comets.
pub(super) fn comet_deployment(
    names: &Names,
    spec: &PushClusterSpec,
    replicas: i32,
    config_hash: &str,
    logic_host: &str,
) -> Result<Deployment> {
    let (container, extra) = comet_container(names, spec, logic_host);
    deployment(names, spec, replicas, config_hash, container, extra)
}

/// The comet ReplicaSet of the current pod template (`rollout.strategy:
/// Drain`), named and selected by its revision, so that the old revision's
/// ReplicaSet keeps its pods while the operator drains them one by one.
pub(super) fn comet_replica_set(
    names: &Names,
    spec: &PushClusterSpec,
    replicas: i32,
    config_hash: &str,
    logic_host: &str,
) -> Result<ReplicaSet> {
    let (container, extra) = comet_container(names, spec, logic_host);
    let mut template = pod_template(names, spec, config_hash, container, extra);
    let revision = revision(&template);
    template["metadata"]["labels"][REVISION_LABEL] = json!(revision);
    let mut selector = names.labels("comet");
    selector.insert(REVISION_LABEL.to_owned(), revision.clone());
    let mut metadata = names.metadata(&format!("{}-{revision}", names.component("comet")), "comet");
    metadata["labels"][REVISION_LABEL] = json!(revision);
    typed(
        "ReplicaSet",
        json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": metadata,
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector},
            "template": template,
        }}),
    )
}

/// A short digest of a pod template (std's SipHash with fixed keys, as the
/// config hash: an operator built with another Rust release may name the
/// same template differently, which costs one drained rollout).
fn revision(template: &Value) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    template.to_string().hash(&mut hasher);
    format!("{:010x}", hasher.finish() >> 24)
}

/// The comet pods' grace period: the drain deadline plus a margin, rounded
/// up to whole [`GRACE_STEP_SECS`], so that a deadline change within the
/// step changes no pod template (the comets read the deadline live from the
/// node list); only a deadline that outgrows the grace rolls them. A comet
/// exits on its own once drained or at its deadline, so a longer grace
/// never delays it; it only bounds a comet that hangs.
fn grace_period(deadline_seconds: i64) -> i64 {
    let needed = deadline_seconds.max(0) + TERMINATION_MARGIN_SECS;
    (needed + GRACE_STEP_SECS - 1) / GRACE_STEP_SECS * GRACE_STEP_SECS
}

/// See [`grace_period`].
const GRACE_STEP_SECS: i64 = 300;

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
    let (secure, mounts, volumes) = backend_security(spec, true);
    env.extend(secure);
    let mut extra = json!({"serviceAccountName": names.service_account()});
    if !volumes.is_empty() {
        extra["volumes"] = Value::Array(volumes);
    }
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
                format!("--client-addr=$(POD_IP):{}", ports.client),
                format!("--client-auth={}", spec.logic.client_auth.as_str()),
                format!("--node-list-configmap={}", names.nodes()),
            ],
            env,
            ports: vec![
                ("http", ports.http),
                ("grpc", ports.grpc),
                ("client", ports.client),
            ],
            http_port: ports.http,
            resources: spec.logic.resources.as_ref(),
            pod: &spec.logic.pod,
            spread: None,
            mounts,
        },
        extra,
    )
}

pub(super) fn job_deployment(
    names: &Names,
    spec: &PushClusterSpec,
    config_hash: &str,
) -> Result<Deployment> {
    let (env, mounts, volumes) = backend_security(spec, false);
    let mut extra = json!({"serviceAccountName": names.service_account()});
    if !volumes.is_empty() {
        extra["volumes"] = Value::Array(volumes);
    }
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
            env,
            ports: vec![("http", JOB_HTTP_PORT)],
            http_port: JOB_HTTP_PORT,
            resources: spec.job.resources.as_ref(),
            pod: &spec.job.pod,
            spread: None,
            mounts,
        },
        extra,
    )
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};
    use serde_json::json;

    use super::super::tests::cluster;
    use super::super::{Names, children};
    use super::*;
    use crate::crd::{LOG_FORMAT_ENV, PushCluster};

    fn built(cluster: &PushCluster) -> super::super::Children {
        let names = Names::of(cluster).unwrap();
        children(&names, &cluster.spec, 1, "chat-logic").unwrap()
    }

    fn template(deployment: &Deployment) -> &PodTemplateSpec {
        &deployment.spec.as_ref().unwrap().template
    }

    fn pod(deployment: &Deployment) -> &PodSpec {
        template(deployment).spec.as_ref().unwrap()
    }

    fn main(deployment: &Deployment) -> &Container {
        &pod(deployment).containers[0]
    }

    /// `cluster()` with `settings` merged into each of comet, logic and job.
    fn with_pod_settings(top: Value, settings: Value) -> PushCluster {
        let mut value = serde_json::to_value(cluster()).unwrap();
        for (key, member) in top.as_object().unwrap() {
            value["spec"][key] = member.clone();
        }
        for component in ["comet", "logic", "job"] {
            let spec = &mut value["spec"][component];
            if spec.is_null() {
                *spec = json!({});
            }
            for (key, member) in settings.as_object().unwrap() {
                spec[key] = member.clone();
            }
        }
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn unset_pod_settings_get_restricted_defaults_and_spread_comets() {
        let children = built(&cluster());
        for deployment in &children.workloads() {
            let role = deployment.metadata.name.as_deref().unwrap();
            let pod = pod(deployment);
            let security = json!(pod.security_context.as_ref().unwrap());
            assert_eq!(security, default_pod_security(), "{role}");
            assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
            assert_eq!(security["runAsNonRoot"], true);
            let container = main(deployment);
            let security = json!(container.security_context.as_ref().unwrap());
            assert_eq!(security["allowPrivilegeEscalation"], false, "{role}");
            assert_eq!(security["readOnlyRootFilesystem"], true, "{role}");
            assert_eq!(security["capabilities"]["drop"], json!(["ALL"]), "{role}");
            assert_eq!(container.args.as_ref().unwrap()[1], "--log-format=json");
            assert_eq!(container.image_pull_policy, None);
            assert_eq!(pod.image_pull_secrets, None);
            assert_eq!(pod.node_selector, None);
            assert_eq!(pod.affinity, None);
            assert_eq!(pod.tolerations, None);
        }
        let workloads = children.workloads();
        let spread = pod(&workloads[0])
            .topology_spread_constraints
            .as_ref()
            .unwrap();
        assert_eq!(spread.len(), 1);
        let spread = &spread[0];
        assert_eq!(
            (
                spread.max_skew,
                spread.topology_key.as_str(),
                spread.when_unsatisfiable.as_str()
            ),
            (1, "kubernetes.io/hostname", "ScheduleAnyway")
        );
        let selector = spread.label_selector.as_ref().unwrap();
        assert_eq!(
            selector.match_labels.as_ref().unwrap()["app.kubernetes.io/component"],
            "comet"
        );
        for deployment in &children.workloads()[1..] {
            assert_eq!(pod(deployment).topology_spread_constraints, None);
        }
        for service in &children.services {
            assert_eq!(service.metadata.annotations, None);
        }
    }

    #[test]
    fn every_pod_setting_lands_in_each_deployment() {
        let cluster = with_pod_settings(
            json!({"imagePullPolicy": "Always", "imagePullSecrets": [{"name": "registry"}],
                   "logFormat": "text"}),
            json!({
                "podLabels": {"team": "push", "app.kubernetes.io/component": "stolen"},
                "podAnnotations": {"prometheus.io/scrape": "true",
                                   "herald.dev/config-hash": "stolen"},
                "nodeSelector": {"pool": "push"},
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [
                        {"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
                "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "push",
                                 "effect": "NoSchedule"}],
                "topologySpreadConstraints": [{"maxSkew": 2,
                    "topologyKey": "topology.kubernetes.io/zone",
                    "whenUnsatisfiable": "DoNotSchedule"}],
                "podSecurityContext": {"runAsUser": 1000, "fsGroup": 2000},
                "securityContext": {"privileged": false, "readOnlyRootFilesystem": false},
                "env": [{"name": "RUST_BACKTRACE", "value": "1"},
                        {"name": "HERALD_KAFKA_TOPIC", "value": "stolen"},
                        {"name": "TZ", "value": "UTC"}]
            }),
        );
        let children = built(&cluster);
        for deployment in &children.workloads() {
            let role = deployment.metadata.name.as_deref().unwrap();
            // The comet ReplicaSet is named after its revision too.
            let component = role.trim_start_matches("chat-").split('-').next().unwrap();
            let meta = template(deployment).metadata.as_ref().unwrap();
            let labels = meta.labels.as_ref().unwrap();
            assert_eq!(labels["team"], "push", "{role}");
            assert_eq!(labels["app.kubernetes.io/component"], component);
            let annotations = meta.annotations.as_ref().unwrap();
            assert_eq!(annotations["prometheus.io/scrape"], "true");
            assert_ne!(annotations[CONFIG_HASH], "stolen");
            let pod = pod(deployment);
            assert_eq!(pod.node_selector.as_ref().unwrap()["pool"], "push");
            let affinity = json!(pod.affinity.as_ref().unwrap());
            assert_eq!(
                affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
                    [0]["matchExpressions"][0]["values"],
                json!(["a"])
            );
            let tolerations = pod.tolerations.as_ref().unwrap();
            assert_eq!(tolerations[0].key.as_deref(), Some("dedicated"));
            let spread = pod.topology_spread_constraints.as_ref().unwrap();
            assert_eq!(
                spread.len(),
                1,
                "{role}: the given spread replaces the default"
            );
            assert_eq!(spread[0].topology_key, "topology.kubernetes.io/zone");
            let security = pod.security_context.as_ref().unwrap();
            assert_eq!(
                (security.run_as_user, security.fs_group),
                (Some(1000), Some(2000))
            );
            assert_eq!(security.run_as_non_root, None, "replaced whole, not merged");
            assert_eq!(pod.image_pull_secrets.as_ref().unwrap()[0].name, "registry");
            let container = main(deployment);
            assert_eq!(container.image_pull_policy.as_deref(), Some("Always"));
            let security = container.security_context.as_ref().unwrap();
            assert_eq!(security.read_only_root_filesystem, Some(false));
            assert_eq!(security.capabilities, None);
            assert_eq!(container.args.as_ref().unwrap()[1], "--log-format=text");
            let env: Vec<_> = container.env.as_ref().unwrap().iter().collect();
            let names: Vec<_> = env.iter().map(|e| e.name.as_str()).collect();
            assert!(names.ends_with(&["RUST_BACKTRACE", "TZ"]), "{names:?}");
            assert!(!names.contains(&"HERALD_KAFKA_TOPIC"), "{names:?}");
        }
    }

    #[test]
    fn empty_spread_turns_the_comet_default_off() {
        let cluster = with_pod_settings(json!({}), json!({"topologySpreadConstraints": []}));
        let children = built(&cluster);
        assert_eq!(
            pod(&children.workloads()[0]).topology_spread_constraints,
            None
        );
    }

    #[test]
    fn service_annotations_land_on_comet_and_logic_services() {
        let mut cluster = cluster();
        cluster.spec.comet.service_annotations = BTreeMap::from([(
            "service.beta.kubernetes.io/aws-load-balancer-type".to_owned(),
            "nlb".to_owned(),
        )]);
        cluster.spec.logic.service_annotations =
            BTreeMap::from([("internal".to_owned(), "true".to_owned())]);
        let children = built(&cluster);
        let annotations = |name: &str| {
            children
                .services
                .iter()
                .find(|s| s.metadata.name.as_deref() == Some(name))
                .unwrap()
                .metadata
                .annotations
                .clone()
        };
        assert_eq!(
            annotations("chat-comet").unwrap()["service.beta.kubernetes.io/aws-load-balancer-type"],
            "nlb"
        );
        assert_eq!(annotations("chat-logic").unwrap()["internal"], "true");
        assert_eq!(annotations("chat-comet-grpc"), None);
        let labels = children.services[0].metadata.labels.as_ref().unwrap();
        assert_eq!(labels["app.kubernetes.io/managed-by"], "herald-operator");
    }

    /// `env` may not name what the operator sets: every variable the built
    /// containers get, directly or through the config ConfigMap, is in
    /// `OPERATOR_ENV` (which the CRD's rule and the filter above read).
    #[test]
    fn operator_env_lists_every_variable_the_operator_sets() {
        let mut cluster = cluster();
        cluster.spec.redis.password_secret_ref = Some(SecretKeyRef {
            name: "redis".to_owned(),
            key: "password".to_owned(),
        });
        cluster.spec.auth.jwt_secret_ref = cluster.spec.redis.password_secret_ref.clone();
        let children = built(&cluster);
        let mut set: Vec<String> = children.config.data.clone().unwrap().into_keys().collect();
        for deployment in &children.workloads() {
            set.extend(
                main(deployment)
                    .env
                    .iter()
                    .flatten()
                    .map(|e| e.name.clone()),
            );
        }
        set.push(LOG_FORMAT_ENV.to_owned());
        for name in &set {
            assert!(
                OPERATOR_ENV.contains(&name.as_str()),
                "{name} is not in OPERATOR_ENV"
            );
        }
        assert!(set.iter().any(|n| n == contract::JWT_SECRET));
    }
}
