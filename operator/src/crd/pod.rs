//! Pod-template controls every component spec (comet, logic, job) carries,
//! flattened into it (`comet.nodeSelector`, `logic.tolerations`, ...) with the
//! names a Helm chart's values use. Absent fields get the defaults of
//! `build::workloads` (a restricted security context everywhere, comets
//! spread across nodes); a field that is set replaces its default whole.
//!
//! The Kubernetes types come from k8s-openapi with their own schemas, so
//! admission checks their shape as it checks a Deployment's. Their
//! descriptions are left out ([`kubernetes_schema`]): with them the CRD
//! would pass 256 KiB, too big for a client-side `kubectl apply`, and
//! `kubectl explain pod.spec` has them.

use std::collections::BTreeMap;

use herald_runtime::contract;
use k8s_openapi::api::core::v1::{
    Affinity, EnvVar, PodSecurityContext, SecurityContext, Toleration, TopologySpreadConstraint,
};
use kube::core::{Message, Rule};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

/// Environment variables the operator sets on every container (on the
/// container itself, or through the config ConfigMap). `env` may not name
/// them: admission refuses it, and should an object get past an older CRD
/// anyway, the builder leaves such entries out, so the operator's value wins.
pub const OPERATOR_ENV: &[&str] = &[
    contract::POD_IP,
    contract::POD_NAME,
    contract::POD_NAMESPACE,
    contract::REDIS_URL,
    contract::REDIS_PASSWORD,
    contract::JWT_SECRET,
    contract::API_KEY,
    contract::KAFKA_BROKERS,
    contract::KAFKA_TOPIC,
    contract::JOB_GROUP,
    contract::TOKEN_MODE,
    contract::HEARTBEAT_SECS,
    contract::NODE_DOMAIN,
    contract::NODE_COUNT,
    contract::NODE_BACKOFF_SECS,
    contract::NODE_LIST_CONFIGMAP,
    contract::GRPC_TOKEN,
    contract::GRPC_TOKEN_FILE,
    contract::REDIS_USERNAME,
    contract::REDIS_CA_FILE,
    contract::KAFKA_SECURITY_PROTOCOL,
    contract::KAFKA_SASL_MECHANISM,
    contract::KAFKA_USERNAME,
    contract::KAFKA_PASSWORD,
    contract::KAFKA_CA_FILE,
    LOG_FORMAT_ENV,
];

/// The binary's log-format variable; the operator passes `--log-format`
/// (from `spec.logFormat`), which a variable could not override anyway.
pub const LOG_FORMAT_ENV: &str = "HERALD_LOG_FORMAT";

/// Most `env` entries one component takes (keeps the CEL rule's cost bounded).
pub const MAX_ENV: usize = 64;

/// Pod-template settings of one component.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplate {
    /// Labels added to the pods. The operator's `app.kubernetes.io/*`
    /// labels, which select the pods, win over these.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_labels: BTreeMap<String, String>,
    /// Annotations added to the pods (the operator's `herald.dev/config-hash`
    /// wins over one of that name).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,
    /// Node labels the pods must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Node and pod (anti-)affinity of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "kubernetes_schema::<Option<Affinity>>")]
    pub affinity: Option<Affinity>,
    /// Taints the pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "kubernetes_schema::<Vec<Toleration>>")]
    pub tolerations: Vec<Toleration>,
    /// How the pods spread across topology domains. Unset, comets spread
    /// across nodes (`kubernetes.io/hostname`, maxSkew 1, ScheduleAnyway) and
    /// logic and job pods are not constrained; `[]` turns the comet default off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "kubernetes_schema::<Option<Vec<TopologySpreadConstraint>>>")]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
    /// Pod security context. Unset: run as non-root user and group 65532
    /// with the RuntimeDefault seccomp profile (the "restricted" Pod Security
    /// Standard). Set, it replaces that default whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "kubernetes_schema::<Option<PodSecurityContext>>")]
    pub pod_security_context: Option<PodSecurityContext>,
    /// Container security context. Unset: no privilege escalation, every
    /// capability dropped, read-only root filesystem (herald writes no
    /// files). Set, it replaces that default whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "kubernetes_schema::<Option<SecurityContext>>")]
    pub security_context: Option<SecurityContext>,
    /// Extra environment variables, appended after the operator's own. The
    /// ones the operator sets (`POD_*` and the `HERALD_*` variables of the
    /// spec's settings) are refused; flags the operator passes on the command
    /// line win over their variables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "env_schema")]
    pub env: Vec<EnvVar>,
}

/// `Vec<EnvVar>`'s schema, at most [`MAX_ENV`] long, each entry refused
/// when it names one of [`OPERATOR_ENV`].
fn env_schema(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = kubernetes_schema::<Vec<EnvVar>>(generator);
    let names = OPERATOR_ENV
        .iter()
        .map(|name| format!("'{name}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let rule = Rule::new(format!("!(self.name in [{names}])")).message(Message::Expression(
        "'env ' + self.name + ' is set by the operator'".to_owned(),
    ));
    let object = schema.ensure_object();
    object.insert("maxItems".to_owned(), MAX_ENV.into());
    if let Some(items) = object.get_mut("items") {
        let mut items_schema = Schema::try_from(items.take()).unwrap_or_default();
        // Only fails to serialise a Rule, which is plain strings.
        let _ = kube::core::validate(&mut items_schema, rule);
        *items = items_schema.into();
    }
    schema
}

/// `T`'s schema without the descriptions of its members (the field's own
/// doc comment is still added on top).
pub(crate) fn kubernetes_schema<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    // `value` is a schema; the members of its `properties` are schemas named
    // by field (a field may be called "description"), the rest keywords.
    fn strip(value: &mut serde_json::Value) {
        let Some(object) = value.as_object_mut() else {
            return;
        };
        object.remove("description");
        for (keyword, inner) in object.iter_mut() {
            match (keyword.as_str(), inner) {
                ("properties", serde_json::Value::Object(fields)) => {
                    fields.values_mut().for_each(strip);
                }
                (_, serde_json::Value::Array(schemas)) => schemas.iter_mut().for_each(strip),
                (_, schema @ serde_json::Value::Object(_)) => strip(schema),
                _ => {}
            }
        }
    }
    let mut value = T::json_schema(generator).to_value();
    strip(&mut value);
    Schema::try_from(value).unwrap_or_default()
}

/// How the workloads write their logs (`herald --log-format`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line, for log pipelines (the operator's default too).
    #[default]
    Json,
    /// Human-readable lines.
    Text,
}

impl LogFormat {
    /// The value of `--log-format`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Text => "text",
        }
    }
}

/// When the kubelet pulls the image, on every container; unset, Kubernetes
/// decides (`Always` for a `:latest` tag, else `IfNotPresent`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    /// On every container start.
    Always,
    /// Only when the node does not have it.
    IfNotPresent,
    /// Never: the image must be on the node.
    Never,
}

impl PullPolicy {
    /// The value Kubernetes expects in `Container.imagePullPolicy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}
