//! The loopback kubelet (`herald_e2e::kubelet`) on the test bed's real
//! apiserver and controller-manager: Deployment pods become real `herald
//! standalone` processes bound to their own 127.0.0.0/8 pod IPs, with pod
//! status, readiness, restarts and graceful deletion as a kubelet does them,
//! and Secret volumes kept current.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, ensure};
use herald_e2e::eventually;
use herald_e2e::kubelet::{Config, IpPool, Kubelet, pod_ip, pod_ready};
use herald_testkit::http;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ContainerStateWaiting, Event, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::net::TcpStream;

mod common;

use common::k8s::{client, create_namespace, delete_namespace, served_certificate, start_kubelet};

/// Every wait is bounded by this many seconds.
const WAIT: u64 = 60;
/// Logic's HTTP port in the pods (goim's default, on the pod's own IP).
const HTTP_PORT: u16 = 3111;
const TCP_PORT: u16 = 3101;

/// A fresh namespace named after `prefix`, a harness for it lending
/// addresses from 127.0.<third>.0/24 (`configure` changes its settings, given
/// the namespace), and the namespace's pods.
async fn start(
    prefix: &str,
    third: u8,
    configure: impl FnOnce(&mut Config, &str),
) -> anyhow::Result<(Client, String, Kubelet, Api<Pod>)> {
    let client = client().await?;
    let namespace = create_namespace(&client, prefix, "loopback-pods").await?;
    let kubelet = start_kubelet(&client, "loopback_pods", "loopback", third, |config| {
        config.namespaces = vec![namespace.clone()];
        configure(config, &namespace);
    })
    .await?;
    let pods = Api::namespaced(client.clone(), &namespace);
    Ok((client, namespace, kubelet, pods))
}

/// The pod template: `herald standalone` on the pod IP, ready when logic's
/// HTTP API answers.
fn pod_spec() -> serde_json::Value {
    serde_json::json!({
        "terminationGracePeriodSeconds": 10,
        "containers": [{
            "name": "herald",
            "image": "herald:dev",
            "args": [
                "standalone",
                "--tcp-addr=$(POD_IP):3101", "--ws-addr=$(POD_IP):3102",
                "--grpc-addr=$(POD_IP):3109", "--http-addr=$(POD_IP):3111",
                "--logic-grpc-addr=$(POD_IP):3119", "--comet-http-addr=$(POD_IP):3190",
                "--server-id=$(POD_NAMESPACE).$(POD_NAME)", "--public-host=$(POD_IP)",
            ],
            "env": [
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "RUST_LOG", "value": "info"},
            ],
            "ports": [{"name": "tcp", "containerPort": TCP_PORT}, {"name": "http", "containerPort": HTTP_PORT}],
            "readinessProbe": {"httpGet": {"path": "/goim/online/total", "port": "http"},
                               "periodSeconds": 1},
        }],
    })
}

/// GET on logic's HTTP API at the pod's own address; the body of a 200.
async fn http_get(ip: Ipv4Addr, path: &str) -> anyhow::Result<String> {
    let response = http::get((ip, HTTP_PORT), path).await?;
    Ok(response
        .ok()
        .with_context(|| format!("GET {path} on {ip}"))?
        .body)
}

/// Creates pod `name` with `labels`, running `spec`.
async fn create_pod(
    pods: &Api<Pod>,
    name: &str,
    labels: serde_json::Value,
    spec: serde_json::Value,
) -> anyhow::Result<()> {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": labels}, "spec": spec,
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    Ok(())
}

/// Waits for pod `name` to be ready (`what` names that in the timeout
/// error); the pod as it was then.
async fn ready_pod(pods: &Api<Pod>, name: &str, what: &str) -> anyhow::Result<Pod> {
    eventually(WAIT, what, || async {
        let pod = pods.get(name).await?;
        Ok(pod_ready(&pod).then_some(pod))
    })
    .await
}

