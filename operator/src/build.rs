//! Builders: validated spec in, the Kubernetes objects it implies out. Plain
//! functions with no client, so every field of the pod contract is unit-tested.
//!
//! Pod contract (shared with the loopback pod harness): every container runs
//! the `herald` binary with `args: [<role>, ...flags]` and no command; env
//! `POD_IP`, `POD_NAME`, `POD_NAMESPACE` come from the downward API; every
//! listen address is `$(POD_IP):<port>` (kubelet expands it); comet's server id
//! is `$(POD_NAME)`; readiness is `GET /readyz` and liveness `GET /healthz` on
//! the component's HTTP port.
//!
//! The Deployments (pod templates, env, probes) are built in `workloads`;
//! this file holds the names, the other children and their assembly.

mod network;
mod workloads;

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use herald_runtime::contract;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, PodTemplateSpec, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

pub use self::workloads::REVISION_LABEL;
use self::workloads::{
    comet_deployment, comet_replica_set as comet_replica_set_of, job_deployment, logic_deployment,
};
use crate::crd::{PushCluster, PushClusterSpec, RolloutStrategy};

/// Why building failed: only a bug in a builder (a JSON shape that does not
/// match the Kubernetes type) or an object without name/uid.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The PushCluster has no name, namespace or uid yet.
    #[error("the PushCluster has no {0}")]
    MissingMetadata(&'static str),
    /// A builder produced JSON that is not a valid object of its kind.
    #[error("building {kind}")]
    Shape {
        /// The kind being built.
        kind: &'static str,
        /// What serde said.
        #[source]
        source: serde_json::Error,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Grace added to the drain deadline for the pod's termination period, so the
/// kubelet never SIGKILLs a comet that is still closing connections on time.
pub const TERMINATION_MARGIN_SECS: i64 = 15;
/// Port of job's `/healthz`, `/readyz`, `/metrics` (job's `--http-addr` default).
pub const JOB_HTTP_PORT: i32 = 3193;
/// Key of the generated API-key Secret.
pub const API_KEY_KEY: &str = "api-key";
/// Key of the generated gRPC-token Secret.
pub const GRPC_TOKEN_KEY: &str = "token";
/// Key of the node list in its ConfigMap (one name with the readers).
pub use herald_protocol::nodes::CONFIGMAP_KEY as NODES_KEY;
/// Field manager of every server-side apply the operator makes.
pub const MANAGER: &str = "herald-operator";

/// How pods are told the address of a Service the operator made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ServiceAddresses {
    /// `<service>` (resolved by cluster DNS in the pod's namespace): survives
    /// a Service being recreated with another ClusterIP.
    #[default]
    Dns,
    /// The Service's ClusterIP: for clusters without DNS for pods (the
    /// loopback test bed). A recreated Service changes the IP, and the next
    /// reconcile rolls the comet pods onto it.
    ClusterIp,
}

/// Names and owner of one PushCluster's children.
#[derive(Clone, Debug)]
pub struct Names {
    /// The PushCluster's name.
    pub cluster: String,
    /// Its namespace.
    pub namespace: String,
    owner: OwnerReference,
}

impl Names {
    /// Reads name, namespace and the controller owner reference.
    ///
    /// # Errors
    /// [`Error::MissingMetadata`] for an object not yet stored by the apiserver.
    pub fn of(cluster: &PushCluster) -> Result<Self> {
        let name = cluster
            .metadata
            .name
            .clone()
            .ok_or(Error::MissingMetadata("name"))?;
        let namespace = cluster
            .metadata
            .namespace
            .clone()
            .ok_or(Error::MissingMetadata("namespace"))?;
        let owner = cluster
            .controller_owner_ref(&())
            .ok_or(Error::MissingMetadata("uid"))?;
        Ok(Self {
            cluster: name,
            namespace,
            owner,
        })
    }

    /// Deployment and Service of one component: `<cluster>-<component>`.
    pub fn component(&self, component: &str) -> String {
        format!("{}-{component}", self.cluster)
    }
    /// The Service of logic's client port, `<cluster>-logic-client`.
    pub fn logic_client(&self) -> String {
        self.component("logic-client")
    }
    /// The node-list ConfigMap, `<cluster>-nodes`.
    pub fn nodes(&self) -> String {
        self.component("nodes")
    }
    /// The settings ConfigMap, `<cluster>-config`.
    pub fn config(&self) -> String {
        self.component("config")
    }
    /// The generated API-key Secret, `<cluster>-api-key`.
    pub fn api_key(&self) -> String {
        self.component("api-key")
    }
    /// The generated Secret with the internal gRPC token, `<cluster>-grpc-token`.
    pub fn grpc_token(&self) -> String {
        self.component("grpc-token")
    }
    /// ServiceAccount of logic and job, `<cluster>-herald`.
    pub fn service_account(&self) -> String {
        self.component("herald")
    }
    /// Label selector string of one component's pods, as `/scale` reports it.
    pub fn selector(&self, component: &str) -> String {
        self.labels(component)
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect::<Vec<_>>()
            .join(",")
    }
    /// The labels that select one component's pods.
    pub fn labels(&self, component: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app.kubernetes.io/name".to_owned(), "herald".to_owned()),
            (
                "app.kubernetes.io/instance".to_owned(),
                self.cluster.clone(),
            ),
            (
                "app.kubernetes.io/component".to_owned(),
                component.to_owned(),
            ),
        ])
    }

    fn metadata(&self, name: &str, component: &str) -> Value {
        let mut labels = self.labels(component);
        labels.insert(
            "app.kubernetes.io/managed-by".to_owned(),
            MANAGER.to_owned(),
        );
        json!({
            "name": name,
            "namespace": self.namespace,
            "labels": labels,
            "ownerReferences": [self.owner],
        })
    }
}

