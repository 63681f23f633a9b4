//! The `PushCluster` custom resource (`herald.dev/v1alpha1`): the Rust types are
//! the source of the CRD (`herald crdgen`), so doc comments here become the
//! schema descriptions users see in `kubectl explain`.
//!
//! Admission refuses what a schema or CEL rule can express (negative counts,
//! `min > max`, unknown auth modes); everything else that can be wrong (a
//! missing Secret) is reported by the controller as a `Degraded` condition.
//!
//! The spec types are here; the status types are in `status`.

// kube's `KubeSchema` derive declares helper copies of the types in a private
// scope, which trips `unreachable_pub` on every deriving struct; and clippy
// reads repeated `printcolumn(type_ = ..)` arguments as duplicated attributes.
#![allow(unreachable_pub, clippy::duplicated_attributes)]

mod pod;
mod status;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::LocalObjectReference;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use self::pod::{LOG_FORMAT_ENV, LogFormat, MAX_ENV, OPERATOR_ENV, PodTemplate, PullPolicy};
pub use self::status::{CometPodStatus, ComponentStatus, Condition, PushClusterStatus};

/// A Herald push cluster: comet, logic and job deployments, scaled by live
/// client connections and described to clients through a node list.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "herald.dev",
    version = "v1alpha1",
    kind = "PushCluster",
    plural = "pushclusters",
    shortname = "pushc",
    category = "herald",
    namespaced,
    status = "PushClusterStatus",
    scale(
        spec_replicas_path = ".spec.comet.replicas",
        status_replicas_path = ".status.comet.readyReplicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Available\")].status",
        description = "Whether every component has its desired replicas ready"
    ),
    printcolumn(
        name = "Comets",
        type_ = "string",
        json_path = ".status.cometsReady",
        description = "Ready comets / desired comets"
    ),
    printcolumn(
        name = "Updated",
        type_ = "string",
        json_path = ".status.updatedComets",
        description = "Comets on the current pod template / desired comets"
    ),
    printcolumn(
        name = "Connections",
        type_ = "integer",
        json_path = ".status.totalConnections",
        description = "Client connections across all comets"
    ),
    printcolumn(
        name = "Draining",
        type_ = "integer",
        json_path = ".status.drainingComets",
        description = "Comets being drained before removal"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PushClusterSpec {
    /// Container image that holds the `herald` binary; every component runs it
    /// with its role as the first argument.
    #[x_kube(validation = Rule::new("self != ''").message("image must not be empty"))]
    pub image: String,
    /// Pull policy of every container; unset, Kubernetes decides (`Always`
    /// for a `:latest` tag, else `IfNotPresent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// Secrets (in the PushCluster's namespace) for pulling `image`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "pod::kubernetes_schema::<Vec<LocalObjectReference>>")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// Log format of every component (`json` or `text`).
    #[serde(default)]
    pub log_format: LogFormat,
    /// Comets hold client connections.
    #[serde(default)]
    pub comet: CometSpec,
    /// Logic serves the HTTP push API and the gRPC service comets call.
    #[serde(default)]
    pub logic: LogicSpec,
    /// Job consumes push records from Kafka and delivers them to comets.
    #[serde(default)]
    pub job: JobSpec,
    /// Redis that keeps routing (which comet holds which key).
    pub redis: RedisSpec,
    /// Kafka that carries push records from logic to job.
    pub kafka: KafkaSpec,
    /// What the node list hands out to clients.
    #[serde(default)]
    pub node_list: NodeListSpec,
    /// How client tokens and the HTTP push API are authenticated.
    #[serde(default)]
    pub auth: AuthSpec,
    /// The NetworkPolicies that lock the internal ports down.
    #[serde(default)]
    pub network_policy: NetworkPolicySpec,
}

/// Comet deployment settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CometSpec {
    /// Desired comet replicas; also what `/scale` (an HPA or KEDA) reads and
    /// writes. With autoscaling enabled the operator sets it itself.
    #[serde(default = "one")]
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// Connection-based autoscaling done by the operator.
    #[serde(default)]
    pub autoscaling: AutoscalingSpec,
    /// How a comet is emptied before it is removed.
    #[serde(default)]
    pub drain: DrainSpec,
    /// How a change of the comet pod template reaches the running comets.
    #[serde(default)]
    pub rollout: RolloutSpec,
    /// WebSocket over TLS on `ports.wss`, with the certificate of a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<CometTls>,
    /// Container ports.
    #[serde(default)]
    pub ports: CometPorts,
    /// Type of the Service in front of the client ports.
    #[serde(default)]
    pub service_type: ServiceType,
    /// Annotations of that Service, e.g. a cloud load balancer's settings.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub service_annotations: BTreeMap<String, String>,
    /// CPU and memory requests and limits of the comet container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Pod-template settings of the comet pods.
    #[serde(flatten)]
    pub pod: PodTemplate,
}