/// Waits until pod `name`'s container waits with CreateContainerConfigError
/// (`what` names that in the timeout error).
async fn config_error(
    pods: &Api<Pod>,
    name: &str,
    what: &str,
) -> anyhow::Result<ContainerStateWaiting> {
    eventually(WAIT, what, || async {
        let pod = pods.get(name).await?;
        let waiting = pod
            .status
            .and_then(|s| s.container_statuses)
            .and_then(|c| c[0].state.clone())
            .and_then(|s| s.waiting);
        Ok(waiting.filter(|w| w.reason.as_deref() == Some("CreateContainerConfigError")))
    })
    .await
}

fn alive(pid: u32) -> bool {
    i32::try_from(pid).is_ok_and(|pid| kill(Pid::from_raw(pid), None).is_ok())
}

/// Deletes the namespace while the harness still runs (so its pods terminate
/// the way a kubelet ends them), then stops the harness and checks that no
/// process it ever ran is left.
async fn finish(
    client: Client,
    namespace: &str,
    kubelet: Kubelet,
    mut pids: Vec<u32>,
) -> anyhow::Result<()> {
    pids.extend(kubelet.processes().into_values());
    delete_namespace(&client, namespace).await?;
    let pods = Api::<Pod>::namespaced(client, namespace);
    eventually(WAIT, "the namespace's pods gone", || async {
        Ok(pods
            .list(&ListParams::default())
            .await?
            .items
            .is_empty()
            .then_some(()))
    })
    .await?;
    let exits = kubelet.stop().await;
    for pid in &pids {
        ensure!(
            !alive(*pid),
            "process {pid} still alive after the harness stopped"
        );
        ensure!(
            exits.iter().any(|e| e.pid == *pid),
            "no exit recorded for {pid}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn deployment_pods_run_on_loopback_ips_and_scale_down_gracefully() -> anyhow::Result<()> {
    let (client, namespace, kubelet, pods) = start("lbpods", 20, |_, _| {}).await?;

    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "chat"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "chat"}},
            "template": {"metadata": {"labels": {"app": "chat"}}, "spec": pod_spec()},
        }
    }))?;
    let deployments = Api::<Deployment>::namespaced(client.clone(), &namespace);
    deployments
        .create(&PostParams::default(), &deployment)
        .await?;
    let service: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "chat"},
        "spec": {"selector": {"app": "chat"},
                 "ports": [{"name": "tcp", "port": TCP_PORT, "targetPort": "tcp"}]},
    }))?;
    Api::<Service>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &service)
        .await?;

    let started = std::time::Instant::now();
    let running = eventually(WAIT, "2 Running + Ready pods", || async {
        let list = pods.list(&ListParams::default()).await?.items;
        Ok((list.len() == 2 && list.iter().all(pod_ready)).then_some(list))
    })
    .await?;
    eprintln!(
        "Deployment created -> 2 pods Running and Ready in {:?}",
        started.elapsed()
    );
    let mut ips = Vec::new();
    for pod in &running {
        let spec = pod.spec.as_ref().context("spec")?;
        assert_eq!(spec.node_name.as_deref(), Some(kubelet.node_name()));
        let status = pod.status.as_ref().context("status")?;
        assert_eq!(status.host_ip.as_deref(), Some("127.0.0.1"));
        let conditions = status.conditions.as_deref().unwrap_or_default();
        for kind in ["PodScheduled", "Initialized", "ContainersReady", "Ready"] {
            assert!(
                conditions
                    .iter()
                    .any(|c| c.type_ == kind && c.status == "True"),
                "{kind}: {conditions:?}"
            );
        }
        let ip = pod_ip(pod)?;
        assert!(ip.is_loopback() && ip.octets()[..3] == [127, 0, 20], "{ip}");
        let container = &status.container_statuses.as_ref().context("containers")?[0];
        assert!(
            container.ready
                && container
                    .state
                    .as_ref()
                    .is_some_and(|s| s.running.is_some())
        );
        assert_eq!(container.restart_count, 0);
        // Real connections to the pod's own address: comet's TCP port, and
        // logic's HTTP API, which knows this comet by the name built from env.
        TcpStream::connect((ip, TCP_PORT)).await?;
        let name = pod.metadata.name.as_deref().context("name")?;
        let nodes = http_get(ip, "/goim/nodes/instances").await?;
        assert!(nodes.contains(&format!("grpc://{ip}:3109")), "{nodes}");
        assert!(
            nodes.contains(&format!("\"hostname\":\"{namespace}.{name}\"")),
            "{nodes}"
        );
        ensure!(
            kubelet.pid(&namespace, name, "herald").is_some(),
            "no pid for {name}"
        );
        ips.push(ip);
    }
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 2, "distinct pod IPs");
    assert_eq!(kubelet.ips_in_use(), ips);

    // The Service's endpoints: controller-manager's EndpointSlice controller
    // sees both ready pods and their IPs, but the apiserver refuses loopback
    // addresses in EndpointSlices (validation "may not be in the loopback
    // range"), so no slice can list them; the refusal names both IPs. Code
    // that needs the pod addresses reads them from the Pods.
    let events = Api::<Event>::namespaced(client.clone(), &namespace);
    let refusal = eventually(
        WAIT,
        "the EndpointSlice refusal naming both pod IPs",
        || async {
            let list = events
                .list(
                    &ListParams::default()
                        .fields("involvedObject.name=chat,reason=FailedToUpdateEndpointSlices"),
                )
                .await?
                .items;
            Ok(list.into_iter().filter_map(|e| e.message).find(|m| {
                m.contains("may not be in the loopback range")
                    && ips.iter().all(|ip| m.contains(&format!("\"{ip}\"")))
            }))
        },
    )
    .await?;
    assert!(refusal.contains("EndpointSlice"), "{refusal}");
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), &namespace)
        .list(&ListParams::default().labels("kubernetes.io/service-name=chat"))
        .await?
        .items;
    assert!(
        slices
            .iter()
            .all(|s| s.endpoints.as_ref().is_none_or(Vec::is_empty)),
        "no slice can hold loopback addresses: {slices:?}"
    );

    // Scale to 1: exactly one process gets SIGTERM, exits, its pod goes away
    // and its address returns to the pool.
    let before = kubelet.processes();
    deployments
        .patch(
            "chat",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 1}})),
        )
        .await?;
    let scaled = std::time::Instant::now();
    let left = eventually(WAIT, "one pod left", || async {
        let list = pods.list(&ListParams::default()).await?.items;
        Ok((list.len() == 1 && kubelet.processes().len() == 1).then_some(list))
    })
    .await?;
    eprintln!("replicas 2 -> 1: pod gone in {:?}", scaled.elapsed());
    let exits = kubelet.exits();
    assert_eq!(exits.len(), 1, "{exits:?}");
    let exit = &exits[0];
    assert_eq!(
        exit.signals_sent,
        vec!["SIGTERM"],
        "graceful stop: {exit:?}"
    );
    assert_eq!(
        exit.code,
        Some(0),
        "herald exits cleanly on SIGTERM: {exit:?}"
    );
    assert_eq!(before.get(&exit.id), Some(&exit.pid));
    ensure!(!alive(exit.pid), "the stopped process is gone");
    let survivor = kubelet.processes();
    let (id, pid) = survivor.iter().next().context("one process")?;
    assert_eq!(
        before.get(id),
        Some(pid),
        "the other process was left alone"
    );
    assert_eq!(Some(id.pod.as_str()), left[0].metadata.name.as_deref());
    assert_eq!(kubelet.ips_in_use(), vec![pod_ip(&left[0])?]);

    finish(client, &namespace, kubelet, before.into_values().collect()).await
}