fn typed<T: DeserializeOwned>(kind: &'static str, value: Value) -> Result<T> {
    serde_json::from_value(value).map_err(|source| Error::Shape { kind, source })
}

/// Every child the operator applies on each pass (the generated API-key Secret
/// is separate: it is created once, never re-applied, so its value is stable).
#[derive(Debug)]
pub struct Children {
    /// logic, job, and comet under `rollout.strategy: Deployment`.
    pub deployments: Vec<Deployment>,
    /// The current revision's comet ReplicaSet under `rollout.strategy:
    /// Drain` (the default).
    pub comet_replica_set: Option<ReplicaSet>,
    /// comet clients, comet gRPC (headless), logic, logic's client port.
    pub services: Vec<Service>,
    /// The settings ConfigMap.
    pub config: ConfigMap,
    /// Identity of logic and job pods.
    pub service_account: ServiceAccount,
    /// Reading the node list.
    pub role: Role,
    /// Binds `role` to `service_account`.
    pub role_binding: RoleBinding,
    /// comet and logic.
    pub pdbs: Vec<PodDisruptionBudget>,
    /// comet, logic and job; none when `networkPolicy.enabled` is off.
    pub network_policies: Vec<NetworkPolicy>,
}

impl Children {
    /// The pod templates of the workloads: comet (its ReplicaSet's or
    /// Deployment's), logic, job.
    pub fn pod_templates(&self) -> Vec<&PodTemplateSpec> {
        self.comet_replica_set
            .iter()
            .filter_map(|rs| rs.spec.as_ref()?.template.as_ref())
            .chain(
                self.deployments
                    .iter()
                    .filter_map(|d| Some(&d.spec.as_ref()?.template)),
            )
            .collect()
    }
}

#[cfg(test)]
impl Children {
    /// comet, logic, job, with the comet ReplicaSet in a Deployment's shape
    /// (same replicas, selector and template), so template tests read one
    /// shape whatever the rollout strategy.
    pub(crate) fn workloads(&self) -> Vec<Deployment> {
        let mut all: Vec<Deployment> = self
            .comet_replica_set
            .iter()
            .map(|rs| {
                let spec = rs.spec.clone().unwrap_or_default();
                Deployment {
                    metadata: rs.metadata.clone(),
                    spec: Some(k8s_openapi::api::apps::v1::DeploymentSpec {
                        replicas: spec.replicas,
                        selector: spec.selector,
                        template: spec.template.unwrap_or_default(),
                        ..Default::default()
                    }),
                    status: None,
                }
            })
            .collect();
        all.extend(self.deployments.iter().cloned());
        all
    }
}

