//! A user-space stand-in for kube-proxy on the loopback test bed.
//!
//! The test bed has Services (the apiserver hands out ClusterIPs from
//! 127.100.0.0/16) but nothing that routes them, and the apiserver refuses
//! loopback pod IPs in EndpointSlices. [`ServiceProxy`] closes that gap the
//! way kube-proxy's old user-space mode did: for every TCP port of every
//! ClusterIP Service in the namespaces it watches it listens on
//! `ClusterIP:port`, and forwards each accepted connection to a Ready pod
//! matching the Service's selector (read from the Pods, round robin), at the
//! port's `targetPort` (a number, or a container port name).
//!
//! A Service without a Ready pod has no listener, so a client gets
//! "connection refused" as kube-proxy's REJECT rule gives it; otherwise an
//! accepted-then-closed connection would look like a reachable backend.
//!
//! It binds and dials only 127.0.0.0/8: Services whose ClusterIP is not
//! loopback are ignored, and pods whose IP is not loopback are never dialled.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service, ServicePort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Client;
use kube::api::{Api, ListParams};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info, info_span, warn};

/// How often the Services are listed again (new, changed, deleted).
const RESYNC: Duration = Duration::from_millis(300);

/// What one listener forwards to; replaced on every resync.
#[derive(Clone, Debug, PartialEq)]
struct Target {
    namespace: String,
    /// Ready pods' `IP:targetPort`, sorted.
    endpoints: Vec<SocketAddr>,
}

/// One `ClusterIP:port` listener; dropping it closes the socket.
struct Listener {
    target: Arc<Mutex<Target>>,
    task: JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A running proxy; [`ServiceProxy::stop`] (or dropping it) closes every
/// listener. Connections already forwarded end with their peers.
#[derive(Debug)]
pub struct ServiceProxy {
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    forwarded: Arc<AtomicUsize>,
}

impl ServiceProxy {
    /// Starts proxying the Services of `namespaces`.
    pub fn start(client: Client, namespaces: Vec<String>) -> ServiceProxy {
        let (shutdown, stopped) = watch::channel(false);
        let forwarded = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(
            sync_loop(client, namespaces, stopped, forwarded.clone())
                .instrument(info_span!("service-proxy")),
        );
        ServiceProxy {
            shutdown,
            task: Some(task),
            forwarded,
        }
    }

    /// Connections forwarded to a pod so far.
    pub fn forwarded(&self) -> usize {
        self.forwarded.load(Ordering::Relaxed)
    }

    /// Closes every listener and waits for the proxy task.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for ServiceProxy {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

async fn sync_loop(
    client: Client,
    namespaces: Vec<String>,
    mut stopped: watch::Receiver<bool>,
    forwarded: Arc<AtomicUsize>,
) {
    let mut listeners: HashMap<SocketAddrV4, Listener> = HashMap::new();
    loop {
        let mut wanted: HashMap<SocketAddrV4, Target> = HashMap::new();
        let mut complete = true;
        for namespace in &namespaces {
            match list(&client, namespace).await {
                Ok((services, pods)) => {
                    for service in &services {
                        wanted.extend(routes(namespace, service, &pods));
                    }
                }
                Err(err) => {
                    warn!(%namespace, cause = %err, "listing Services and Pods");
                    complete = false;
                }
            }
        }
        // A failed list keeps what runs rather than closing it.
        if complete {
            listeners.retain(|addr, _| {
                let keep = wanted.contains_key(addr);
                if !keep {
                    info!(%addr, "Service gone; closing its listener");
                }
                keep
            });
        }
        for (addr, target) in wanted {
            if let Some(listener) = listeners.get(&addr) {
                let mut current = listener
                    .target
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if *current != target {
                    *current = target;
                }
                continue;
            }
            match TcpListener::bind(addr).await {
                Ok(socket) => {
                    info!(%addr, namespace = %target.namespace, "proxying");
                    let target = Arc::new(Mutex::new(target));
                    let task = tokio::spawn(accept_loop(socket, target.clone(), forwarded.clone()));
                    listeners.insert(addr, Listener { target, task });
                }
                Err(err) => warn!(%addr, cause = %err, "cannot listen; retrying"),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(RESYNC) => {}
            _ = stopped.changed() => break,
        }
    }
    drop(listeners);
}

async fn list(client: &Client, namespace: &str) -> Result<(Vec<Service>, Vec<Pod>), kube::Error> {
    let services = Api::<Service>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await?;
    let pods = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await?;
    Ok((services.items, pods.items))
}

/// The loopback `ClusterIP:port` addresses of one Service that have a Ready
/// endpoint, and those endpoints.
fn routes(namespace: &str, service: &Service, pods: &[Pod]) -> Vec<(SocketAddrV4, Target)> {
    let Some(spec) = service.spec.as_ref() else {
        return Vec::new();
    };
    let Some(ip) = spec
        .cluster_ip
        .as_deref()
        .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
        .filter(Ipv4Addr::is_loopback)
    else {
        return Vec::new();
    };
    let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
        return Vec::new();
    };
    let ready: Vec<(Ipv4Addr, &Pod)> = pods
        .iter()
        .filter(|pod| selects(selector, pod) && is_ready(pod))
        .filter_map(|pod| {
            let ip: Ipv4Addr = pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
            ip.is_loopback().then_some((ip, pod))
        })
        .collect();
    spec.ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok()?;
            let mut endpoints: Vec<SocketAddr> = ready
                .iter()
                .filter_map(|(ip, pod)| Some(SocketAddr::from((*ip, target_port(p, pod)?))))
                .collect();
            endpoints.sort();
            (!endpoints.is_empty()).then(|| {
                (
                    SocketAddrV4::new(ip, port),
                    Target {
                        namespace: namespace.to_owned(),
                        endpoints,
                    },
                )
            })
        })
        .collect()
}

