//! The chart's Grafana dashboard (`charts/herald/dashboards/herald.json`)
//! reads metrics that exist: every metric name in its PromQL is checked
//! against the real `/metrics` output of running `herald logic`, `comet`,
//! `job` and `operator` processes (Redis, Kafka and the apiserver of the
//! test bed). A renamed metric, or a dashboard typo, fails here instead of
//! showing an empty panel.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, ensure};
use herald_client::{Client, Token};
use herald_e2e::{testbed_var, unique_name};
use herald_operator::crd::PushCluster;
use herald_testkit::http;
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::{DeleteParams, PostParams};

mod common;

use common::roles::{self, CometPorts, LogicPorts, Procs, loopback as addr};

const WAIT: Duration = Duration::from_secs(30);

fn dashboard() -> anyhow::Result<serde_json::Value> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/herald/dashboards/herald.json"
    );
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

/// Every query in the dashboard: each panel's `expr` (panels in rows
/// included) and each template variable's `definition`.
fn exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// The metric names a PromQL expression reads: identifiers followed by a
/// selector, a range or the end of a vector, i.e. every `herald_*` word
/// (functions, `by` labels and label values are not `herald_` words; label
/// values in quotes are skipped).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut in_quotes = false;
    let mut word = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c == '"' {
            in_quotes = !in_quotes;
            word.clear();
            continue;
        }
        if in_quotes {
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else {
            if word.starts_with("herald_") {
                names.insert(std::mem::take(&mut word));
            }
            word.clear();
        }
    }
    names
}