/// Builds every always-applied child. `comet_replicas` is what the comet
/// Deployment gets now: during a scale-down it stays above the spec until the
/// drained comet is empty. `logic_host` is how comet pods name the logic
/// Service: its DNS name ([`Names::component`]), or its ClusterIP where pods
/// have no cluster DNS (see [`ServiceAddresses`]).
///
/// # Errors
/// Only [`Error::Shape`], a bug in a builder.
pub fn children(
    names: &Names,
    spec: &PushClusterSpec,
    comet_replicas: i32,
    logic_host: &str,
) -> Result<Children> {
    let config = config_map(names, spec)?;
    let config_hash = hash_config(&config);
    let mut deployments = Vec::new();
    let mut comet_replica_set = None;
    match spec.comet.rollout.strategy {
        RolloutStrategy::Deployment => deployments.push(comet_deployment(
            names,
            spec,
            comet_replicas,
            &config_hash,
            logic_host,
        )?),
        RolloutStrategy::Drain => {
            comet_replica_set = Some(comet_replica_set_of(
                names,
                spec,
                comet_replicas,
                &config_hash,
                logic_host,
            )?);
        }
    }
    deployments.push(logic_deployment(names, spec, &config_hash)?);
    deployments.push(job_deployment(names, spec, &config_hash)?);
    Ok(Children {
        deployments,
        comet_replica_set,
        services: services(names, spec)?,
        network_policies: network::network_policies(names, spec)?,
        config,
        service_account: typed(
            "ServiceAccount",
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": names.metadata(&names.service_account(), "herald")}),
        )?,
        role: typed(
            "Role",
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                   "metadata": names.metadata(&names.service_account(), "herald"),
                   "rules": [{"apiGroups": [""], "resources": ["configmaps"],
                              "resourceNames": [names.nodes()],
                              "verbs": ["get", "list", "watch"]}]}),
        )?,
        role_binding: typed(
            "RoleBinding",
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                   "metadata": names.metadata(&names.service_account(), "herald"),
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                               "name": names.service_account()},
                   "subjects": [{"kind": "ServiceAccount", "name": names.service_account(),
                                 "namespace": names.namespace}]}),
        )?,
        pdbs: ["comet", "logic"]
            .into_iter()
            .map(|component| {
                typed(
                    "PodDisruptionBudget",
                    json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                           "metadata": names.metadata(&names.component(component), component),
                           "spec": {"maxUnavailable": 1,
                                    "selector": {"matchLabels": names.labels(component)}}}),
                )
            })
            .collect::<Result<_>>()?,
    })
}

/// Non-secret settings, read by every container through `envFrom`; a change
/// rolls the pods because the pod templates carry its hash.
fn config_map(names: &Names, spec: &PushClusterSpec) -> Result<ConfigMap> {
    let data = BTreeMap::from([
        (contract::KAFKA_BROKERS, spec.kafka.brokers.join(",")),
        (contract::KAFKA_TOPIC, spec.kafka.topic.clone()),
        (contract::JOB_GROUP, spec.kafka.group.clone()),
        (contract::TOKEN_MODE, spec.auth.mode.as_str().to_owned()),
        (
            contract::HEARTBEAT_SECS,
            spec.node_list.heartbeat.to_string(),
        ),
        (contract::NODE_DOMAIN, spec.node_list.domain.clone()),
        (contract::NODE_COUNT, spec.node_list.count.to_string()),
        (
            contract::NODE_BACKOFF_SECS,
            spec.node_list.backoff.to_string(),
        ),
    ]);
    typed(
        "ConfigMap",
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": names.metadata(&names.config(), "config"), "data": data}),
    )
}

/// A stable digest of the settings (std's SipHash with fixed keys: stable for
/// one build of the operator, which is all a rollout trigger needs).
fn hash_config(config: &ConfigMap) -> String {
    let mut hasher = std::hash::DefaultHasher::new();
    config.data.hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// The node-list ConfigMap holding `body` (§15.4).
///
/// # Errors
/// Only [`Error::Shape`].
pub fn nodes_config_map(names: &Names, body: &str) -> Result<ConfigMap> {
    typed(
        "ConfigMap",
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": names.metadata(&names.nodes(), "nodes"),
               "data": {NODES_KEY: body}}),
    )
}

/// The API-key Secret generated when the spec references none.
///
/// # Errors
/// Only [`Error::Shape`].
pub fn api_key_secret(names: &Names, key: &str) -> Result<Secret> {
    typed(
        "Secret",
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": names.metadata(&names.api_key(), "api-key"),
               "type": "Opaque", "stringData": {API_KEY_KEY: key}}),
    )
}

