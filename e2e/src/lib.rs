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

/// Runs the test bed's helm (`HERALD_HELM`) against its apiserver
/// (`KUBECONFIG`) and returns its stdout.
///
/// # Errors
/// helm cannot be started or exits unsuccessfully (its stderr is in the
/// error).
///
/// # Panics
/// As [`testbed_var`], when the test bed is not set up.
pub fn helm(args: &[&str]) -> anyhow::Result<String> {
    let output = std::process::Command::new(testbed_var("HERALD_HELM"))
        .args(args)
        .arg("--kubeconfig")
        .arg(testbed_var("KUBECONFIG"))
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "helm {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// A name that no earlier run used, for topics, groups and namespaces.
///
/// The clock alone is not enough: two tests of one process asked at the
/// same instant (CI saw it) got the same name, so a counter follows it.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}-{}-{nanos:x}-{n}", std::process::id())
}

/// Polls `probe` every 200 ms until it returns `Some`, for at most `secs`.
///
/// # Errors
/// The first error `probe` returns, or a timeout naming `what`.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(value) = probe().await? {
            return Ok(value);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Applies the committed PushCluster CRD (`crds/pushcluster.yaml`) and
/// waits until the apiserver serves it; idempotent, so every test may call it.
///
/// # Errors
/// The CRD does not parse, the apply fails, or it is not established in 30 s.
pub async fn install_pushcluster_crd(client: &kube::Client) -> anyhow::Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Api, Patch, PatchParams};
    use kube::runtime::wait::{await_condition, conditions};

    const NAME: &str = "pushclusters.herald.dev";
    let crd: CustomResourceDefinition =
        serde_yaml::from_str(include_str!("../../crds/pushcluster.yaml"))?;
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    crds.patch(
        NAME,
        &PatchParams::apply("herald-e2e").force(),
        &Patch::Apply(&crd),
    )
    .await?;
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        await_condition(crds, NAME, conditions::is_crd_established()),
    )
    .await??;
    Ok(())
}

pub use herald_runtime::listen::{free_port, free_port_on, try_free_port_on};

#[cfg(test)]
mod port_tests {
    use super::*;

    #[test]
    fn unique_names_differ_even_at_the_same_instant() {
        let names: Vec<String> = (0..1_000).map(|_| unique_name("t")).collect();
        let mut distinct = names.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), names.len());
    }
}
