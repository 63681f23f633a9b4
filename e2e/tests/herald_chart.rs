//! The Helm chart `charts/herald`, rendered and installed by the real helm
//! into the test bed's apiserver: the values schema refuses typos, optional
//! objects render only when switched on, the CRD is served, the chart owns
//! the leader Lease (gone after `helm uninstall`), and RBAC, as the apiserver
//! enforces it for the operator's ServiceAccount (`kubectl auth can-i --as`),
//! gives what the operator calls in the namespaces it watches and nothing
//! else: namespaced Roles when `watchNamespaces` is set, a ClusterRole only
//! when it is empty.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use herald_e2e::{helm, testbed_var, unique_name};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client};
use serde_json::json;

fn chart() -> String {
    format!("{}/../charts/herald", env!("CARGO_MANIFEST_DIR"))
}

/// The rendered documents, keyed by `Kind/name`.
fn render(args: &[&str]) -> anyhow::Result<BTreeMap<String, serde_yaml::Value>> {
    let chart = chart();
    let mut all = vec!["template", "demo", chart.as_str()];
    all.extend_from_slice(args);
    let rendered = helm(&all)?;
    let mut docs = BTreeMap::new();
    for doc in rendered.split("\n---") {
        let value: serde_yaml::Value = serde_yaml::from_str(doc)?;
        if value.is_null() {
            continue;
        }
        let key = format!(
            "{}/{}",
            value["kind"].as_str().unwrap_or_default(),
            value["metadata"]["name"].as_str().unwrap_or_default()
        );
        let key = match value["metadata"]["namespace"].as_str() {
            // Roles of several namespaces share one name.
            Some(ns) if value["kind"] == "Role" || value["kind"] == "RoleBinding" => {
                format!("{key}@{ns}")
            }
            _ => key,
        };
        docs.insert(key, value);
    }
    Ok(docs)
}

fn typed<T: k8s_openapi::serde::de::DeserializeOwned>(
    docs: &BTreeMap<String, serde_yaml::Value>,
    key: &str,
) -> anyhow::Result<T> {
    let doc = docs
        .get(key)
        .ok_or_else(|| anyhow::anyhow!("no {key} in {:?}", docs.keys()))?;
    Ok(serde_yaml::from_value(doc.clone())?)
}

#[test]
fn template_passes_values_through() -> anyhow::Result<()> {
    let docs = render(&[
        "--namespace",
        "ops",
        "--set",
        "image.tag=9.9.9",
        "--set",
        "watchNamespaces={chat,games}",
        "--set",
        "metricsHost=$(POD_IP)",
        "--set",
        "extraArgs={--lease-secs=30,--service-addresses=cluster-ip}",
        "--set",
        "extraEnv[0].name=HERALD_EXTRA",
        "--set",
        "extraEnv[0].value=on",
    ])?;
    let deployment: Deployment = typed(&docs, "Deployment/demo-herald")?;
    let spec = deployment
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod spec");
    let container = &spec.containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some("ghcr.io/herald-push/herald:9.9.9")
    );
    let args = container.args.clone().unwrap_or_default();
    assert_eq!(args[0], "operator");
    assert!(
        args.contains(&"--namespace=chat,games".to_owned()),
        "{args:?}"
    );
    // extraArgs come last, in order, so they can override the chart's own.
    assert_eq!(
        args[args.len() - 2..],
        ["--lease-secs=30", "--service-addresses=cluster-ip"],
        "{args:?}"
    );
    let env = container.env.clone().unwrap_or_default();
    let extra = env.iter().find(|e| e.name == "HERALD_EXTRA");
    assert_eq!(
        extra.and_then(|e| e.value.as_deref()),
        Some("on"),
        "{env:?}"
    );
    assert!(
        env.iter().any(|e| e.name == "POD_NAME"),
        "the chart's own env stays: {env:?}"
    );
    assert_eq!(spec.service_account_name.as_deref(), Some("demo-herald"));
    // Off by default: no example PushCluster, no monitors, no dashboards.
    for kind in [
        "PushCluster/",
        "ServiceMonitor/",
        "PodMonitor/",
        "ConfigMap/",
    ] {
        assert!(
            !docs.keys().any(|k| k.starts_with(kind)),
            "{kind} rendered by default: {:?}",
            docs.keys()
        );
    }
    // Watched namespaces: one Role + RoleBinding in each, nothing cluster-wide.
    for ns in ["chat", "games"] {
        let role: Role = typed(&docs, &format!("Role/demo-herald@{ns}"))?;
        assert!(!role.rules.unwrap_or_default().is_empty());
        let binding: RoleBinding = typed(&docs, &format!("RoleBinding/demo-herald@{ns}"))?;
        let subject = &binding.subjects.unwrap_or_default()[0];
        assert_eq!(
            (subject.name.as_str(), subject.namespace.as_deref()),
            ("demo-herald", Some("ops"))
        );
    }
    assert!(
        !docs
            .keys()
            .any(|k| k.starts_with("ClusterRole/") || k.starts_with("ClusterRoleBinding/")),
        "{:?}",
        docs.keys()
    );
    // No watched namespaces: the ClusterRole and its binding instead.
    let docs = render(&["--namespace", "ops"])?;
    typed::<ClusterRole>(&docs, "ClusterRole/demo-herald")?;
    typed::<ClusterRoleBinding>(&docs, "ClusterRoleBinding/demo-herald")?;
    assert!(!docs.keys().any(|k| k.starts_with("Role/demo-herald@")));
    // The Lease the operator elects its leader with, without a holder.
    let lease: Lease = typed(&docs, "Lease/herald-operator")?;
    assert_eq!(lease.metadata.namespace.as_deref(), Some("ops"));
    assert!(
        lease
            .spec
            .is_none_or(|s| s.holder_identity.is_none() && s.renew_time.is_none())
    );
    Ok(())
}