/// The generated Secret holding the internal gRPC token (created once,
/// never re-applied, so its value is stable).
///
/// # Errors
/// Only [`Error::Shape`].
pub fn grpc_token_secret(names: &Names, token: &str) -> Result<Secret> {
    typed(
        "Secret",
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": names.metadata(&names.grpc_token(), "grpc-token"),
               "type": "Opaque", "stringData": {GRPC_TOKEN_KEY: token}}),
    )
}

/// `metadata` with `annotations` (none: the member is left out, so a
/// server-side apply does not claim an empty map).
fn with_annotations(mut metadata: Value, annotations: &BTreeMap<String, String>) -> Value {
    if let (Some(metadata), false) = (metadata.as_object_mut(), annotations.is_empty()) {
        metadata.insert("annotations".to_owned(), json!(annotations));
    }
    metadata
}

fn services(names: &Names, spec: &PushClusterSpec) -> Result<Vec<Service>> {
    let comet = &spec.comet.ports;
    let logic = &spec.logic.ports;
    let port = |name: &str, port: i32| json!({"name": name, "port": port, "targetPort": port, "protocol": "TCP"});
    // WSS only where comets serve it.
    let mut comet_ports = vec![port("tcp", comet.tcp), port("ws", comet.ws)];
    if spec.comet.tls.is_some() {
        comet_ports.push(port("wss", comet.wss));
    }
    [
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": with_annotations(names.metadata(&names.component("comet"), "comet"),
                                            &spec.comet.service_annotations),
               "spec": {"type": spec.comet.service_type.as_str(),
                        "selector": names.labels("comet"),
                        "ports": comet_ports}}),
        // Headless: job and the operator reach each comet pod, not a balanced VIP.
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": names.metadata(&names.component("comet-grpc"), "comet"),
               "spec": {"clusterIP": "None", "publishNotReadyAddresses": true,
                        "selector": names.labels("comet"),
                        "ports": [port("grpc", comet.grpc)]}}),
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": with_annotations(names.metadata(&names.component("logic"), "logic"),
                                            &spec.logic.service_annotations),
               "spec": {"selector": names.labels("logic"),
                        "ports": [port("http", logic.http), port("grpc", logic.grpc)]}}),
        // What clients may be given: the node list without the push key.
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": with_annotations(names.metadata(&names.logic_client(), "logic"),
                                            &spec.logic.client_service_annotations),
               "spec": {"type": spec.logic.client_service_type.as_str(),
                        "selector": names.labels("logic"),
                        "ports": [port("client", logic.client)]}}),
    ]
    .into_iter()
    .map(|value| typed("Service", value))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::SecretKeyRef;

    pub(crate) fn cluster() -> PushCluster {
        let mut cluster: PushCluster = serde_json::from_value(json!({
            "apiVersion": "herald.dev/v1alpha1", "kind": "PushCluster",
            "metadata": {"name": "chat", "namespace": "ns", "uid": "u-1"},
            "spec": {"image": "herald:dev", "redis": {"addr": "redis:6379"},
                     "kafka": {"brokers": ["k1:9092", "k2:9092"]},
                     "comet": {"replicas": 3, "drain": {"deadlineSeconds": 40, "closeRate": 100}}}
        }))
        .unwrap();
        cluster.metadata.generation = Some(1);
        cluster
    }

    fn container(deployment: &Deployment) -> &k8s_openapi::api::core::v1::Container {
        &deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
    }

    #[test]
    fn comet_follows_the_pod_contract() {
        let cluster = cluster();
        let names = Names::of(&cluster).unwrap();
        let children = children(&names, &cluster.spec, 4, "chat-logic").unwrap();
        let comet = &children.workloads()[0];
        assert_eq!(comet.spec.as_ref().unwrap().replicas, Some(4));
        let pod = comet.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        // 40 s deadline + 15 s margin, rounded up to the 300 s step: a
        // deadline change within the step rolls no comet.
        assert_eq!(pod.termination_grace_period_seconds, Some(300));
        assert_eq!(pod.service_account_name.as_deref(), Some("chat-herald"));
        let c = container(comet);
        assert_eq!(c.command, None);
        let args = c.args.as_ref().unwrap();
        assert_eq!(args[0], "comet");
        assert!(args.contains(&"--server-id=$(POD_NAME)".to_owned()));
        assert!(args.contains(&"--grpc-addr=$(POD_IP):3109".to_owned()));
        // The drain settings travel in the node list, read live.
        assert!(!args.iter().any(|a| a.starts_with("--drain-")), "{args:?}");
        assert!(args.contains(&"--node-list-configmap=chat-nodes".to_owned()));
        assert!(args.contains(&"--logic-addr=chat-logic:3119".to_owned()));
        for arg in args
            .iter()
            .filter(|a| a.ends_with("-addr") || a.contains("-addr=$"))
        {
            assert!(arg.contains("$(POD_IP):"), "{arg}");
        }
        let env: Vec<_> = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        assert!(env.starts_with(&["POD_IP", "POD_NAME", "POD_NAMESPACE"]));
        let readiness = c
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(readiness.path.as_deref(), Some("/readyz"));
        let owner = &comet.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("PushCluster", Some(true))
        );
    }

    #[test]
    fn logic_gets_secrets_by_reference_and_the_node_list() {
        let mut cluster = cluster();
        cluster.spec.redis.password_secret_ref = Some(SecretKeyRef {
            name: "redis".to_owned(),
            key: "password".to_owned(),
        });
        let names = Names::of(&cluster).unwrap();
        let children = children(&names, &cluster.spec, 1, "chat-logic").unwrap();
        let workloads = children.workloads();
        let logic = container(&workloads[1]);
        let args = logic.args.as_ref().unwrap();
        assert_eq!(args[0], "logic");
        assert!(args.contains(&"--node-list-configmap=chat-nodes".to_owned()));
        let env = logic.env.as_ref().unwrap();
        let url = env.iter().find(|e| e.name == "HERALD_REDIS_URL").unwrap();
        assert_eq!(
            url.value.as_deref(),
            Some("redis://:$(HERALD_REDIS_PASSWORD)@redis:6379")
        );
        let key = env
            .iter()
            .find(|e| e.name == "HERALD_LOGIC_API_KEY")
            .unwrap();
        let secret = key
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(
            (secret.name.as_str(), secret.key.as_str()),
            ("chat-api-key", "api-key")
        );
        let job = container(&workloads[2]);
        assert!(
            job.args
                .as_ref()
                .unwrap()
                .contains(&"--http-addr=$(POD_IP):3193".to_owned())
        );
    }

    #[test]
    fn config_change_changes_the_pod_template_hash() {
        let cluster = cluster();
        let names = Names::of(&cluster).unwrap();
        let hash = |spec: &PushClusterSpec| {
            let children = children(&names, spec, 1, "chat-logic").unwrap();
            children.workloads()[2]
                .spec
                .as_ref()
                .unwrap()
                .template
                .metadata
                .as_ref()
                .unwrap()
                .annotations
                .as_ref()
                .unwrap()["herald.dev/config-hash"]
                .clone()
        };
        let mut other = cluster.spec.clone();
        other.kafka.topic = "other".to_owned();
        assert_eq!(hash(&cluster.spec), hash(&cluster.spec));
        assert_ne!(hash(&cluster.spec), hash(&other));
    }

    #[test]
    fn comets_get_the_logic_host_they_are_given() {
        let cluster = cluster();
        let names = Names::of(&cluster).unwrap();
        let children = children(&names, &cluster.spec, 1, "127.100.0.9").unwrap();
        let args = container(&children.workloads()[0]).args.clone().unwrap();
        assert!(args.contains(&"--logic-addr=127.100.0.9:3119".to_owned()));
        assert!(!args.iter().any(|a| a.contains("chat-logic")));
    }

    #[test]
    fn logic_client_port_gets_its_own_service_and_flags() {
        let service = |children: &Children, name: &str| -> Service {
            children
                .services
                .iter()
                .find(|s| s.metadata.name.as_deref() == Some(name))
                .cloned()
                .unwrap_or_else(|| panic!("no Service {name}"))
        };
        let ports = |service: &Service| -> Vec<(String, i32)> {
            let spec = service.spec.as_ref().unwrap();
            spec.ports
                .iter()
                .flatten()
                .map(|p| (p.name.clone().unwrap_or_default(), p.port))
                .collect()
        };
        // Defaults: ClusterIP on 3112, anyone may read, no annotations.
        let cluster = cluster();
        let names = Names::of(&cluster).unwrap();
        let built = children(&names, &cluster.spec, 1, "chat-logic").unwrap();
        let client = service(&built, "chat-logic-client");
        let spec = client.spec.as_ref().unwrap();
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(spec.selector.as_ref(), Some(&names.labels("logic")));
        assert_eq!(ports(&client), vec![("client".to_owned(), 3112)]);
        assert_eq!(client.metadata.annotations, None);
        // The privileged Service does not expose the client port, nor the
        // client Service the push API.
        let logic = service(&built, "chat-logic");
        assert!(!ports(&logic).iter().any(|(_, p)| *p == 3112));
        let workloads = built.workloads();
        let c = container(&workloads[1]);
        let args = c.args.as_ref().unwrap();
        assert!(args.contains(&"--client-addr=$(POD_IP):3112".to_owned()));
        assert!(args.contains(&"--client-auth=none".to_owned()));
        let container_ports: Vec<_> = c
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
            .collect();
        assert!(container_ports.contains(&("client".to_owned(), 3112)));

        // Everything set, as a user writes it.
        let mut custom = cluster;
        custom.spec.logic = serde_json::from_value(json!({
            "ports": {"client": 4112}, "clientAuth": "token",
            "clientServiceType": "LoadBalancer",
            "clientServiceAnnotations": {"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"}
        }))
        .unwrap();
        let built = children(&names, &custom.spec, 1, "chat-logic").unwrap();
        let client = service(&built, "chat-logic-client");
        assert_eq!(
            client.spec.as_ref().unwrap().type_.as_deref(),
            Some("LoadBalancer")
        );
        assert_eq!(ports(&client), vec![("client".to_owned(), 4112)]);
        assert_eq!(
            client.metadata.annotations.as_ref().unwrap()["service.beta.kubernetes.io/aws-load-balancer-type"],
            "nlb"
        );
        assert_eq!(service(&built, "chat-logic").metadata.annotations, None);
        let args = container(&built.workloads()[1]).args.clone().unwrap();
        assert!(args.contains(&"--client-addr=$(POD_IP):4112".to_owned()));
        assert!(args.contains(&"--client-auth=token".to_owned()));
    }

    #[test]
    fn selector_string_matches_labels() {
        let names = Names::of(&cluster()).unwrap();
        assert_eq!(
            names.selector("comet"),
            "app.kubernetes.io/component=comet,app.kubernetes.io/instance=chat,app.kubernetes.io/name=herald"
        );
    }

    /// Under `Drain` the comets are one ReplicaSet per revision: named and
    /// selected by a digest of the template, the same for the same spec and
    /// another for a new image; under `Deployment`, the comet Deployment.
    #[test]
    fn comet_revisions_follow_the_template() {
        let cluster = cluster();
        let names = Names::of(&cluster).unwrap();
        let built = children(&names, &cluster.spec, 3, "chat-logic").unwrap();
        let rs = built.comet_replica_set.as_ref().unwrap();
        let revision = rs.metadata.labels.as_ref().unwrap()[REVISION_LABEL].clone();
        assert_eq!(revision.len(), 10);
        assert_eq!(
            rs.metadata.name.as_deref(),
            Some(format!("chat-comet-{revision}").as_str())
        );
        let spec = rs.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(3));
        assert_eq!(
            spec.selector.match_labels.as_ref().unwrap()[REVISION_LABEL],
            revision
        );
        let template_labels = spec.template.as_ref().unwrap().metadata.as_ref().unwrap();
        assert_eq!(
            template_labels.labels.as_ref().unwrap()[REVISION_LABEL],
            revision
        );
        assert!(
            built
                .deployments
                .iter()
                .all(|d| d.metadata.name.as_deref() != Some("chat-comet"))
        );

        let again = children(&names, &cluster.spec, 1, "chat-logic").unwrap();
        assert_eq!(
            again.comet_replica_set.unwrap().metadata.name,
            rs.metadata.name,
            "the count is not part of the revision"
        );
        let mut upgraded = cluster.clone();
        upgraded.spec.image = "herald:0.2.0".to_owned();
        let next = children(&names, &upgraded.spec, 3, "chat-logic").unwrap();
        assert_ne!(
            next.comet_replica_set.unwrap().metadata.name,
            rs.metadata.name
        );

        let mut plain = cluster;
        plain.spec.comet.rollout.strategy = RolloutStrategy::Deployment;
        let plain = children(&names, &plain.spec, 3, "chat-logic").unwrap();
        assert!(plain.comet_replica_set.is_none());
        assert_eq!(
            plain.deployments[0].metadata.name.as_deref(),
            Some("chat-comet")
        );
    }

    /// Every role gets the cluster's gRPC token from its generated Secret
    /// (they all serve and call gRPC); turned off, none does.
    #[test]
    fn every_role_gets_the_grpc_token_unless_it_is_off() {
        let mut cluster = cluster();
        let names = Names::of(&cluster).unwrap();
        let token_env = |built: &Children| -> Vec<Option<serde_json::Value>> {
            built
                .workloads()
                .iter()
                .map(|d| {
                    let env = container(d).env.clone().unwrap_or_default();
                    env.iter()
                        .find(|e| e.name == contract::GRPC_TOKEN)
                        .map(|e| json!(e.value_from))
                })
                .collect()
        };
        let built = children(&names, &cluster.spec, 1, "chat-logic").unwrap();
        let want = json!({"secretKeyRef": {"name": "chat-grpc-token", "key": "token"}});
        assert_eq!(token_env(&built), vec![Some(want); 3]);
        let secret = grpc_token_secret(&names, "t0ken").unwrap();
        assert_eq!(secret.metadata.name.as_deref(), Some("chat-grpc-token"));
        assert_eq!(secret.string_data.unwrap()["token"], "t0ken");
        cluster.spec.auth.grpc_token = false;
        let off = children(&names, &cluster.spec, 1, "chat-logic").unwrap();
        assert_eq!(token_env(&off), vec![None; 3]);
    }

    /// `comet.tls`: comets serve WSS from the Secret mounted as files, and
    /// the comet Service exposes the port; without it, neither.
    #[test]
    fn comet_tls_mounts_the_secret_and_opens_wss() {
        let mut cluster = cluster();
        let names = Names::of(&cluster).unwrap();
        let plain = children(&names, &cluster.spec, 1, "chat-logic").unwrap();
        let comet_service = |built: &Children| {
            let svc = built
                .services
                .iter()
                .find(|s| s.metadata.name.as_deref() == Some("chat-comet"))
                .unwrap();
            svc.spec
                .as_ref()
                .unwrap()
                .ports
                .clone()
                .unwrap_or_default()
                .iter()
                .map(|p| p.port)
                .collect::<Vec<_>>()
        };
        assert_eq!(comet_service(&plain), [3101, 3102]);
        let args = container(&plain.workloads()[0]).args.clone().unwrap();
        assert!(
            !args.iter().any(|a| a.starts_with("--wss-addr")),
            "{args:?}"
        );

        cluster.spec.comet.tls = Some(crate::crd::CometTls {
            secret_name: "chat-tls".to_owned(),
        });
        let tls = children(&names, &cluster.spec, 1, "chat-logic").unwrap();
        assert_eq!(comet_service(&tls), [3101, 3102, 3103]);
        let workloads = tls.workloads();
        let comet = container(&workloads[0]);
        let args = comet.args.clone().unwrap();
        for want in [
            "--wss-addr=$(POD_IP):3103",
            "--tls-cert=/etc/herald/tls/tls.crt",
            "--tls-key=/etc/herald/tls/tls.key",
        ] {
            assert!(args.contains(&want.to_owned()), "{want}: {args:?}");
        }
        assert_eq!(
            json!(comet.volume_mounts),
            json!([{"name": "tls", "mountPath": "/etc/herald/tls", "readOnly": true}])
        );
        let pod = workloads[0]
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .clone()
            .unwrap();
        assert_eq!(
            json!(pod.volumes),
            json!([{"name": "tls", "secret": {"secretName": "chat-tls"}}])
        );
        assert!(
            comet
                .ports
                .as_ref()
                .unwrap()
                .iter()
                .any(|p| p.container_port == 3103),
            "wss container port"
        );
        // A new certificate is a new Secret value, not a new template.
        assert_eq!(
            tls.comet_replica_set.as_ref().unwrap().metadata.name,
            children(&names, &cluster.spec, 3, "chat-logic")
                .unwrap()
                .comet_replica_set
                .unwrap()
                .metadata
                .name
        );
        // The Secret's two keys are referenced (a missing one is SecretMissing).
        let refs = crate::validate::referenced_secrets(&cluster.spec);
        assert!(
            refs.iter()
                .any(|r| r.name == "chat-tls" && r.key == "tls.crt")
        );
        assert!(
            refs.iter()
                .any(|r| r.name == "chat-tls" && r.key == "tls.key")
        );
    }

    /// Redis over TLS as an ACL user and Kafka over SASL_SSL: credentials
    /// from their Secrets (never in the template), `rediss://`, the CA keys
    /// mounted as files that the flags name; job gets the Kafka part only.
    #[test]
    fn redis_tls_and_kafka_sasl_come_from_secrets() {
        let mut cluster = cluster();
        let names = Names::of(&cluster).unwrap();
        let key = |name: &str, key: &str| SecretKeyRef {
            name: name.to_owned(),
            key: key.to_owned(),
        };
        cluster.spec.redis.tls = true;
        cluster.spec.redis.username_secret_ref = Some(key("redis", "user"));
        cluster.spec.redis.password_secret_ref = Some(key("redis", "password"));
        cluster.spec.redis.ca_secret_ref = Some(key("redis-ca", "ca.pem"));
        cluster.spec.kafka.security_protocol = crate::crd::KafkaSecurityProtocol::SaslSsl;
        cluster.spec.kafka.sasl_mechanism = crate::crd::KafkaSaslMechanism::ScramSha256;
        cluster.spec.kafka.username_secret_ref = Some(key("kafka", "user"));
        cluster.spec.kafka.password_secret_ref = Some(key("kafka", "password"));
        cluster.spec.kafka.ca_secret_ref = Some(key("kafka-ca", "ca.crt"));
        let built = children(&names, &cluster.spec, 1, "chat-logic").unwrap();
        let workloads = built.workloads();
        let env = |i: usize| -> serde_json::Value { json!(container(&workloads[i]).env) };
        let find = |env: &serde_json::Value, name: &str| {
            env.as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == name)
                .cloned()
                .unwrap_or_default()
        };
        let logic = env(1);
        assert_eq!(
            find(&logic, contract::REDIS_URL)["value"],
            "rediss://:$(HERALD_REDIS_PASSWORD)@redis:6379"
        );
        assert_eq!(
            find(&logic, contract::REDIS_USERNAME)["valueFrom"]["secretKeyRef"],
            json!({"name": "redis", "key": "user"})
        );
        assert_eq!(
            find(&logic, contract::REDIS_CA_FILE)["value"],
            "/etc/herald/ca/redis-ca/ca.crt"
        );
        for role in [1, 2] {
            let env = env(role);
            assert_eq!(
                find(&env, contract::KAFKA_SECURITY_PROTOCOL)["value"],
                "SASL_SSL"
            );
            assert_eq!(
                find(&env, contract::KAFKA_SASL_MECHANISM)["value"],
                "SCRAM-SHA-256"
            );
            assert_eq!(
                find(&env, contract::KAFKA_PASSWORD)["valueFrom"]["secretKeyRef"],
                json!({"name": "kafka", "key": "password"})
            );
            assert_eq!(
                find(&env, contract::KAFKA_CA_FILE)["value"],
                "/etc/herald/ca/kafka-ca/ca.crt"
            );
        }
        let job = env(2);
        assert_eq!(find(&job, contract::REDIS_CA_FILE), serde_json::Value::Null);
        let logic_pod = workloads[1]
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .clone()
            .unwrap();
        assert_eq!(
            json!(logic_pod.volumes),
            json!([
                {"name": "kafka-ca", "secret": {"secretName": "kafka-ca",
                    "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"name": "redis-ca", "secret": {"secretName": "redis-ca",
                    "items": [{"key": "ca.pem", "path": "ca.crt"}]}}
            ])
        );
        assert_eq!(
            json!(container(&workloads[1]).volume_mounts)[1],
            json!({"name": "redis-ca", "mountPath": "/etc/herald/ca/redis-ca", "readOnly": true})
        );
        let refs = crate::validate::referenced_secrets(&cluster.spec);
        for (name, key) in [
            ("redis", "user"),
            ("redis-ca", "ca.pem"),
            ("kafka", "password"),
            ("kafka-ca", "ca.crt"),
        ] {
            assert!(
                refs.iter().any(|r| r.name == name && r.key == key),
                "{name}/{key}"
            );
        }
        // Plaintext Kafka sets nothing (existing clusters keep their template).
        let plain = children(&names, &self::cluster().spec, 1, "chat-logic").unwrap();
        let workloads = plain.workloads();
        let job = json!(container(&workloads[2]).env);
        assert_eq!(
            find(&job, contract::KAFKA_SECURITY_PROTOCOL),
            serde_json::Value::Null
        );
    }
}