#[tokio::test]
async fn killed_process_restarts_and_counts() -> anyhow::Result<()> {
    let (client, namespace, kubelet, pods) = start("lbrestart", 21, |_, _| {}).await?;
    create_pod(&pods, "solo", serde_json::json!({}), pod_spec()).await?;
    let first = ready_pod(&pods, "solo", "pod ready").await?;
    let ip = pod_ip(&first)?;
    let old = kubelet.pid(&namespace, "solo", "herald").context("pid")?;
    kill(Pid::from_raw(i32::try_from(old)?), Signal::SIGKILL)?;

    let again = eventually(WAIT, "restarted and ready again", || async {
        let pod = pods.get("solo").await?;
        let restarts = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .map(|c| c[0].restart_count);
        Ok((restarts == Some(1) && pod_ready(&pod)).then_some(pod))
    })
    .await?;
    let new = kubelet
        .pid(&namespace, "solo", "herald")
        .context("new pid")?;
    assert_ne!(new, old);
    assert_eq!(pod_ip(&again)?, ip, "a restart keeps the pod IP");
    let container = &again
        .status
        .as_ref()
        .context("status")?
        .container_statuses
        .as_ref()
        .context("c")?[0];
    let last = container
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .context("lastState")?;
    assert_eq!(last.exit_code, 137);
    assert_eq!(last.signal, Some(9));
    let exits = kubelet.exits();
    assert_eq!(exits.len(), 1);
    assert!(
        exits[0].signals_sent.is_empty(),
        "the harness did not kill it"
    );
    http_get(ip, "/goim/online/total").await?;

    finish(client, &namespace, kubelet, vec![old, new]).await
}