impl CometSpec {
    /// The WSS port clients are told of: `ports.wss` when comets serve TLS
    /// (`tls` set), else 0, so no client is sent to a port nothing serves.
    pub fn advertised_wss_port(&self) -> i32 {
        self.tls.as_ref().map_or(0, |_| self.ports.wss)
    }
}

impl Default for CometSpec {
    fn default() -> Self {
        Self {
            replicas: 1,
            autoscaling: AutoscalingSpec::default(),
            drain: DrainSpec::default(),
            rollout: RolloutSpec::default(),
            tls: None,
            ports: CometPorts::default(),
            service_type: ServiceType::default(),
            service_annotations: BTreeMap::new(),
            resources: None,
            pod: PodTemplate::default(),
        }
    }
}

/// Scale comets by live connections: `ceil(total / target)` clamped to
/// `[minReplicas, maxReplicas]`; up at once, down only after the window.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("minReplicas must not exceed maxReplicas"))]
pub struct AutoscalingSpec {
    /// Off by default: then `replicas` (or an HPA through `/scale`) decides.
    #[serde(default)]
    pub enabled: bool,
    /// Fewest comets kept.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub min_replicas: i32,
    /// Most comets run.
    #[serde(default = "ten")]
    #[schemars(range(min = 1))]
    pub max_replicas: i32,
    /// Connections one comet should hold on average.
    #[serde(default = "default_target")]
    #[schemars(range(min = 1))]
    pub target_connections_per_replica: i64,
    /// A lower replica count must be wanted for this long before a comet is
    /// drained, so that a short dip does not move clients around.
    #[serde(default = "default_stabilization")]
    #[schemars(range(min = 0))]
    pub scale_down_stabilization_seconds: i64,
}

impl Default for AutoscalingSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            min_replicas: 1,
            max_replicas: 10,
            target_connections_per_replica: default_target(),
            scale_down_stabilization_seconds: default_stabilization(),
        }
    }
}

/// How a comet is drained (by the operator before a scale-down, and by the
/// comet itself on SIGTERM).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainSpec {
    /// Every connection is closed by then; the pod's grace period covers it.
    #[serde(default = "default_drain_deadline")]
    #[schemars(range(min = 1, max = 3600))]
    pub deadline_seconds: i64,
    /// Connections closed per second; 0 spreads them over the deadline.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub close_rate: i32,
}

impl Default for DrainSpec {
    fn default() -> Self {
        Self {
            deadline_seconds: default_drain_deadline(),
            close_rate: 0,
        }
    }
}

/// The comets' TLS certificate: a Secret of type `kubernetes.io/tls`
/// (keys `tls.crt`, `tls.key`), as cert-manager writes it. Comets serve WSS
/// on `ports.wss` with it and pick up a renewed one without a restart.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CometTls {
    /// The Secret's name, in the PushCluster's namespace.
    #[x_kube(validation = Rule::new("self != ''").message("comet.tls.secretName must not be empty"))]
    pub secret_name: String,
}

/// How comets move to a new pod template (image, resources, settings).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// `Drain` (the default): the operator rolls comets itself, one at a
    /// time: a new comet first, then the oldest drained onto it, removed
    /// once empty. `Deployment`: a plain Deployment rolling update (comets
    /// are stopped on Kubernetes' schedule and drain on SIGTERM, several
    /// at once). Switching from `Deployment` to `Drain` is itself a drained
    /// rollout; the other way replaces the comets at once.
    #[serde(default)]
    pub strategy: RolloutStrategy,
    /// A new comet not Ready this long after it was created stops the
    /// rollout (`Degraded`, reason `RolloutStuck`); the old comets keep
    /// serving until the spec changes again.
    #[serde(default = "default_progress_deadline")]
    #[schemars(range(min = 1))]
    pub progress_deadline_seconds: i64,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            strategy: RolloutStrategy::default(),
            progress_deadline_seconds: default_progress_deadline(),
        }
    }
}

