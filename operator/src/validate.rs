//! Checks the schema and CEL rules cannot make: Secrets that must exist with
//! the named key. Also repeats the admission rules, because a CRD applied
//! without them (or an older stored object) must degrade, never crash.

use std::collections::BTreeMap;

use crate::crd::{PushClusterSpec, SecretKeyRef};

/// Why a spec cannot be reconciled: shown as the `Degraded` condition.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct Invalid {
    /// CamelCase reason for the condition.
    pub reason: &'static str,
    /// What to fix.
    pub message: String,
    /// Whether only a change to the spec can fix it (else e.g. a Secret
    /// appearing can, so the controller looks again later).
    pub spec_only: bool,
}

fn spec_error(reason: &'static str, message: String) -> Invalid {
    Invalid {
        reason,
        message,
        spec_only: true,
    }
}

/// The Secrets a spec references: every `(name, key)` it reads.
pub fn referenced_secrets(spec: &PushClusterSpec) -> Vec<&SecretKeyRef> {
    [
        spec.redis.password_secret_ref.as_ref(),
        spec.auth.jwt_secret_ref.as_ref(),
        spec.auth.api_key_secret_ref.as_ref(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// Validates a spec. `secrets` maps each referenced Secret that exists to its
/// keys.
///
/// # Errors
/// The first problem found, as an [`Invalid`].
pub fn check(
    spec: &PushClusterSpec,
    secrets: &BTreeMap<String, Vec<String>>,
) -> Result<(), Invalid> {
    if spec.image.trim().is_empty() {
        return Err(spec_error("InvalidSpec", "image is empty".to_owned()));
    }
    for (what, count) in [
        ("comet.replicas", spec.comet.replicas),
        ("logic.replicas", spec.logic.replicas),
        ("job.replicas", spec.job.replicas),
    ] {
        if count < 0 {
            return Err(spec_error(
                "InvalidSpec",
                format!("{what} is negative ({count})"),
            ));
        }
    }
    let auto = &spec.comet.autoscaling;
    if auto.min_replicas > auto.max_replicas || auto.min_replicas < 1 {
        return Err(spec_error(
            "InvalidAutoscaling",
            format!(
                "autoscaling needs 1 <= minReplicas <= maxReplicas, got {}..{}",
                auto.min_replicas, auto.max_replicas
            ),
        ));
    }
    if auto.target_connections_per_replica < 1 {
        return Err(spec_error(
            "InvalidAutoscaling",
            "targetConnectionsPerReplica must be positive".to_owned(),
        ));
    }
    if spec.kafka.brokers.iter().all(|b| b.trim().is_empty()) {
        return Err(spec_error(
            "InvalidSpec",
            "kafka.brokers is empty".to_owned(),
        ));
    }
    if spec.auth.mode == crate::crd::AuthMode::Jwt && spec.auth.jwt_secret_ref.is_none() {
        return Err(spec_error(
            "InvalidAuth",
            "auth.mode jwt needs auth.jwtSecretRef".to_owned(),
        ));
    }
    for secret in referenced_secrets(spec) {
        match secrets.get(&secret.name) {
            None => {
                return Err(Invalid {
                    reason: "SecretMissing",
                    message: format!("Secret {} does not exist", secret.name),
                    spec_only: false,
                });
            }
            Some(keys) if !keys.contains(&secret.key) => {
                return Err(Invalid {
                    reason: "SecretKeyMissing",
                    message: format!("Secret {} has no key {}", secret.name, secret.key),
                    spec_only: false,
                });
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::AuthMode;

    fn spec() -> PushClusterSpec {
        serde_json::from_value(serde_json::json!({
            "image": "herald:dev", "redis": {"addr": "r:6379"}, "kafka": {"brokers": ["k:9092"]}
        }))
        .unwrap()
    }

    #[test]
    fn minimal_spec_is_valid() {
        assert_eq!(check(&spec(), &BTreeMap::new()), Ok(()));
    }

    #[test]
    fn missing_secret_and_key_are_reported_and_retryable() {
        let mut spec = spec();
        spec.auth.api_key_secret_ref = Some(SecretKeyRef {
            name: "keys".to_owned(),
            key: "api".to_owned(),
        });
        let err = check(&spec, &BTreeMap::new()).unwrap_err();
        assert_eq!((err.reason, err.spec_only), ("SecretMissing", false));
        let secrets = BTreeMap::from([("keys".to_owned(), vec!["other".to_owned()])]);
        assert_eq!(
            check(&spec, &secrets).unwrap_err().reason,
            "SecretKeyMissing"
        );
        let secrets = BTreeMap::from([("keys".to_owned(), vec!["api".to_owned()])]);
        assert_eq!(check(&spec, &secrets), Ok(()));
    }

    #[test]
    fn admission_rules_are_repeated() {
        let mut bad = spec();
        bad.comet.autoscaling.min_replicas = 5;
        bad.comet.autoscaling.max_replicas = 2;
        assert_eq!(
            check(&bad, &BTreeMap::new()).unwrap_err().reason,
            "InvalidAutoscaling"
        );
        let mut bad = spec();
        bad.comet.replicas = -1;
        assert!(check(&bad, &BTreeMap::new()).unwrap_err().spec_only);
        let mut bad = spec();
        bad.auth.mode = AuthMode::Jwt;
        assert_eq!(
            check(&bad, &BTreeMap::new()).unwrap_err().reason,
            "InvalidAuth"
        );
        let mut bad = spec();
        bad.kafka.brokers = vec![];
        assert!(check(&bad, &BTreeMap::new()).is_err());
    }
}