#[tokio::test]
async fn schedules_only_selected_pods_and_refuses_other_commands() -> anyhow::Result<()> {
    // Pods are picked by their label only, not by namespace.
    let (client, namespace, kubelet, pods) = start("lbselect", 22, |config, namespace| {
        config.namespaces.clear();
        config.label_selector = Some(format!("herald.dev/loopback-test={namespace}"));
    })
    .await?;
    let label = serde_json::json!({"herald.dev/loopback-test": namespace});
    let mut shell = pod_spec();
    shell["containers"][0]["command"] = serde_json::json!(["/bin/sh", "-c", "sleep 1000"]);
    for (name, labels, spec) in [
        ("unselected", serde_json::json!({}), pod_spec()),
        ("shell", label.clone(), shell),
        ("selected", label, pod_spec()),
    ] {
        create_pod(&pods, name, labels, spec).await?;
    }
    ready_pod(&pods, "selected", "the selected pod ready").await?;
    // A container that is not herald is refused with a reason, not run.
    let refused = config_error(&pods, "shell", "the shell pod refused").await?;
    let message = refused.message.unwrap_or_default();
    assert!(message.contains("only herald runs"), "{message}");
    assert!(kubelet.pid(&namespace, "shell", "herald").is_none());
    let shell = pods.get("shell").await?;
    assert_eq!(
        shell.status.and_then(|s| s.phase).as_deref(),
        Some("Pending")
    );

    // The pod without the label was never bound, to this node or any.
    let unselected = pods.get("unselected").await?;
    assert_eq!(unselected.spec.and_then(|s| s.node_name), None);
    assert_eq!(kubelet.processes().len(), 1);

    finish(client, &namespace, kubelet, Vec::new()).await
}

#[tokio::test]
async fn dropping_the_harness_stops_its_processes() -> anyhow::Result<()> {
    let (client, namespace, kubelet, pods) = start("lbdrop", 24, |_, _| {}).await?;
    create_pod(&pods, "solo", serde_json::json!({}), pod_spec()).await?;
    ready_pod(&pods, "solo", "pod ready").await?;
    let pid = kubelet.pid(&namespace, "solo", "herald").context("pid")?;
    drop(kubelet);
    eventually(
        WAIT,
        "the process gone after the handle was dropped",
        || async { Ok((!alive(pid)).then_some(())) },
    )
    .await?;
    // Its pod stays behind on a node nobody runs, as with a vanished kubelet.
    delete_namespace(&client, &namespace).await
}

