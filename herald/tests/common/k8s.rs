//! The test bed's kube-apiserver: a client, namespaces, and the loopback
//! kubelet (`herald_e2e::kubelet`) running pods as `herald` processes of
//! this build.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use herald_e2e::kubelet::{Config, IpPool, Kubelet};
use herald_e2e::{testbed_var, unique_name};
use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};

/// A client of the test bed's apiserver (`KUBECONFIG`): without it this
/// fails, never skips.
pub(crate) async fn client() -> Result<Client> {
    testbed_var("KUBECONFIG");
    Ok(Client::try_default().await?)
}

/// A fresh namespace named after `prefix`, labelled `herald.dev/e2e:
/// {suite}`.
pub(crate) async fn create_namespace(client: &Client, prefix: &str, suite: &str) -> Result<String> {
    let name = unique_name(prefix);
    let namespace: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"herald.dev/e2e": suite}}
    }))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await?;
    Ok(name)
}

/// Deletes a namespace, and with it everything in it.
pub(crate) async fn delete_namespace(client: &Client, name: &str) -> Result<()> {
    Api::<Namespace>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await?;
    Ok(())
}

/// The loopback kubelet as a fresh node named after `node`, running this
/// build's `herald`, lending pod addresses from 127.0.`third`.0/24, with the
/// pods' logs under `$CARGO_TARGET_TMPDIR/{dir}/{node name}`; `configure`
/// sets the rest.
pub(crate) async fn start_kubelet(
    client: &Client,
    dir: &str,
    node: &str,
    third: u8,
    configure: impl FnOnce(&mut Config),
) -> Result<Kubelet> {
    let node = unique_name(node);
    let run_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(dir).join(&node);
    let mut config = Config::new(
        &node,
        PathBuf::from(env!("CARGO_BIN_EXE_herald")),
        run_dir,
        IpPool::slash24(third),
    );
    configure(&mut config);
    Ok(Kubelet::start(client.clone(), config).await?)
}

/// Shows the loopback kubelet's and the Service proxy's logs (info) and
/// everything else's warnings in the test's output, which prints them when
/// it fails (`RUST_LOG` overrides).
pub(crate) fn log_harness() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,herald_e2e=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// `helm install` of charts/herald as `release` into `ops`, as the test bed
/// needs it: the operator watching `watched`, its metrics on its pod IP,
/// polling every 500 ms, text logs; `extra` are more `--set` values.
pub(crate) fn install_chart(
    release: &str,
    ops: &str,
    watched: &str,
    extra: &[&str],
) -> Result<String> {
    let watch = format!("watchNamespaces={{{watched}}}");
    let mut args = vec![
        "install",
        release,
        concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/herald"),
        "--namespace",
        ops,
    ];
    for set in [
        watch.as_str(),
        "metricsHost=$(POD_IP)",
        "pollIntervalMs=500",
        "logFormat=text",
    ]
    .into_iter()
    .chain(extra.iter().copied())
    {
        args.extend(["--set", set]);
    }
    herald_e2e::helm(&args)
}

/// The certificate a TLS server at `addr` presents, trusting `roots`.
pub(crate) async fn served_certificate(
    addr: (std::net::Ipv4Addr, u16),
    roots: &rustls::RootCertStore,
) -> anyhow::Result<Vec<u8>> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let stream = connector.connect("localhost".try_into()?, tcp).await?;
    let certs = stream
        .get_ref()
        .1
        .peer_certificates()
        .context("no certificate")?;
    Ok(certs.first().context("empty chain")?.to_vec())
}