#[test]
fn values_schema_refuses_typos_and_wrong_types() -> anyhow::Result<()> {
    for bad in [
        "reolicas=2",
        "metrics.service.prot=9090",
        "metrics.serviceMonitor.intervall=1m",
        "dashboards.enable=true",
        "serviceAccount.nmae=op",
        "replicas=two",
        "logFormat=yaml",
        "metrics.serviceMonitor.interval=soon",
    ] {
        let err = render(&["--set", bad]).expect_err(bad).to_string();
        let key = bad.split('=').next().unwrap_or(bad);
        let leaf = key.rsplit('.').next().unwrap_or(key);
        assert!(
            err.contains("schema") && (err.contains(leaf) || err.contains("want")),
            "{bad}: {err}"
        );
    }
    for good in [
        "replicas=2",
        "metrics.service.port=9090",
        "metrics.serviceMonitor.interval=1m",
        "dashboards.enabled=true",
        "logFormat=text",
        "examplePushCluster.spec.comet.replicas=3",
        "podAnnotations.a=b",
    ] {
        render(&["--set", good]).map_err(|e| anyhow::anyhow!("{good}: {e}"))?;
    }
    Ok(())
}

#[test]
fn metrics_service_monitors_and_dashboard_render_when_enabled() -> anyhow::Result<()> {
    let docs = render(&["--namespace", "ops"])?;
    let service: Service = typed(&docs, "Service/demo-herald-metrics")?;
    let spec = service.spec.expect("spec");
    let port = &spec.ports.expect("ports")[0];
    assert_eq!(port.name.as_deref(), Some("metrics"));
    assert_eq!(port.port, 3180);
    let deployment: Deployment = typed(&docs, "Deployment/demo-herald")?;
    let template = deployment.spec.expect("spec").template;
    // The Service selects the operator pods by their labels.
    let labels = template.metadata.expect("meta").labels.expect("labels");
    for (k, v) in spec.selector.expect("selector") {
        assert_eq!(labels.get(&k), Some(&v), "{k}");
    }
    let docs = render(&["--set", "metrics.service.enabled=false"])?;
    assert!(!docs.contains_key("Service/demo-herald-metrics"));

    let docs = render(&[
        "--namespace",
        "ops",
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.serviceMonitor.labels.release=prom",
        "--set",
        "metrics.podMonitor.enabled=true",
        "--set",
        "dashboards.enabled=true",
    ])?;
    let monitor = &docs["ServiceMonitor/demo-herald"];
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prom");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    // The per-PushCluster series keep their own `namespace` label.
    assert_eq!(monitor["spec"]["endpoints"][0]["honorLabels"], true);
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"],
        "operator"
    );
    let pods = &docs["PodMonitor/demo-herald"];
    assert_eq!(pods["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(pods["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    assert_eq!(pods["spec"]["podMetricsEndpoints"][0]["honorLabels"], true);
    assert_eq!(pods["spec"]["namespaceSelector"]["matchNames"][0], "ops");

    let dashboards: ConfigMap = typed(&docs, "ConfigMap/demo-herald-dashboards")?;
    assert_eq!(
        dashboards
            .metadata
            .labels
            .unwrap_or_default()
            .get("grafana_dashboard")
            .map(String::as_str),
        Some("1")
    );
    let shipped = dashboards.data.unwrap_or_default()["herald.json"].clone();
    let file = std::fs::read_to_string(format!("{}/dashboards/herald.json", chart()))?;
    let shipped: serde_json::Value = serde_json::from_str(&shipped)?;
    assert_eq!(shipped, serde_json::from_str::<serde_json::Value>(&file)?);
    Ok(())
}

/// `kubectl auth can-i verb resource [-n namespace] --as=user`, answered by
/// the apiserver's RBAC for the impersonated ServiceAccount (with its groups).
fn can_i(user: &str, namespace: Option<&str>, verb: &str, resource: &str) -> anyhow::Result<bool> {
    let (resource, subresource) = match resource.split_once('#') {
        Some((r, s)) => (r, Some(s)),
        None => (resource, None),
    };
    let mut cmd = std::process::Command::new(testbed_var("HERALD_KUBECTL"));
    cmd.env("KUBECONFIG", testbed_var("KUBECONFIG"))
        .args(["auth", "can-i", verb, resource])
        .arg(format!("--as={user}"));
    match namespace {
        Some(ns) => cmd.args(["-n", ns]),
        None => cmd.arg("--all-namespaces"),
    };
    if let Some(sub) = subresource {
        cmd.arg(format!("--subresource={sub}"));
    }
    let out = cmd.output()?;
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    anyhow::ensure!(
        answer == "yes" || answer == "no",
        "kubectl auth can-i {verb} {resource}: {answer} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(answer == "yes")
}

/// What the operator calls in a namespace it watches (`resource#subresource`),
/// all of it: the chart's rules must grant exactly this
/// (`the_rules_grant_exactly_what_the_operator_calls`).
const NEEDED: &[(&str, &str)] = &[
    // Reconciled, cached by the controller; update and patch touch only
    // metadata.finalizers.
    ("get", "pushclusters.herald.dev"),
    ("list", "pushclusters.herald.dev"),
    ("watch", "pushclusters.herald.dev"),
    ("update", "pushclusters.herald.dev"),
    ("patch", "pushclusters.herald.dev"),
    ("patch", "pushclusters.herald.dev#status"),
    ("patch", "pushclusters.herald.dev#scale"),
    // Owned kinds: list/watch (the controller's caches), create/patch
    // (server-side apply of a new object needs create).
    ("get", "deployments.apps"), // logic's and job's read back
    ("list", "deployments.apps"),
    ("watch", "deployments.apps"),
    ("create", "deployments.apps"),
    ("patch", "deployments.apps"),
    // A comet Deployment left by `rollout.strategy: Deployment` goes once
    // its comets are drained onto the ReplicaSets.
    ("delete", "deployments.apps"),
    ("list", "replicasets.apps"),
    ("watch", "replicasets.apps"),
    ("create", "replicasets.apps"),
    ("patch", "replicasets.apps"),
    ("delete", "replicasets.apps"), // an emptied old revision
    ("list", "networkpolicies.networking.k8s.io"),
    ("watch", "networkpolicies.networking.k8s.io"),
    ("create", "networkpolicies.networking.k8s.io"),
    ("patch", "networkpolicies.networking.k8s.io"),
    ("delete", "networkpolicies.networking.k8s.io"), // networkPolicy.enabled: false
    ("get", "services"),                             // the comet Service's load-balancer addresses
    ("list", "services"),
    ("watch", "services"),
    ("create", "services"),
    ("patch", "services"),
    ("get", "configmaps"), // the node list as last written
    ("list", "configmaps"),
    ("watch", "configmaps"),
    ("create", "configmaps"),
    ("patch", "configmaps"),
    ("list", "serviceaccounts"),
    ("watch", "serviceaccounts"),
    ("create", "serviceaccounts"),
    ("patch", "serviceaccounts"),
    ("get", "secrets"), // referenced and generated Secrets
    ("list", "secrets"),
    ("watch", "secrets"),
    ("create", "secrets"),
    ("list", "roles.rbac.authorization.k8s.io"),
    ("watch", "roles.rbac.authorization.k8s.io"),
    ("create", "roles.rbac.authorization.k8s.io"),
    ("patch", "roles.rbac.authorization.k8s.io"),
    ("list", "rolebindings.rbac.authorization.k8s.io"),
    ("watch", "rolebindings.rbac.authorization.k8s.io"),
    ("create", "rolebindings.rbac.authorization.k8s.io"),
    ("patch", "rolebindings.rbac.authorization.k8s.io"),
    ("list", "poddisruptionbudgets.policy"),
    ("watch", "poddisruptionbudgets.policy"),
    ("create", "poddisruptionbudgets.policy"),
    ("patch", "poddisruptionbudgets.policy"),
    // Comet pods: polled, annotated, a drained one deleted.
    ("list", "pods"),
    ("patch", "pods"),
    ("delete", "pods"),
    ("create", "events.events.k8s.io"),
    ("patch", "events.events.k8s.io"),
];

/// `(verb, resource)` pairs a rendered Role or ClusterRole grants, in
/// [`NEEDED`]'s notation.
fn granted(role: &serde_yaml::Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_sequence().into_iter().flatten() {
        let strings = |v: &serde_yaml::Value| -> Vec<String> {
            v.as_sequence()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        };
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                let (kind, sub) = match resource.split_once('/') {
                    Some((kind, sub)) => (kind.to_owned(), format!("#{sub}")),
                    None => (resource.clone(), String::new()),
                };
                let name = if group.is_empty() {
                    format!("{kind}{sub}")
                } else {
                    format!("{kind}.{group}{sub}")
                };
                for verb in strings(&rule["verbs"]) {
                    out.insert((verb, name.clone()));
                }
            }
        }
    }
    out
}