/// See [`RolloutSpec::strategy`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RolloutStrategy {
    /// One comet at a time, surge first, drained before removal.
    #[default]
    Drain,
    /// A plain Deployment rolling update.
    Deployment,
}

fn default_progress_deadline() -> i64 {
    600
}

/// Comet container ports (goim's defaults).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CometPorts {
    /// Raw TCP clients.
    #[serde(default = "port_tcp")]
    #[schemars(range(min = 1, max = 65535))]
    pub tcp: i32,
    /// WebSocket clients.
    #[serde(default = "port_ws")]
    #[schemars(range(min = 1, max = 65535))]
    pub ws: i32,
    /// WebSocket-over-TLS clients.
    #[serde(default = "port_wss")]
    #[schemars(range(min = 1, max = 65535))]
    pub wss: i32,
    /// gRPC: goim.comet.Comet (job) and herald.admin.v1.CometAdmin (operator).
    #[serde(default = "port_comet_grpc")]
    #[schemars(range(min = 1, max = 65535))]
    pub grpc: i32,
    /// HTTP `/metrics`, `/healthz`, `/readyz`.
    #[serde(default = "port_comet_admin")]
    #[schemars(range(min = 1, max = 65535))]
    pub admin: i32,
}

impl Default for CometPorts {
    fn default() -> Self {
        Self {
            tcp: port_tcp(),
            ws: port_ws(),
            wss: port_wss(),
            grpc: port_comet_grpc(),
            admin: port_comet_admin(),
        }
    }
}

/// Kubernetes Service types for the Services clients reach (comet's client
/// ports, logic's client port).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    /// Reachable inside the cluster only.
    #[default]
    ClusterIP,
    /// A port on every node.
    NodePort,
    /// An external load balancer.
    LoadBalancer,
}

impl ServiceType {
    /// The value Kubernetes expects in `Service.spec.type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIP => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Logic deployment settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LogicSpec {
    /// Logic replicas.
    #[serde(default = "one")]
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// CPU and memory requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Container ports.
    #[serde(default)]
    pub ports: LogicPorts,
    /// Annotations of the logic Service.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub service_annotations: BTreeMap<String, String>,
    /// Who may read the client port (`ports.client`: the node list and room
    /// counts, never pushes): `none`, anyone who reaches it; `token`, a
    /// client token as `Authorization: Bearer`, checked like a connect token
    /// (`auth.mode`). The push API key is never asked for there.
    #[serde(default)]
    pub client_auth: ClientAuthMode,
    /// Type of Service `<cluster>-logic-client` in front of the client port,
    /// the one clients and browsers may be given.
    #[serde(default)]
    pub client_service_type: ServiceType,
    /// Annotations of Service `<cluster>-logic-client`, e.g. a cloud load
    /// balancer's settings.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub client_service_annotations: BTreeMap<String, String>,
    /// Pod-template settings of the logic pods.
    #[serde(flatten)]
    pub pod: PodTemplate,
}

impl Default for LogicSpec {
    fn default() -> Self {
        Self {
            replicas: 1,
            resources: None,
            ports: LogicPorts::default(),
            service_annotations: BTreeMap::new(),
            client_auth: ClientAuthMode::default(),
            client_service_type: ServiceType::default(),
            client_service_annotations: BTreeMap::new(),
            pod: PodTemplate::default(),
        }
    }
}

/// Logic container ports.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.client != self.http && self.client != self.grpc && self.http != self.grpc").message("logic ports http, grpc and client must differ"))]
pub struct LogicPorts {
    /// HTTP push API plus `/healthz`, `/readyz`, `/metrics`.
    #[serde(default = "port_logic_http")]
    #[schemars(range(min = 1, max = 65535))]
    pub http: i32,
    /// goim.logic.Logic gRPC, called by comets.
    #[serde(default = "port_logic_grpc")]
    #[schemars(range(min = 1, max = 65535))]
    pub grpc: i32,
    /// Client-facing reads (`GET /goim/nodes/weighted`,
    /// `GET /goim/online/room`, CORS), without the API key; served by
    /// Service `<cluster>-logic-client`.
    #[serde(default = "port_logic_client")]
    #[schemars(range(min = 1, max = 65535))]
    pub client: i32,
}

impl Default for LogicPorts {
    fn default() -> Self {
        Self {
            http: port_logic_http(),
            grpc: port_logic_grpc(),
            client: port_logic_client(),
        }
    }
}