/// The label names each `herald_*{...}` selector of `expr` matches on, as
/// `(metric, label)`.
fn matchers(expr: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("herald_") {
        rest = &rest[start..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        let metric = &rest[..end];
        rest = &rest[end..];
        let Some(body) = rest.strip_prefix('{') else {
            continue;
        };
        let close = body.find('}').unwrap_or(body.len());
        for matcher in body[..close].split(',') {
            let label = matcher
                .split(['=', '!', '~'])
                .next()
                .unwrap_or_default()
                .trim();
            if !label.is_empty() {
                out.push((metric.to_owned(), label.to_owned()));
            }
        }
        rest = &body[close..];
    }
    out
}

/// The sample names an exposition offers: every sample line's name, and for
/// each declared family (`# TYPE`), the names its type gives its samples, so
/// a family with no labelled child yet still counts.
fn exposed(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            match kind {
                "counter" => {
                    names.insert(format!("{name}_total"));
                }
                "histogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
                _ => {
                    names.insert(name.to_owned());
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

#[test]
fn metric_names_are_read_from_promql() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le) (rate(herald_comet_push_write_latency_seconds_bucket{a="herald_x"}[$__rate_interval]))) / herald_y"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["herald_comet_push_write_latency_seconds_bucket", "herald_y"]
    );
    let text = "# TYPE herald_a counter\n# TYPE herald_b histogram\n# TYPE herald_c gauge\nherald_d{x=\"1\"} 2\n";
    let exposed = exposed(text);
    for name in [
        "herald_a_total",
        "herald_b_bucket",
        "herald_b_count",
        "herald_c",
        "herald_d",
    ] {
        assert!(exposed.contains(name), "{name}");
    }
    assert!(!exposed.contains("herald_a"));
    assert_eq!(
        matchers(r#"sum(rate(herald_a_total{outcome="ok", x=~"$x"}[5m])) / herald_b{y!="z"}"#),
        [
            ("herald_a_total".to_owned(), "outcome".to_owned()),
            ("herald_a_total".to_owned(), "x".to_owned()),
            ("herald_b".to_owned(), "y".to_owned())
        ]
    );
}

/// Scrapes `role`'s `/metrics` until it offers every name of `wanted` that
/// starts `herald_<role>_` (a labelled family appears with its first child).
async fn scrape_until(
    role: &str,
    port: u16,
    wanted: &BTreeSet<String>,
) -> anyhow::Result<(BTreeSet<String>, String)> {
    let prefix = format!("herald_{role}_");
    let mine: BTreeSet<&String> = wanted.iter().filter(|n| n.starts_with(&prefix)).collect();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let body = http::get(("127.0.0.1", port), "/metrics")
            .await
            .with_context(|| format!("{role} /metrics"))?
            .ok()?
            .body;
        let offered = exposed(&body);
        let missing: Vec<&&String> = mine.iter().filter(|n| !offered.contains(**n)).collect();
        if missing.is_empty() {
            return Ok((offered, body));
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the dashboard queries {role} metrics its /metrics never offered: {missing:?}\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn node(name: &str, grpc: u16, tcp: u16, ws: u16) -> serde_json::Value {
    serde_json::json!({"name": name, "grpc": addr(grpc), "hosts": ["127.0.0.1"],
        "addrs": ["127.0.0.1"], "tcp_port": tcp, "ws_port": ws, "wss_port": 0,
        "weight": 10, "connections": 0, "client_ips": 0, "draining": false})
}

fn write_nodes(path: &Path, generation: u64, nodes: &[serde_json::Value]) -> anyhow::Result<()> {
    let list = serde_json::json!({
        "generation": generation, "updated": "2026-12-07T10:00:00Z", "nodes": nodes
    });
    // Written whole and renamed, so a poll never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&list)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Every metric the dashboard reads, produced by the processes doing what
/// the panels watch: a client connected and pushed to, a broadcast that
/// fails towards a comet that is down and is given up once that comet
/// leaves the node list, a PushCluster the operator reports and fails to
/// reconcile (its name is too long for its Services) and stops reporting
/// once deleted, and a comet whose logic has gone when a client leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_queries_read_metrics_the_processes_expose() -> anyhow::Result<()> {
    // What the dashboard asks, checked first: nothing to run if it is empty.
    let mut all = Vec::new();
    exprs(&dashboard()?, &mut all);
    ensure!(all.len() >= 10, "too few queries: {all:?}");
    let mut wanted = BTreeSet::new();
    for expr in &all {
        let names = metric_names(expr);
        ensure!(
            !names.is_empty(),
            "a query that reads no herald metric: {expr}"
        );
        wanted.extend(names);
    }
    for role in ["operator", "comet", "logic", "job"] {
        ensure!(
            wanted
                .iter()
                .any(|n| n.starts_with(&format!("herald_{role}_"))),
            "no {role} metric in the dashboard: {wanted:?}"
        );
    }

    let redis = testbed_var("HERALD_REDIS_URL");
    let brokers = testbed_var("HERALD_KAFKA_BROKERS");
    testbed_var("KUBECONFIG");
    let client = kube::Client::try_default().await?;
    herald_e2e::install_pushcluster_crd(&client).await?;
    // The operator watches a namespace of its own: it must not act on
    // other tests' PushClusters.
    let namespace = unique_name("dashboard");
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": namespace}}))?;
    let namespaces = Api::<Namespace>::all(client.clone());
    namespaces.create(&PostParams::default(), &ns).await?;

    let topic = unique_name("dashboard");
    common::create_topic(&brokers, &topic, 1).await?;
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("chart_metrics")
        .join(&topic);
    std::fs::create_dir_all(&dir)?;
    let (logic, comet) = (LogicPorts::free(), CometPorts::free());
    let [job_http, operator, dead] = [(); 3].map(|()| herald_e2e::free_port());
    let (logic_http, comet_tcp, comet_http) = (logic.http, comet.tcp, comet.http);
    let nodes = dir.join("nodes.json");
    let live = node("comet-dash", comet.grpc, comet.tcp, comet.ws);
    // Listed, but nothing listens on its gRPC port.
    write_nodes(
        &nodes,
        1,
        &[live.clone(), node("comet-down", dead, dead, dead)],
    )?;
    let nodes_arg = nodes.display().to_string();
    let group = unique_name("dashboard-job");
    let lease = unique_name("dashboard-operator");

    let mut procs = Procs::default();
    let result = async {
        let node_list = ["--node-list".to_owned(), nodes_arg.clone()];
        let at = |role, name| roles::herald(role, name, &dir);
        let logic_args = logic.args(&redis, &brokers, &topic);
        procs
            .start(
                at("logic", "logic").args(logic_args).args(&node_list),
                &[logic.http, logic.grpc],
                WAIT,
            )
            .await?;
        procs
            .start(
                at("comet", "comet").args(comet.args("comet-dash", logic.grpc)),
                &[comet.tcp, comet.http],
                WAIT,
            )
            .await?;
        procs
            .start(
                at("job", "job")
                    .args(roles::job_args(&brokers, &topic, &group, job_http))
                    .args(&node_list)
                    .args(["--node-list-poll-ms", "200"]),
                &[job_http],
                WAIT,
            )
            .await?;
        procs
            .start(
                at("operator", "operator").args([
                    "--namespace",
                    &namespace,
                    "--lease-namespace",
                    &namespace,
                    "--lease-name",
                    &lease,
                    "--metrics-addr",
                    &addr(operator),
                    "--poll-interval-ms",
                    "500",
                ]),
                &[operator],
                WAIT,
            )
            .await?;

        // Operator: a PushCluster it reports, and fails to apply.
        let long = "dashboard-cluster-whose-name-is-too-long-for-service-names";
        let cluster: PushCluster = serde_json::from_value(serde_json::json!({
            "apiVersion": "herald.dev/v1alpha1", "kind": "PushCluster",
            "metadata": {"name": long, "namespace": namespace},
            "spec": {"image": "herald:dev", "redis": {"addr": "redis:6379"},
                     "kafka": {"brokers": ["kafka:9092"]}}
        }))?;
        Api::<PushCluster>::namespaced(client.clone(), &namespace)
            .create(&PostParams::default(), &cluster)
            .await?;

        // Push path: a client, a key push it receives, a broadcast.
        let token = Token::new(1, "dash-key").room("live://1").accepts([1000]);
        let mut tcp = Client::connect_tcp(addr(comet_tcp))
            .await?
            .with_timeout(WAIT);
        tcp.auth(&token).await.context("auth")?;
        common::logic_call(
            addr(logic_http),
            None,
            "POST",
            "/goim/push/keys?operation=1000&keys=dash-key",
            b"hi",
        )
        .await?;
        let push = tcp.next_push().await?;
        ensure!(&push.body[..] == b"hi", "{push:?}");
        common::logic_call(
            addr(logic_http),
            None,
            "POST",
            "/goim/push/all?operation=1000",
            b"all",
        )
        .await?;
        tcp.next_push().await?;
        // job retries the broadcast towards the comet that is down until it
        // leaves the list, then gives it up.
        let (mut offered, mut bodies) = scrape_until("logic", logic_http, &wanted).await?;
        let failing = BTreeSet::from(["herald_job_comet_call_failures_total".to_owned()]);
        scrape_until("job", job_http, &failing).await?;
        write_nodes(&nodes, 2, &[live])?;
        // The operator's gauges for the PushCluster, once its pass ran.
        let cluster_series = BTreeSet::from([format!(
            r#"herald_operator_cluster_connections{{namespace="{namespace}",pushcluster="{long}"}}"#
        )]);
        for (role, port) in [("job", job_http), ("operator", operator)] {
            let (names, body) = scrape_until(role, port, &wanted).await?;
            offered.extend(names);
            bodies.push_str(&body);
        }
        ensure!(
            cluster_series.iter().all(|s| bodies.contains(s.as_str())),
            "no {cluster_series:?} in the operator's /metrics:\n{bodies}"
        );

        // Logic goes away; the client leaving makes comet's Disconnect fail.
        let logic = procs.0.remove(0);
        drop(logic);
        tcp.close().await.ok();
        let (names, body) = scrape_until("comet", comet_http, &wanted).await?;
        offered.extend(names);
        bodies.push_str(&body);

        let missing: Vec<&String> = wanted.difference(&offered).collect();
        ensure!(
            missing.is_empty(),
            "the dashboard queries metrics no process exposes: {missing:?}"
        );
        // Labels the queries select on are labels those metrics carry.
        for (metric, label) in all.iter().flat_map(|e| matchers(e)) {
            let carried = bodies.lines().any(|line| {
                line.strip_prefix(metric.as_str())
                    .and_then(|rest| rest.strip_prefix('{'))
                    .is_some_and(|labels| labels.contains(&format!("{label}=\"")))
            });
            ensure!(
                carried,
                "no {metric} sample carries the label {label:?} the dashboard selects on"
            );
        }
        // A deleted PushCluster's series go with it (once its finalizer
        // is released), so the gauges stay bounded by the clusters that exist.
        Api::<PushCluster>::namespaced(client.clone(), &namespace)
            .delete(long, &DeleteParams::default())
            .await?;
        let gone = format!(r#"pushcluster="{long}""#);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let body = http::get(("127.0.0.1", operator), "/metrics")
                .await?
                .ok()?
                .body;
            if !body.contains(&gone) {
                break;
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "the deleted PushCluster is still reported:\n{body}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::Ok(())
    }
    .await;
    if result.is_err() {
        procs.print_logs();
    }
    for mut p in procs.0 {
        let _ = p.stop(Duration::from_secs(10)).await;
    }
    // Finalizers released first: the operator that would is stopped.
    let _ = common::operator::delete_namespace(&client, &namespace).await;
    result
}

#[test]
fn dashboard_has_the_panels_an_sre_needs() -> anyhow::Result<()> {
    let dashboard = dashboard()?;
    let mut titles = Vec::new();
    let mut stack = vec![&dashboard["panels"]];
    while let Some(serde_json::Value::Array(panels)) = stack.pop() {
        for panel in panels {
            titles.push(panel["title"].as_str().unwrap_or_default().to_owned());
            stack.push(&panel["panels"]);
        }
    }
    for needed in [
        "Connections per cluster",
        "Pushes/s",
        "Push latency",
        "Reconcile duration",
        "Reconcile errors",
        "Drains in progress",
    ] {
        ensure!(
            titles.iter().any(|t| t == needed),
            "no {needed:?} panel: {titles:?}"
        );
    }
    // One data source variable, chosen at import.
    ensure!(dashboard["templating"]["list"][0]["type"] == "datasource");
    Ok(())
}