#[test]
fn the_rules_grant_exactly_what_the_operator_calls() -> anyhow::Result<()> {
    let needed: BTreeSet<(String, String)> = NEEDED
        .iter()
        .map(|(verb, resource)| ((*verb).to_owned(), (*resource).to_owned()))
        .collect();
    for args in [&[][..], &["--set", "watchNamespaces={team-a,team-b}"][..]] {
        let docs = render(args)?;
        // The operator's rules: those on PushClusters (the Lease Role is
        // apart, checked by `lease_rights`).
        let roles: Vec<(&String, &serde_yaml::Value)> = docs
            .iter()
            .filter(|(key, doc)| {
                (key.starts_with("ClusterRole/") || key.starts_with("Role/"))
                    && granted(doc)
                        .iter()
                        .any(|(_, r)| r == "pushclusters.herald.dev")
            })
            .collect();
        anyhow::ensure!(!roles.is_empty(), "no operator rules rendered for {args:?}");
        for (key, role) in roles {
            let granted = granted(role);
            let unused: Vec<_> = granted.difference(&needed).collect();
            let missing: Vec<_> = needed.difference(&granted).collect();
            anyhow::ensure!(
                unused.is_empty() && missing.is_empty(),
                "{key} ({args:?}) grants verbs the operator does not call: {unused:?}; lacks: {missing:?}"
            );
        }
    }
    Ok(())
}