/// Authentication of logic's client port.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuthMode {
    /// Anyone who reaches the port may read the node list.
    #[default]
    None,
    /// A client token (goim JSON or JWT, per `auth.mode`) is required.
    Token,
}

impl ClientAuthMode {
    /// The value of logic's `--client-auth`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Token => "token",
        }
    }
}

/// Job deployment settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobSpec {
    /// Job replicas (Kafka consumers in one group).
    #[serde(default = "one")]
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// CPU and memory requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Pod-template settings of the job pods.
    #[serde(flatten)]
    pub pod: PodTemplate,
}

impl Default for JobSpec {
    fn default() -> Self {
        Self {
            replicas: 1,
            resources: None,
            pod: PodTemplate::default(),
        }
    }
}

/// Container resources as Kubernetes quantities, e.g. `{"cpu": "500m", "memory": "256Mi"}`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct Resources {
    /// Guaranteed amounts.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, String>,
    /// Upper bounds.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, String>,
}

/// Redis connection.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisSpec {
    /// `host:port` of the Redis server.
    #[x_kube(validation = Rule::new("self != ''").message("redis.addr must not be empty"))]
    pub addr: String,
    /// Secret key holding the Redis password, if it needs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    /// Secret key holding the Redis ACL user name (default user without).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_secret_ref: Option<SecretKeyRef>,
    /// Connect over TLS (`rediss://`).
    #[serde(default)]
    pub tls: bool,
    /// Secret key holding the PEM CA certificate(s) Redis's certificate is
    /// signed by, when not a public CA (mounted as a file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
}

/// Kafka connection and names.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSpec {
    /// Bootstrap brokers, `host:port` each.
    #[schemars(length(min = 1))]
    pub brokers: Vec<String>,
    /// Topic of push records (goim's default name).
    #[serde(default = "default_topic")]
    #[x_kube(validation = Rule::new("self != ''").message("kafka.topic must not be empty"))]
    pub topic: String,
    /// Consumer group of the job replicas.
    #[serde(default = "default_group")]
    #[x_kube(validation = Rule::new("self != ''").message("kafka.group must not be empty"))]
    pub group: String,
    /// `security.protocol` towards the brokers.
    #[serde(default)]
    pub security_protocol: KafkaSecurityProtocol,
    /// SASL mechanism (with `SASL_PLAINTEXT` / `SASL_SSL`).
    #[serde(default)]
    pub sasl_mechanism: KafkaSaslMechanism,
    /// Secret key holding the SASL user name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_secret_ref: Option<SecretKeyRef>,
    /// Secret key holding the SASL password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    /// Secret key holding the PEM CA certificate(s) of the brokers
    /// (`SSL` / `SASL_SSL`), when not a public CA (mounted as a file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
}

/// Kafka's `security.protocol`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum KafkaSecurityProtocol {
    /// No TLS, no SASL.
    #[default]
    Plaintext,
    /// TLS.
    Ssl,
    /// SASL without TLS.
    SaslPlaintext,
    /// SASL over TLS.
    SaslSsl,
}

impl KafkaSecurityProtocol {
    /// The value of `--kafka-security-protocol`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plaintext => "PLAINTEXT",
            Self::Ssl => "SSL",
            Self::SaslPlaintext => "SASL_PLAINTEXT",
            Self::SaslSsl => "SASL_SSL",
        }
    }
}

/// Kafka SASL mechanisms Herald speaks.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum KafkaSaslMechanism {
    /// PLAIN (use it over TLS only).
    #[serde(rename = "PLAIN")]
    Plain,
    /// SCRAM-SHA-256.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM-SHA-512 (the roles' default too).
    #[default]
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl KafkaSaslMechanism {
    /// The value of `--kafka-sasl-mechanism`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// What logic hands to clients asking for nodes (`/goim/nodes/*`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeListSpec {
    /// Host name web clients use; empty hands out pod addresses only.
    #[serde(default)]
    pub domain: String,
    /// How many nodes one answer lists.
    #[serde(default = "default_node_count")]
    #[schemars(range(min = 1, max = 100))]
    pub count: i32,
    /// Heartbeat interval advertised to clients, in seconds.
    #[serde(default = "default_heartbeat")]
    #[schemars(range(min = 1))]
    pub heartbeat: i32,
    /// Reconnect backoff advertised to clients, in seconds.
    #[serde(default = "default_backoff")]
    #[schemars(range(min = 1))]
    pub backoff: i32,
}