#[tokio::test]
async fn no_grace_period_means_sigterm_then_sigkill() -> anyhow::Result<()> {
    let (client, namespace, kubelet, pods) = start("lbkill", 25, |_, _| {}).await?;
    let mut spec = pod_spec();
    spec["terminationGracePeriodSeconds"] = serde_json::json!(0);
    create_pod(&pods, "solo", serde_json::json!({}), spec).await?;
    ready_pod(&pods, "solo", "pod ready").await?;
    let pid = kubelet.pid(&namespace, "solo", "herald").context("pid")?;
    pods.delete("solo", &DeleteParams::default()).await?;
    let exit = eventually(WAIT, "the process ended", || async {
        Ok(kubelet.exits().into_iter().find(|e| e.pid == pid))
    })
    .await?;
    // Grace 0: no time between the two signals, so SIGKILL is what ends it.
    assert_eq!(exit.signals_sent, vec!["SIGTERM", "SIGKILL"], "{exit:?}");
    assert_eq!(exit.signal, Some(9), "{exit:?}");
    ensure!(!alive(pid), "killed process gone");
    eventually(WAIT, "the pod IP back in the pool", || async {
        Ok(kubelet.ips_in_use().is_empty().then_some(()))
    })
    .await?;
    finish(client, &namespace, kubelet, vec![pid]).await
}

#[tokio::test]
async fn failing_liveness_probe_restarts_the_process() -> anyhow::Result<()> {
    let (client, namespace, kubelet, pods) = start("lblive", 27, |_, _| {}).await?;
    let mut spec = pod_spec();
    // Logic answers 404 here: the process is alive but fails its probe.
    spec["containers"][0]["livenessProbe"] = serde_json::json!({
        "httpGet": {"path": "/no-such-path", "port": "http"},
        "periodSeconds": 1, "failureThreshold": 2,
    });
    create_pod(&pods, "solo", serde_json::json!({}), spec).await?;
    let first = eventually(WAIT, "the first process", || async {
        Ok(kubelet.pid(&namespace, "solo", "herald"))
    })
    .await?;
    let exit = eventually(WAIT, "the liveness kill", || async {
        Ok(kubelet.exits().into_iter().find(|e| e.pid == first))
    })
    .await?;
    assert_eq!(exit.signals_sent, vec!["SIGTERM"], "{exit:?}");
    assert_eq!(
        exit.code,
        Some(0),
        "herald stops cleanly on SIGTERM: {exit:?}"
    );
    eventually(WAIT, "restartCount 1", || async {
        let pod = pods.get("solo").await?;
        let restarts = pod
            .status
            .and_then(|s| s.container_statuses)
            .map(|c| c[0].restart_count);
        Ok((restarts >= Some(1)).then_some(()))
    })
    .await?;
    let pids = kubelet.exits().into_iter().map(|e| e.pid).collect();
    finish(client, &namespace, kubelet, pids).await
}

