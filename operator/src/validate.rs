//! Checks the schema and CEL rules cannot make: Secrets that must exist with
//! the named key. Also repeats the admission rules, because a CRD applied
//! without them (or an older stored object) must degrade, never crash.
//!
//! The two kinds of problem are reported apart because the controller treats
//! them apart: a spec error ([`check_spec`]) stops building, while missing
//! Secrets ([`missing_secrets`]) leave a running cluster running, observed
//! and scaled, until they appear.

use std::collections::BTreeMap;

use crate::crd::{PushClusterSpec, SecretKeyRef};

/// Why a spec cannot be reconciled as it stands: shown as the `Degraded`
/// condition.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct Invalid {
    /// CamelCase reason for the condition.
    pub reason: &'static str,
    /// What to fix.
    pub message: String,
}

fn spec_error(reason: &'static str, message: String) -> Invalid {
    Invalid { reason, message }
}

/// The Secrets a spec references: every `(name, key)` it reads.
pub fn referenced_secrets(spec: &PushClusterSpec) -> Vec<SecretKeyRef> {
    let mut refs: Vec<SecretKeyRef> = [
        spec.redis.password_secret_ref.as_ref(),
        spec.redis.username_secret_ref.as_ref(),
        spec.redis.ca_secret_ref.as_ref(),
        spec.kafka.username_secret_ref.as_ref(),
        spec.kafka.password_secret_ref.as_ref(),
        spec.kafka.ca_secret_ref.as_ref(),
        spec.auth.jwt_secret_ref.as_ref(),
        spec.auth.api_key_secret_ref.as_ref(),
    ]
    .into_iter()
    .flatten()
    .cloned()
    .collect();
    if let Some(tls) = &spec.comet.tls {
        for key in [TLS_CERT_KEY, TLS_KEY_KEY] {
            refs.push(SecretKeyRef {
                name: tls.secret_name.clone(),
                key: key.to_owned(),
            });
        }
    }
    refs
}

/// The keys of a `kubernetes.io/tls` Secret.
pub const TLS_CERT_KEY: &str = "tls.crt";
/// See [`TLS_CERT_KEY`].
pub const TLS_KEY_KEY: &str = "tls.key";

/// Checks what only a change to the spec can fix (admission normally refuses
/// all of it).
///
/// # Errors
/// The first problem found, as an [`Invalid`].
pub fn check_spec(spec: &PushClusterSpec) -> Result<(), Invalid> {
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
    Ok(())
}

/// Every referenced Secret that does not exist and every referenced key a
/// Secret lacks, as one `SecretMissing` problem naming them all (in the
/// order the spec references them, each once); `None` when all are there.
/// `secrets` maps each referenced Secret that exists to its keys.
pub fn missing_secrets(
    spec: &PushClusterSpec,
    secrets: &BTreeMap<String, Vec<String>>,
) -> Option<Invalid> {
    let mut missing: Vec<String> = Vec::new();
    for secret in referenced_secrets(spec) {
        let problem = match secrets.get(&secret.name) {
            None => format!("Secret {} does not exist", secret.name),
            Some(keys) if !keys.contains(&secret.key) => {
                format!("Secret {} has no key {}", secret.name, secret.key)
            }
            Some(_) => continue,
        };
        if !missing.contains(&problem) {
            missing.push(problem);
        }
    }
    (!missing.is_empty()).then(|| Invalid {
        reason: "SecretMissing",
        message: missing.join("; "),
    })
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
        assert_eq!(check_spec(&spec()), Ok(()));
        assert_eq!(missing_secrets(&spec(), &BTreeMap::new()), None);
    }

    fn reference(name: &str, key: &str) -> Option<SecretKeyRef> {
        Some(SecretKeyRef {
            name: name.to_owned(),
            key: key.to_owned(),
        })
    }

    #[test]
    fn every_missing_secret_and_key_is_named() {
        let mut spec = spec();
        spec.auth.api_key_secret_ref = reference("keys", "api");
        spec.auth.jwt_secret_ref = reference("jwt", "secret");
        spec.redis.password_secret_ref = reference("keys", "redis");
        let err = missing_secrets(&spec, &BTreeMap::new()).unwrap();
        assert_eq!(err.reason, "SecretMissing");
        assert_eq!(
            err.message, "Secret keys does not exist; Secret jwt does not exist",
            "each missing Secret once"
        );
        let secrets = BTreeMap::from([("keys".to_owned(), vec!["other".to_owned()])]);
        assert_eq!(
            missing_secrets(&spec, &secrets).unwrap().message,
            "Secret keys has no key redis; Secret jwt does not exist; Secret keys has no key api"
        );
        let secrets = BTreeMap::from([
            (
                "keys".to_owned(),
                vec!["api".to_owned(), "redis".to_owned()],
            ),
            ("jwt".to_owned(), vec!["secret".to_owned()]),
        ]);
        assert_eq!(missing_secrets(&spec, &secrets), None);
        assert_eq!(
            check_spec(&spec),
            Ok(()),
            "a missing Secret is no spec error"
        );
    }

    #[test]
    fn admission_rules_are_repeated() {
        let mut bad = spec();
        bad.comet.autoscaling.min_replicas = 5;
        bad.comet.autoscaling.max_replicas = 2;
        assert_eq!(check_spec(&bad).unwrap_err().reason, "InvalidAutoscaling");
        let mut bad = spec();
        bad.comet.replicas = -1;
        assert_eq!(check_spec(&bad).unwrap_err().reason, "InvalidSpec");
        let mut bad = spec();
        bad.auth.mode = AuthMode::Jwt;
        assert_eq!(check_spec(&bad).unwrap_err().reason, "InvalidAuth");
        let mut bad = spec();
        bad.kafka.brokers = vec![];
        assert!(check_spec(&bad).is_err());
    }
}
