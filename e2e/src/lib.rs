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

/// A port nothing listens on at 127.0.0.1, for a server process a test
/// starts: [`free_port_on`] that address.
pub fn free_port() -> u16 {
    free_port_on(std::net::Ipv4Addr::LOCALHOST.into())
}

/// A port nothing listens on at `ip`, for a server process a test starts.
///
/// # Panics
/// When [`try_free_port_on`] finds none.
pub fn free_port_on(ip: std::net::IpAddr) -> u16 {
    try_free_port_on(ip).unwrap_or_else(|err| panic!("no free port at {ip}: {err}"))
}

/// A port nothing listens on at `ip`, for a server process a test (or the
/// benchmark) starts.
///
/// Picked below the kernel's ephemeral range: a port found by binding port 0
/// lies inside that range, and between its release and the server's own
/// bind any outgoing connection on the machine may take it as its source
/// port (the server then fails with "Address already in use"). No source
/// port is ever chosen below the range. Ports handed out by this process
/// are not handed out again.
///
/// # Errors
/// The last bind error when no port in the range could be bound after many
/// tries.
pub fn try_free_port_on(ip: std::net::IpAddr) -> std::io::Result<u16> {
    use std::hash::BuildHasher;
    static TAKEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    const LOWEST: u16 = 10_000;
    let below = ephemeral_low().max(LOWEST + 1_000);
    let mut taken = TAKEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let random = std::collections::hash_map::RandomState::new();
    let mut last_err = None;
    for attempt in 0..10_000u32 {
        let offset = random.hash_one((attempt, std::process::id())) % u64::from(below - LOWEST);
        let port = LOWEST + u16::try_from(offset).unwrap_or(0);
        if taken.contains(&port) {
            continue;
        }
        match std::net::TcpListener::bind((ip, port)) {
            Ok(_) => {
                taken.push(port);
                return Ok(port);
            }
            Err(err) => last_err = Some(err),
        }
    }
    Err(last_err.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::AddrInUse, "every port handed out")
    }))
}

/// The first port of `net.ipv4.ip_local_port_range` (32768 when unreadable).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

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

    #[test]
    fn free_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let low = ephemeral_low();
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        for port in ports {
            assert!(port < low, "{port} is in the ephemeral range from {low}");
            std::net::TcpListener::bind(("127.0.0.1", port)).expect("bindable");
        }
    }
}