#[tokio::test]
async fn a_full_pool_keeps_pods_pending_until_an_address_returns() -> anyhow::Result<()> {
    let only = Ipv4Addr::new(127, 0, 28, 1);
    let (client, namespace, kubelet, pods) = start("lbpool", 28, |config, _| {
        config.pool = IpPool::new(only, only).expect("a one-address pool");
    })
    .await?;
    for name in ["first", "second"] {
        create_pod(&pods, name, serde_json::json!({}), pod_spec()).await?;
        if name == "first" {
            ready_pod(&pods, "first", "the first pod ready").await?;
        }
    }
    assert_eq!(pod_ip(&pods.get("first").await?)?, only);
    // Bound to the node, but no address for it: Pending, nothing running.
    let second = eventually(WAIT, "the second pod bound", || async {
        let pod = pods.get("second").await?;
        Ok(pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .map(|_| pod))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = pods
        .get(second.metadata.name.as_deref().context("name")?)
        .await?;
    let status = second.status.context("status")?;
    assert_eq!(status.phase.as_deref(), Some("Pending"));
    assert_eq!(status.pod_ip, None);
    assert_eq!(kubelet.processes().len(), 1);

    let first_pid = kubelet.pid(&namespace, "first", "herald").context("pid")?;
    pods.delete("first", &DeleteParams::default()).await?;
    let second = ready_pod(&pods, "second", "the second pod ready on the freed address").await?;
    assert_eq!(pod_ip(&second)?, only);
    finish(client, &namespace, kubelet, vec![first_pid]).await
}

#[tokio::test]
async fn env_from_config_maps_and_secrets_waits_for_a_missing_secret() -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    let (client, namespace, kubelet, pods) = start("lbenv", 29, |_, _| {}).await?;
    let config_map: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "settings"}, "data": {"SITE": "eu"},
    }))?;
    Api::<ConfigMap>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &config_map)
        .await?;
    let mut spec = pod_spec();
    let container = &mut spec["containers"][0];
    container["envFrom"] =
        serde_json::json!([{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}]);
    container["env"]
        .as_array_mut()
        .context("env")?
        .push(serde_json::json!({"name": "SHARD", "valueFrom": {"secretKeyRef": {"name": "shard", "key": "id"}}}));
    for arg in container["args"].as_array_mut().context("args")? {
        if arg.as_str().is_some_and(|a| a.starts_with("--server-id=")) {
            *arg = serde_json::json!("--server-id=$(CFG_SITE)-$(SHARD)-$(POD_NAME)");
        }
    }
    create_pod(&pods, "solo", serde_json::json!({}), spec).await?;

    // The Secret does not exist yet: the container waits with the reason.
    let waiting = config_error(&pods, "solo", "CreateContainerConfigError").await?;
    let message = waiting.message.unwrap_or_default();
    assert!(
        message.contains("shard") && message.contains("id"),
        "{message}"
    );
    assert!(kubelet.processes().is_empty());

    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "shard"}, "stringData": {"id": "7"},
    }))?;
    Api::<Secret>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &secret)
        .await?;
    let pod = ready_pod(&pods, "solo", "pod ready once the Secret exists").await?;
    // Logic knows the comet by the name expanded from all three sources.
    let nodes = http_get(pod_ip(&pod)?, "/goim/nodes/instances").await?;
    assert!(nodes.contains("\"hostname\":\"eu-7-solo\""), "{nodes}");
    finish(client, &namespace, kubelet, Vec::new()).await
}

/// One NUL-separated entry of `/proc/{pid}/{file}` (cmdline, environ)
/// starting with `prefix`.
fn proc_entry(pid: u32, file: &str, prefix: &str) -> anyhow::Result<String> {
    let raw = std::fs::read(format!("/proc/{pid}/{file}"))?;
    raw.split(|b| *b == 0)
        .map(String::from_utf8_lossy)
        .find(|entry| entry.starts_with(prefix))
        .map(|entry| entry.into_owned())
        .with_context(|| format!("no {prefix}… in /proc/{pid}/{file}"))
}

/// The command-line argument after `flag` in `/proc/{pid}/cmdline`.
fn proc_entry_after(pid: u32, flag: &str) -> anyhow::Result<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    let args: Vec<_> = raw
        .split(|b| *b == 0)
        .map(String::from_utf8_lossy)
        .collect();
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(|a| a.clone().into_owned())
        .with_context(|| format!("no argument after {flag}"))
}

