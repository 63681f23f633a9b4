//! The `PushCluster` status: what the operator observed and did (its
//! conditions, each component's replicas, each comet's load), written only
//! by the operator through the status subresource.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What the operator observed and did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PushClusterStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Available`, `Progressing`, `Degraded`, `Draining`, and with
    /// autoscaling on `AutoscalingOverride`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Comet replicas.
    #[serde(default)]
    pub comet: ComponentStatus,
    /// Logic replicas.
    #[serde(default)]
    pub logic: ComponentStatus,
    /// Job replicas.
    #[serde(default)]
    pub job: ComponentStatus,
    /// `ready/desired` comets, for the printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comets_ready: Option<String>,
    /// Serving comets on the current pod template / desired comets: below
    /// the desired count while a rollout moves comets one by one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_comets: Option<String>,
    /// Client connections across all comets at the last poll.
    #[serde(default)]
    pub total_connections: i64,
    /// Comets being drained.
    #[serde(default)]
    pub draining_comets: i32,
    /// Load of each comet pod at the last poll.
    #[serde(default)]
    pub pods: Vec<CometPodStatus>,
    /// Generation of the node-list ConfigMap (`<name>-nodes`).
    #[serde(default)]
    pub node_list_generation: i64,
    /// The `comet.replicas` the operator last acted on (with autoscaling on,
    /// the count its autoscaler last wrote): a spec that says otherwise is a
    /// new scaling request, with autoscaling on one made by someone else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaled_replicas: Option<i32>,
    /// Label selector of the comet pods (used by `/scale` and HPAs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// When the operator last finished a pass over this cluster (RFC 3339):
    /// written with every status change and at least once a minute, so a
    /// stale value says the operator is not running or not reaching it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reconcile_time: Option<String>,
}

/// A status condition, in the usual Kubernetes shape.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Available`, `Progressing`, `Degraded`, `Draining`,
    /// `AutoscalingOverride`, or a dependency: `RedisReady`, `KafkaReady`,
    /// `LogicReachable`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// One CamelCase word saying why.
    pub reason: String,
    /// Details for humans.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: String,
    /// The `metadata.generation` this condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Replica counts of one component.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComponentStatus {
    /// Replicas asked for.
    #[serde(default)]
    pub desired_replicas: i32,
    /// Replicas ready.
    #[serde(default)]
    pub ready_replicas: i32,
}

/// Load of one comet pod.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CometPodStatus {
    /// Pod name (also the comet's server id).
    pub name: String,
    /// Client connections.
    pub connections: i64,
    /// Rooms with at least one member.
    pub rooms: i64,
    /// Whether the comet is being drained.
    pub draining: bool,
}