/// What it never calls, refused even in the namespaces it watches.
const REFUSED: &[(&str, &str)] = &[
    ("delete", "secrets"),
    ("update", "secrets"),
    ("patch", "secrets"),
    ("create", "pods"),
    ("create", "pods#exec"),
    ("update", "deployments.apps"),
    ("delete", "services"),
    ("delete", "configmaps"),
    ("delete", "pushclusters.herald.dev"),
    ("create", "pushclusters.herald.dev"),
    ("update", "pushclusters.herald.dev#scale"),
    ("escalate", "roles.rbac.authorization.k8s.io"),
    ("bind", "roles.rbac.authorization.k8s.io"),
    ("delete", "roles.rbac.authorization.k8s.io"),
    ("create", "daemonsets.apps"),
    ("create", "leases.coordination.k8s.io"),
];

/// Cluster-scoped writes, never allowed.
const CLUSTER_WRITES: &[(&str, &str)] = &[
    ("create", "namespaces"),
    ("delete", "namespaces"),
    ("patch", "nodes"),
    ("create", "clusterroles.rbac.authorization.k8s.io"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
    ("patch", "customresourcedefinitions.apiextensions.k8s.io"),
    ("create", "persistentvolumes"),
];

async fn create_namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    Ok(())
}

/// Lease checks shared by both installs: the chart created the operator's
/// Lease with no holder, the ServiceAccount may read and renew that one
/// Lease only, and only in the release namespace.
fn lease_rights(user: &str, release_ns: &str, other_ns: &str) -> anyhow::Result<()> {
    for verb in ["get", "patch"] {
        assert!(
            can_i(
                user,
                Some(release_ns),
                verb,
                "leases.coordination.k8s.io/herald-operator"
            )?,
            "{verb} its Lease"
        );
        assert!(
            !can_i(
                user,
                Some(release_ns),
                verb,
                "leases.coordination.k8s.io/someone-elses"
            )?,
            "{verb} another Lease"
        );
        assert!(
            !can_i(
                user,
                Some(other_ns),
                verb,
                "leases.coordination.k8s.io/herald-operator"
            )?,
            "{verb} a Lease elsewhere"
        );
    }
    Ok(())
}

