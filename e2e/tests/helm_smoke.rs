//! The test bed's helm is the real helm: it renders a chart and installs it
//! into the test apiserver, where kube-rs sees what it created.

use herald_e2e::{helm, unique_name};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::DeleteParams;
use kube::{Api, Client};

fn chart() -> String {
    format!("{}/fixtures/smoke-chart", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn template_renders_values() -> anyhow::Result<()> {
    let rendered = helm(&["template", "demo", &chart(), "--set", "greeting=hi there"])?;
    let config: ConfigMap = serde_yaml::from_str(
        rendered
            .split("---")
            .find(|doc| doc.contains("kind: ConfigMap"))
            .expect("a ConfigMap in the output"),
    )?;
    assert_eq!(config.metadata.name.as_deref(), Some("demo-smoke"));
    assert_eq!(config.data.unwrap_or_default()["greeting"], "hi there");
    Ok(())
}

#[tokio::test]
async fn install_and_uninstall_against_the_apiserver() -> anyhow::Result<()> {
    let namespace = unique_name("helm");
    let release = "smoke";
    helm(&[
        "install",
        release,
        &chart(),
        "--namespace",
        &namespace,
        "--create-namespace",
        "--wait",
        "--timeout",
        "60s",
    ])?;
    let client = Client::try_default().await?;
    let configs = Api::<ConfigMap>::namespaced(client.clone(), &namespace);
    let config = configs.get("smoke-smoke").await?;
    assert_eq!(
        config.data.unwrap_or_default()["greeting"],
        "hello from helm"
    );
    let labels = config.metadata.labels.unwrap_or_default();
    assert_eq!(labels["app.kubernetes.io/managed-by"], "Helm");

    let status = helm(&[
        "status",
        release,
        "--namespace",
        &namespace,
        "--output",
        "json",
    ])?;
    let status: serde_json::Value = serde_json::from_str(&status)?;
    assert_eq!(status["info"]["status"], "deployed");

    helm(&["uninstall", release, "--namespace", &namespace, "--wait"])?;
    assert!(configs.get_opt("smoke-smoke").await?.is_none());
    Api::<Namespace>::all(client)
        .delete(&namespace, &DeleteParams::default())
        .await?;
    Ok(())
}