#[tokio::test]
async fn secret_volume_is_mounted_mapped_and_kept_current() -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Secret;
    let (client, namespace, kubelet, pods) = start("lbvol", 23, |_, _| {}).await?;
    let a = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let b = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(a.cert.der().clone())?;
    roots.add(b.cert.der().clone())?;
    // A comet serving WSS with the Secret's pair, named by container paths
    // three ways: an env value, an arg through $(VAR), and a plain arg.
    let spec = serde_json::json!({
        "terminationGracePeriodSeconds": 5,
        "volumes": [{"name": "tls", "secret": {"secretName": "comet-tls"}}],
        "containers": [{
            "name": "comet",
            "image": "herald:dev",
            "args": [
                "comet",
                "--tcp-addr=$(POD_IP):3101", "--ws-addr=$(POD_IP):3102",
                "--wss-addr=$(POD_IP):3103", "--grpc-addr=$(POD_IP):3109",
                "--http-addr=$(POD_IP):3190", "--logic-addr=127.0.0.1:9",
                "--tls-cert=$(TLS_DIR)/tls.crt", "--tls-reload-ms=200",
                "--node-list", "/etc/herald/tls/missing.json",
            ],
            "env": [
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "TLS_DIR", "value": "/etc/herald/tls"},
                {"name": "HERALD_COMET_TLS_KEY", "value": "/etc/herald/tls/tls.key"},
            ],
            "volumeMounts": [{"name": "tls", "mountPath": "/etc/herald/tls", "readOnly": true}],
        }],
    });
    create_pod(&pods, "comet", serde_json::json!({}), spec).await?;

    // No Secret yet: Pending, ContainerCreating naming it, no process.
    let waiting = eventually(WAIT, "ContainerCreating for the missing Secret", || async {
        let pod = pods.get("comet").await?;
        let status = pod.status.context("status")?;
        let waiting = status
            .container_statuses
            .and_then(|c| c[0].state.clone())
            .and_then(|s| s.waiting)
            .filter(|w| w.reason.as_deref() == Some("ContainerCreating") && w.message.is_some());
        Ok(waiting.filter(|_| status.phase.as_deref() == Some("Pending")))
    })
    .await?;
    let message = waiting.message.unwrap_or_default();
    assert!(
        message.contains("comet-tls") && message.contains("not found"),
        "{message}"
    );
    assert!(kubelet.processes().is_empty());

    let secrets = Api::<Secret>::namespaced(client.clone(), &namespace);
    let secret = |cert: &rcgen::CertifiedKey<rcgen::KeyPair>| -> anyhow::Result<Secret> {
        Ok(serde_json::from_value(serde_json::json!({
            "metadata": {"name": "comet-tls"}, "type": "kubernetes.io/tls",
            "stringData": {"tls.crt": cert.cert.pem(), "tls.key": cert.signing_key.serialize_pem()},
        }))?)
    };
    secrets.create(&PostParams::default(), &secret(&a)?).await?;
    let pod = ready_pod(&pods, "comet", "the comet running once its Secret exists").await?;
    let ip = pod_ip(&pod)?;
    let pid = kubelet.pid(&namespace, "comet", "comet").context("pid")?;

    // The container paths were mapped onto the pod's own volume directory.
    let cert_arg = proc_entry(pid, "cmdline", "--tls-cert=")?;
    let cert_path = cert_arg.trim_start_matches("--tls-cert=");
    let key_path = proc_entry(pid, "environ", "HERALD_COMET_TLS_KEY=")?
        .trim_start_matches("HERALD_COMET_TLS_KEY=")
        .to_owned();
    for path in [cert_path, key_path.as_str()] {
        ensure!(
            path.contains(&format!("/{namespace}/comet-")) && path.contains("/volumes/tls/"),
            "{path} is not under the pod's run directory"
        );
    }
    let node_list = proc_entry_after(pid, "--node-list")?;
    ensure!(
        node_list.ends_with("/volumes/tls/missing.json") && !node_list.starts_with("/etc/"),
        "--node-list {node_list}"
    );
    assert_eq!(std::fs::read_to_string(cert_path)?, a.cert.pem());
    assert_eq!(
        std::fs::read_to_string(&key_path)?,
        a.signing_key.serialize_pem()
    );
    let served = eventually(WAIT, "WSS answering", || async {
        Ok(served_certificate((ip, 3103), &roots).await.ok())
    })
    .await?;
    assert_eq!(served, a.cert.der().to_vec(), "certificate A served");

    // The Secret changes: the files follow, and the comet serves B.
    secrets
        .replace("comet-tls", &PostParams::default(), &secret(&b)?)
        .await?;
    eventually(WAIT, "the volume's files updated", || async {
        Ok((std::fs::read_to_string(cert_path)? == b.cert.pem()
            && std::fs::read_to_string(&key_path)? == b.signing_key.serialize_pem())
        .then_some(()))
    })
    .await?;
    eventually(WAIT, "certificate B served", || async {
        let served = served_certificate((ip, 3103), &roots).await?;
        Ok((served == b.cert.der().to_vec()).then_some(()))
    })
    .await?;
    assert_eq!(
        kubelet.pid(&namespace, "comet", "comet"),
        Some(pid),
        "no restart"
    );
    finish(client, &namespace, kubelet, vec![pid]).await
}