async fn wait_crd(client: &Client) -> anyhow::Result<()> {
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(
            Api::<CustomResourceDefinition>::all(client.clone()),
            "pushclusters.herald.dev",
            conditions::is_crd_established(),
        ),
    )
    .await??;
    Ok(())
}

#[tokio::test]
async fn install_with_watch_namespaces_grants_only_those_namespaces() -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let ops = unique_name("chart-ops");
    let chat = unique_name("chart-chat");
    let games = unique_name("chart-games");
    let elsewhere = unique_name("chart-other");
    for ns in [&chat, &games, &elsewhere] {
        create_namespace(&client, ns).await?;
    }
    let release = unique_name("hr");
    let name = format!("{release}-herald");
    let result = async {
        helm(&[
            "install",
            &release,
            &chart(),
            "--namespace",
            &ops,
            "--create-namespace",
            "--set",
            &format!("watchNamespaces={{{chat},{games}}}"),
            "--timeout",
            "60s",
        ])?;
        wait_crd(&client).await?;
        let user = format!("system:serviceaccount:{ops}:{name}");
        for ns in [&chat, &games] {
            for &(verb, resource) in NEEDED {
                assert!(
                    can_i(&user, Some(ns), verb, resource)?,
                    "{verb} {resource} in watched {ns}"
                );
            }
            for &(verb, resource) in REFUSED {
                assert!(
                    !can_i(&user, Some(ns), verb, resource)?,
                    "{verb} {resource} in watched {ns}"
                );
            }
        }
        // Nothing in a namespace it does not watch, its own included
        // (beyond its Lease), and nothing across all namespaces.
        for ns in [Some(elsewhere.as_str()), Some(ops.as_str()), None] {
            for &(verb, resource) in NEEDED {
                assert!(
                    !can_i(&user, ns, verb, resource)?,
                    "{verb} {resource} in unwatched {ns:?}"
                );
            }
        }
        for &(verb, resource) in CLUSTER_WRITES {
            assert!(!can_i(&user, None, verb, resource)?, "{verb} {resource}");
        }
        lease_rights(&user, &ops, &chat)?;
        // The objects: Roles in the watched namespaces, no ClusterRole.
        for ns in [&chat, &games] {
            Api::<Role>::namespaced(client.clone(), ns)
                .get(&name)
                .await?;
            Api::<RoleBinding>::namespaced(client.clone(), ns)
                .get(&name)
                .await?;
        }
        assert!(
            Api::<ClusterRole>::all(client.clone())
                .get_opt(&name)
                .await?
                .is_none()
        );
        helm(&["uninstall", &release, "--namespace", &ops, "--wait"])?;
        assert!(
            Api::<Role>::namespaced(client.clone(), &chat)
                .get_opt(&name)
                .await?
                .is_none(),
            "uninstall removes the Roles"
        );
        anyhow::Ok(())
    }
    .await;
    let _ = helm(&["uninstall", &release, "--namespace", &ops]);
    for ns in [&ops, &chat, &games, &elsewhere] {
        let _ = Api::<Namespace>::all(client.clone())
            .delete(ns, &DeleteParams::default())
            .await;
    }
    result
}