impl Default for NodeListSpec {
    fn default() -> Self {
        Self {
            domain: String::new(),
            count: default_node_count(),
            heartbeat: default_heartbeat(),
            backoff: default_backoff(),
        }
    }
}

/// Token checking and HTTP API protection.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mode != 'jwt' || has(self.jwtSecretRef)").message("auth.mode jwt needs auth.jwtSecretRef"))]
pub struct AuthSpec {
    /// `goim`: goim's unverified JSON tokens; `jwt`: HS256-signed tokens.
    #[serde(default)]
    pub mode: AuthMode,
    /// Secret key with the HS256 secret (mode `jwt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_secret_ref: Option<SecretKeyRef>,
    /// Secret key with the HTTP push API key; without it the operator
    /// generates one in Secret `<name>-api-key` (key `api-key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,
    /// Comet, logic and job require a shared token on their gRPC ports
    /// (generated once in Secret `<name>-grpc-token`, key `token`; the
    /// operator's own calls carry it too). On by default; turn it off only
    /// for a cluster that mixes in goim's own components, which send none.
    #[serde(default = "yes")]
    pub grpc_token: bool,
}

impl Default for AuthSpec {
    fn default() -> Self {
        Self {
            mode: AuthMode::default(),
            jwt_secret_ref: None,
            api_key_secret_ref: None,
            grpc_token: true,
        }
    }
}

fn yes() -> bool {
    true
}

/// The NetworkPolicies the operator writes (they need a network plugin
/// that enforces them).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// On by default: comet's gRPC port only from job and the operator,
    /// logic's gRPC port only from comets, logic's HTTP port (push API,
    /// `/metrics`) only from `httpFromNamespaces`; client ports open.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Namespaces whose pods may call logic's HTTP port (the push API and
    /// `/metrics`): the backends that push, Prometheus, `helm test`. The
    /// cluster's own namespace always may.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_from_namespaces: Vec<String>,
    /// Labels of the operator's pods (any namespace), allowed to comet's
    /// gRPC port (load polls, drains) and logic's HTTP port (readiness).
    #[serde(default = "operator_pod_labels")]
    pub operator_pod_labels: BTreeMap<String, String>,
}

impl Default for NetworkPolicySpec {
    fn default() -> Self {
        Self {
            enabled: true,
            http_from_namespaces: Vec::new(),
            operator_pod_labels: operator_pod_labels(),
        }
    }
}

/// The chart's operator pods.
fn operator_pod_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "herald".to_owned()),
        (
            "app.kubernetes.io/component".to_owned(),
            "operator".to_owned(),
        ),
    ])
}

/// Known token modes; anything else is refused at admission.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// goim-compatible unverified JSON tokens.
    #[default]
    Goim,
    /// HS256-signed JWT tokens.
    Jwt,
}

impl AuthMode {
    /// The value of logic's `--token-mode`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Goim => "goim",
            Self::Jwt => "jwt",
        }
    }
}

/// One key of a Secret in the PushCluster's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
pub struct SecretKeyRef {
    /// Secret name.
    #[x_kube(validation = Rule::new("self != ''").message("secret name must not be empty"))]
    pub name: String,
    /// Key inside the Secret.
    #[x_kube(validation = Rule::new("self != ''").message("secret key must not be empty"))]
    pub key: String,
}

fn one() -> i32 {
    1
}
fn ten() -> i32 {
    10
}
fn default_target() -> i64 {
    10_000
}
fn default_stabilization() -> i64 {
    300
}
fn default_drain_deadline() -> i64 {
    30
}
fn port_tcp() -> i32 {
    3101
}
fn port_ws() -> i32 {
    3102
}
fn port_wss() -> i32 {
    3103
}
fn port_comet_grpc() -> i32 {
    3109
}
fn port_comet_admin() -> i32 {
    3190
}
fn port_logic_http() -> i32 {
    3111
}
fn port_logic_grpc() -> i32 {
    3119
}
fn port_logic_client() -> i32 {
    3112
}
fn default_topic() -> String {
    "goim-push-topic".to_owned()
}
fn default_group() -> String {
    "goim-push-group-job".to_owned()
}
fn default_node_count() -> i32 {
    2
}
fn default_heartbeat() -> i32 {
    240
}
fn default_backoff() -> i32 {
    5
}

