//! The contract between the operator and the roles it deploys: the names of
//! the environment variables the operator sets (in the cluster's config
//! ConfigMap, read through `envFrom`, or on the container) and the roles'
//! flags read (`#[arg(env = ...)]`). Both sides compile against these
//! constants, so a rename cannot leave one side reading a variable the other
//! no longer writes. Flags the operator passes as arguments are checked the
//! other way: `herald/tests/operator_contract.rs` runs every generated
//! command line through the role's real parser (`herald <role> --check-config`).

/// Kafka bootstrap brokers, comma-separated (logic, job).
pub const KAFKA_BROKERS: &str = "HERALD_KAFKA_BROKERS";
/// The push topic (logic, job).
pub const KAFKA_TOPIC: &str = "HERALD_KAFKA_TOPIC";
/// Job's consumer group.
pub const JOB_GROUP: &str = "HERALD_JOB_GROUP";
/// Redis URL (logic).
pub const REDIS_URL: &str = "HERALD_REDIS_URL";
/// Redis password (logic `--redis-password`; it replaces any password in
/// [`REDIS_URL`]). The operator also splices it into [`REDIS_URL`] by the
/// kubelet's `$(VAR)` expansion, so it never appears in a Deployment.
pub const REDIS_PASSWORD: &str = "HERALD_REDIS_PASSWORD";
/// Redis ACL user name (logic `--redis-username`; replaces any in the URL).
pub const REDIS_USERNAME: &str = "HERALD_REDIS_USERNAME";
/// PEM file of the CA(s) that sign Redis's certificate, for `rediss://`
/// URLs (logic `--redis-ca-file`); a mounted Secret or ConfigMap key.
pub const REDIS_CA_FILE: &str = "HERALD_REDIS_CA_FILE";
/// Kafka `security.protocol` (`PLAINTEXT`, `SSL`, `SASL_PLAINTEXT`,
/// `SASL_SSL`), logic and job `--kafka-security-protocol`.
pub const KAFKA_SECURITY_PROTOCOL: &str = "HERALD_KAFKA_SECURITY_PROTOCOL";
/// Kafka SASL mechanism (`PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`).
pub const KAFKA_SASL_MECHANISM: &str = "HERALD_KAFKA_SASL_MECHANISM";
/// Kafka SASL user name (logic, job).
pub const KAFKA_USERNAME: &str = "HERALD_KAFKA_USERNAME";
/// Kafka SASL password (logic, job), from a Secret.
pub const KAFKA_PASSWORD: &str = "HERALD_KAFKA_PASSWORD";
/// PEM file of the CA(s) that sign the brokers' certificates (logic, job).
pub const KAFKA_CA_FILE: &str = "HERALD_KAFKA_CA_FILE";
/// How logic checks client tokens (`goim`, `jwt`).
pub const TOKEN_MODE: &str = "HERALD_LOGIC_TOKEN_MODE";
/// HS256 secret for signed tokens (logic).
pub const JWT_SECRET: &str = "HERALD_LOGIC_JWT_SECRET";
/// The HTTP push API's bearer key (logic).
pub const API_KEY: &str = "HERALD_LOGIC_API_KEY";
/// Heartbeat interval logic advertises to clients, in seconds
/// (`spec.nodeList.heartbeat`).
pub const HEARTBEAT_SECS: &str = "HERALD_LOGIC_HEARTBEAT_SECS";
/// Host name logic's node answer gives web clients (`spec.nodeList.domain`).
pub const NODE_DOMAIN: &str = "HERALD_NODE_DOMAIN";
/// How many addresses one node answer lists (`spec.nodeList.count`).
pub const NODE_COUNT: &str = "HERALD_NODE_COUNT";
/// Reconnect back-off logic advertises, in seconds (`spec.nodeList.backoff`).
pub const NODE_BACKOFF_SECS: &str = "HERALD_NODE_BACKOFF_SECS";
/// The shared token of the internal gRPC ports (comet, logic, job): the
/// operator sets it from Secret `<cluster>-grpc-token`.
pub const GRPC_TOKEN: &str = "HERALD_GRPC_TOKEN";
/// A file holding that token (one per line), read again as it changes.
pub const GRPC_TOKEN_FILE: &str = "HERALD_GRPC_TOKEN_FILE";
/// The node-list ConfigMap logic and job watch.
pub const NODE_LIST_CONFIGMAP: &str = "HERALD_NODE_LIST_CONFIGMAP";
/// The pod's namespace (downward API), where that ConfigMap lives.
pub const POD_NAMESPACE: &str = "POD_NAMESPACE";
/// The pod's name (downward API): comet's server id.
pub const POD_NAME: &str = "POD_NAME";
/// The pod's IP (downward API): where a role binds.
pub const POD_IP: &str = "POD_IP";

/// Why a role is not ready: its `/readyz` answers 503 with
/// `"<Reason>: <detail>"`, the reason one of these. The operator reads it
/// from pods that are not Ready and reports it in the PushCluster's
/// conditions, so a platform team sees the cause without reading pod logs.
pub mod unready {
    /// Logic cannot reach Redis (refused, timed out, server error).
    pub const REDIS_UNREACHABLE: &str = "RedisUnreachable";
    /// Redis refused logic's password (or wants one logic does not send).
    pub const REDIS_AUTH_FAILED: &str = "RedisAuthFailed";
    /// Logic cannot reach the Kafka brokers.
    pub const KAFKA_UNREACHABLE: &str = "KafkaUnreachable";
    /// The brokers refused the SASL user name or password.
    pub const KAFKA_AUTH_FAILED: &str = "KafkaAuthFailed";
    /// The brokers answer but the push topic does not exist.
    pub const KAFKA_TOPIC_MISSING: &str = "KafkaTopicMissing";
    /// Job's consumer has no partitions assigned (yet).
    pub const KAFKA_NOT_ASSIGNED: &str = "KafkaNotAssigned";
    /// Comet has not reached logic's gRPC server.
    pub const LOGIC_UNREACHABLE: &str = "LogicUnreachable";
    /// Comet is draining: no new clients.
    pub const DRAINING: &str = "Draining";

    /// `"<reason>: <detail>"`, the `/readyz` body.
    pub fn body(reason: &str, detail: impl std::fmt::Display) -> String {
        format!("{reason}: {detail}")
    }

    /// The reason and detail of a `/readyz` body; `None` for a body that
    /// does not start with a CamelCase reason (another server, an older role).
    pub fn parse(body: &str) -> Option<(&str, &str)> {
        let (reason, detail) = body.split_once(": ")?;
        let camel = reason.starts_with(|c: char| c.is_ascii_uppercase())
            && reason.chars().all(|c| c.is_ascii_alphanumeric());
        camel.then(|| (reason, detail.trim()))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_body_round_trips_and_plain_text_has_no_reason() {
            let body = body(KAFKA_TOPIC_MISSING, "topic goim-push: unknown");
            assert_eq!(
                parse(&body),
                Some((KAFKA_TOPIC_MISSING, "topic goim-push: unknown"))
            );
            assert_eq!(parse("not ready: later"), None);
            assert_eq!(parse("ready"), None);
        }
    }
}