fn selects(selector: &BTreeMap<String, String>, pod: &Pod) -> bool {
    let labels = pod.metadata.labels.as_ref();
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// The port `service_port` reaches on `pod`: `targetPort` as a number, or
/// the pod's container port of that name; the port itself when unset.
fn target_port(service_port: &ServicePort, pod: &Pod) -> Option<u16> {
    match service_port.target_port.as_ref() {
        None => u16::try_from(service_port.port).ok(),
        Some(IntOrString::Int(port)) => u16::try_from(*port).ok(),
        Some(IntOrString::String(name)) => pod
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn accept_loop(socket: TcpListener, target: Arc<Mutex<Target>>, forwarded: Arc<AtomicUsize>) {
    let mut next = 0usize;
    loop {
        let (mut inbound, peer) = match socket.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                warn!(cause = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let endpoints = target
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .endpoints
            .clone();
        // Round robin; `routes` never yields a target without endpoints.
        let Some(endpoint) = endpoints.get(next % endpoints.len().max(1)).copied() else {
            continue;
        };
        next = next.wrapping_add(1);
        let forwarded = forwarded.clone();
        tokio::spawn(async move {
            match TcpStream::connect(endpoint).await {
                Ok(mut outbound) => {
                    forwarded.fetch_add(1, Ordering::Relaxed);
                    // Either side closing or failing ends both, as with a
                    // real proxy.
                    if let Err(err) =
                        tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await
                    {
                        debug!(%peer, %endpoint, cause = %err, "forwarded connection ended");
                    }
                }
                // Dropping `inbound` resets it, as a dead endpoint would.
                Err(err) => warn!(%peer, %endpoint, cause = %err, "cannot forward"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(cluster_ip: &str, target_port: serde_json::Value) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "logic"},
            "spec": {"clusterIP": cluster_ip, "selector": {"app": "logic"},
                     "ports": [{"name": "grpc", "port": 3119, "targetPort": target_port},
                               {"name": "dns", "port": 53, "protocol": "UDP"}]}
        }))
        .unwrap()
    }

    fn pod(ip: &str, app: &str, ready: bool, deleting: bool) -> Pod {
        let mut meta = serde_json::json!({"name": ip, "labels": {"app": app}});
        if deleting {
            meta["deletionTimestamp"] = "2026-01-01T00:00:00Z".into();
        }
        serde_json::from_value(serde_json::json!({
            "metadata": meta,
            "spec": {"containers": [{"name": "c", "ports": [{"name": "rpc", "containerPort": 9000}]}]},
            "status": {"podIP": ip, "conditions": [{"type": "Ready",
                                                     "status": if ready { "True" } else { "False" }}]}
        }))
        .unwrap()
    }

    #[test]
    fn routes_only_ready_selected_loopback_pods() {
        let pods = [
            pod("127.0.31.2", "logic", true, false),
            pod("127.0.31.1", "logic", true, false),
            pod("127.0.31.3", "logic", false, false),
            pod("127.0.31.4", "logic", true, true),
            pod("127.0.31.5", "comet", true, false),
            pod("10.0.0.1", "logic", true, false),
        ];
        let routes = routes("ns", &service("127.100.0.7", 3119.into()), &pods);
        assert_eq!(routes.len(), 1, "the UDP port is not proxied");
        let (addr, target) = &routes[0];
        assert_eq!(addr.to_string(), "127.100.0.7:3119");
        let endpoints: Vec<String> = target.endpoints.iter().map(|e| e.to_string()).collect();
        assert_eq!(endpoints, ["127.0.31.1:3119", "127.0.31.2:3119"]);
    }

    #[test]
    fn named_target_port_is_the_container_port() {
        let pods = [pod("127.0.31.1", "logic", true, false)];
        let routes = routes("ns", &service("127.100.0.7", "rpc".into()), &pods);
        assert_eq!(routes[0].1.endpoints[0].to_string(), "127.0.31.1:9000");
    }

    #[test]
    fn no_listener_without_ready_pods_or_off_loopback() {
        let ready = [pod("127.0.31.1", "logic", true, false)];
        let unready = [pod("127.0.31.1", "logic", false, false)];
        assert!(routes("ns", &service("127.100.0.7", 3119.into()), &unready).is_empty());
        assert!(routes("ns", &service("10.96.0.7", 3119.into()), &ready).is_empty());
        assert!(routes("ns", &service("None", 3119.into()), &ready).is_empty());
    }
}