#[tokio::test]
async fn install_creates_operator_rbac_crd_lease_and_example() -> anyhow::Result<()> {
    let namespace = unique_name("chart");
    let release = unique_name("hr");
    helm(&[
        "install",
        &release,
        &chart(),
        "--namespace",
        &namespace,
        "--create-namespace",
        "--set",
        "examplePushCluster.enabled=true",
        "--timeout",
        "60s",
    ])?;
    let client = Client::try_default().await?;
    let name = format!("{release}-herald");
    wait_crd(&client).await?;

    let deployment = Api::<Deployment>::namespaced(client.clone(), &namespace)
        .get(&name)
        .await?;
    let pod = deployment
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod spec");
    assert_eq!(pod.service_account_name.as_deref(), Some(name.as_str()));
    Api::<ServiceAccount>::namespaced(client.clone(), &namespace)
        .get(&name)
        .await?;
    let role = Api::<ClusterRole>::all(client.clone()).get(&name).await?;
    assert!(!role.rules.unwrap_or_default().is_empty());
    Api::<Role>::namespaced(client.clone(), &namespace)
        .get(&format!("{name}-leader-election"))
        .await?;
    let service = Api::<Service>::namespaced(client.clone(), &namespace)
        .get(&format!("{name}-metrics"))
        .await?;
    assert_eq!(
        service.spec.and_then(|s| s.ports).unwrap_or_default()[0]
            .name
            .as_deref(),
        Some("metrics")
    );
    // The chart's Lease, held the way the operator holds it (kube-lease-manager
    // applies the holder fields with its own field manager): `helm upgrade`
    // leaves the holder alone.
    let leases = Api::<Lease>::namespaced(client.clone(), &namespace);
    leases.get("herald-operator").await?;
    leases
        .patch(
            "herald-operator",
            &kube::api::PatchParams::apply("herald-operator-pod"),
            &kube::api::Patch::Apply(json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "spec": {"holderIdentity": "operator-pod-0", "leaseDurationSeconds": 15}
            })),
        )
        .await?;
    helm(&[
        "upgrade",
        &release,
        &chart(),
        "--namespace",
        &namespace,
        "--reuse-values",
        "--set",
        "replicas=2",
    ])?;
    let held = leases
        .get("herald-operator")
        .await?
        .spec
        .unwrap_or_default();
    assert_eq!(held.holder_identity.as_deref(), Some("operator-pod-0"));
    assert_eq!(held.lease_duration_seconds, Some(15));

    // The example PushCluster was accepted by the CRD's schema.
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "herald.dev",
        "v1alpha1",
        "PushCluster",
    ));
    let example = Api::<DynamicObject>::namespaced_with(client.clone(), &namespace, &resource)
        .get("example")
        .await?;
    assert_eq!(example.data["spec"]["comet"]["replicas"], 2);

    // Every namespace is watched: what it needs anywhere, still no more.
    let user = format!("system:serviceaccount:{namespace}:{name}");
    let elsewhere = "some-other-namespace";
    for ns in [Some(elsewhere), Some(namespace.as_str()), None] {
        for &(verb, resource) in NEEDED {
            assert!(
                can_i(&user, ns, verb, resource)?,
                "{verb} {resource} in {ns:?}"
            );
        }
    }
    for &(verb, resource) in REFUSED {
        assert!(
            !can_i(&user, Some(elsewhere), verb, resource)?,
            "{verb} {resource}"
        );
    }
    for &(verb, resource) in CLUSTER_WRITES {
        assert!(!can_i(&user, None, verb, resource)?, "{verb} {resource}");
    }
    lease_rights(&user, &namespace, elsewhere)?;

    helm(&["uninstall", &release, "--namespace", &namespace, "--wait"])?;
    assert!(
        Api::<ClusterRole>::all(client.clone())
            .get_opt(&name)
            .await?
            .is_none(),
        "uninstall removes the ClusterRole"
    );
    assert!(
        leases.get_opt("herald-operator").await?.is_none(),
        "uninstall removes the Lease"
    );
    Api::<Namespace>::all(client)
        .delete(&namespace, &DeleteParams::default())
        .await?;
    Ok(())
}
