//! Shared helpers for tests that run against the project's real test bed
//! (`e2e/services/up.sh` starts it and exports where each service listens).
//!
//! A test that needs a service and cannot find it fails with a message naming
//! the variable and the command that provides it: it never skips.

pub mod kubelet;
pub mod service_proxy;

/// Reads a variable that the test bed exports.
///
/// # Panics
/// If it is unset or empty, naming the command that sets it.
pub fn testbed_var(name: &str) -> String {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => value,
        _ => panic!(
            "{name} is not set: these tests need the real test bed; \
             run them through ./scripts/test.sh, or `source target/testbed/env` \
             after `bash e2e/services/up.sh`"
        ),
    }
}

/// A name that no earlier run used, for topics, groups and namespaces.
pub fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{prefix}-{}-{nanos:x}", std::process::id())
}