/// The CRD as YAML, exactly what `herald crdgen` prints.
///
/// # Errors
/// Only if serialisation fails, which would be a bug in the types.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&PushCluster::crd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_spec_gets_goim_defaults() {
        let spec: PushClusterSpec = serde_json::from_value(serde_json::json!({
            "image": "herald:dev",
            "redis": {"addr": "redis:6379"},
            "kafka": {"brokers": ["kafka:9092"]}
        }))
        .unwrap();
        assert_eq!(spec.comet.replicas, 1);
        assert_eq!(spec.comet.ports.tcp, 3101);
        assert_eq!(spec.comet.ports.grpc, 3109);
        assert_eq!(spec.logic.ports.http, 3111);
        assert_eq!(spec.logic.ports.client, 3112);
        assert_eq!(spec.logic.client_auth, ClientAuthMode::None);
        assert_eq!(spec.logic.client_service_type, ServiceType::ClusterIP);
        assert!(spec.logic.client_service_annotations.is_empty());
        assert_eq!(spec.kafka.topic, "goim-push-topic");
        assert_eq!(spec.auth.mode, AuthMode::Goim);
    }

    #[test]
    fn pod_settings_sit_in_each_component_and_images_settings_at_the_top() {
        let spec: PushClusterSpec = serde_json::from_value(serde_json::json!({
            "image": "herald:dev", "imagePullPolicy": "Never",
            "imagePullSecrets": [{"name": "registry"}],
            "redis": {"addr": "redis:6379"},
            "kafka": {"brokers": ["kafka:9092"]},
            "comet": {"nodeSelector": {"pool": "push"}, "topologySpreadConstraints": [],
                      "serviceAnnotations": {"lb": "nlb"}},
            "job": {"env": [{"name": "TZ", "value": "UTC"}]}
        }))
        .unwrap();
        assert_eq!(spec.log_format, LogFormat::Json);
        assert_eq!(spec.image_pull_policy, Some(PullPolicy::Never));
        assert_eq!(spec.image_pull_secrets[0].name, "registry");
        assert_eq!(spec.comet.pod.node_selector["pool"], "push");
        assert_eq!(spec.comet.pod.topology_spread_constraints, Some(vec![]));
        assert_eq!(spec.comet.service_annotations["lb"], "nlb");
        assert_eq!(spec.logic.pod, PodTemplate::default());
        assert_eq!(spec.job.pod.env[0].name, "TZ");
        let back = serde_json::to_value(&spec).unwrap();
        assert_eq!(back["comet"]["nodeSelector"]["pool"], "push");
        assert!(back["logic"].get("env").is_none(), "{back}");
    }

    #[test]
    fn crd_refuses_env_the_operator_sets_and_keeps_kubernetes_schemas_short() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(PushCluster::crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        for component in ["comet", "logic", "job"] {
            let env = &spec["properties"][component]["properties"]["env"];
            assert_eq!(env["maxItems"], MAX_ENV, "{component}");
            let rule = &env["items"]["x-kubernetes-validations"][0];
            let text = rule["rule"].as_str().unwrap();
            for name in OPERATOR_ENV {
                assert!(text.contains(&format!("'{name}'")), "{name} in {text}");
            }
            assert!(rule["messageExpression"].is_string(), "{rule}");
            let spread = &spec["properties"][component]["properties"]["topologySpreadConstraints"];
            assert_eq!(spread["items"]["properties"]["maxSkew"]["type"], "integer");
            assert!(
                spread["items"]["properties"]["maxSkew"]
                    .get("description")
                    .is_none()
            );
        }
        let yaml = crd_yaml().unwrap();
        // The limit of `kubectl apply` without --server-side (the
        // last-applied annotation) is 256 KiB.
        assert!(yaml.len() < 200 * 1024, "{} bytes", yaml.len());
    }

    #[test]
    fn crd_carries_scale_cel_and_columns() {
        let yaml = crd_yaml().unwrap();
        assert!(
            yaml.contains("labelSelectorPath: .status.selector"),
            "{yaml}"
        );
        assert!(yaml.contains("specReplicasPath: .spec.comet.replicas"));
        assert!(yaml.contains("self.minReplicas <= self.maxReplicas"));
        assert!(yaml.contains("self.client != self.http && self.client != self.grpc"));
        assert!(yaml.contains("x-kubernetes-validations"));
        for column in ["Ready", "Comets", "Connections", "Draining", "Age"] {
            assert!(yaml.contains(&format!("name: {column}")), "{column}");
        }
    }
}
