//! The comet node list (§15.4), and the
//! balancer pick served by `/goim/nodes/weighted` and the `Nodes` rpc (§11).
//!
//! Outside Kubernetes the list is a file whose mtime is polled; inside, the
//! operator's ConfigMap (`<pushcluster>-nodes`, key `nodes.json`) is watched
//! through the API server, so an update reaches logic and job within a round
//! trip instead of a kubelet volume sync (up to a minute). Either way the
//! parsed list is swapped in whole, so readers never see a half-applied
//! update, and a document that fails to parse keeps the previous list (a bad
//! write must not empty the cluster's node list). Both logic and job use
//! [`Source`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// Why the node list file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the file failed.
    #[error("reading node list {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// No Kubernetes client could be configured (no kubeconfig, not in a pod).
    #[error("configuring the kubernetes client for the node list ConfigMap")]
    Kube(#[source] kube::Error),
    /// The file is not node-list JSON.
    #[error("parsing node list {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The whole `nodes.json` document.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeList {
    /// Increases with every change the operator makes.
    #[serde(default)]
    pub generation: i64,
    /// RFC 3339 time of the last change (informational).
    #[serde(default)]
    pub updated: String,
    /// Every comet, draining or not.
    #[serde(default)]
    pub nodes: Vec<Node>,
}

/// One comet.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Comet server id (as in Redis routes and PUSH records).
    pub name: String,
    /// `host:port` of its gRPC server.
    #[serde(default)]
    pub grpc: String,
    /// Host names for web clients.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Public addresses for native clients.
    #[serde(default)]
    pub addrs: Vec<String>,
    /// Client ports.
    #[serde(default)]
    pub tcp_port: i32,
    /// WebSocket port.
    #[serde(default)]
    pub ws_port: i32,
    /// Secure WebSocket port.
    #[serde(default)]
    pub wss_port: i32,
    /// Balancer weight.
    #[serde(default)]
    pub weight: i64,
    /// Current connections.
    #[serde(default)]
    pub connections: i64,
    /// Distinct client IPs.
    #[serde(default)]
    pub client_ips: i64,
    /// A draining comet is never handed to clients.
    #[serde(default)]
    pub draining: bool,
}

/// At most this many entries in a weighted answer (goim: 5).
pub const MAX_PICKED: usize = 5;

impl NodeList {
    /// Reads and parses `path`.
    ///
    /// # Errors
    /// Unreadable file or invalid JSON.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|source| Error::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Non-draining nodes ordered by goim's score (§11, no region boost since
    /// goim's region lookup is empty), highest first.
    pub fn ranked(&self) -> Vec<&Node> {
        let live: Vec<&Node> = self.nodes.iter().filter(|n| !n.draining).collect();
        let total_conns: i64 = live.iter().map(|n| n.connections.max(0)).sum();
        let total_weight: i64 = live.iter().map(|n| n.weight.max(0)).sum();
        let score = |n: &Node| -> i64 {
            if total_conns == 0 || total_weight == 0 {
                return n.weight.max(0);
            }
            let fw = n.weight.max(0) as f64;
            let c = total_conns as f64;
            let s = fw
                + (c * (fw / total_weight as f64 - n.connections.max(0) as f64 / (2.0 * c)))
                    .round();
            (s as i64).clamp(1, 1 << 20)
        };
        let mut scored: Vec<(i64, &Node)> = live.into_iter().map(|n| (score(n), n)).collect();
        // Stable sort: equal scores keep file order, so answers are repeatable.
        scored.sort_by_key(|&(score, _)| std::cmp::Reverse(score));
        scored.into_iter().map(|(_, n)| n).collect()
    }

    /// The addresses to hand a client: host names for `platform=web`,
    /// public addresses otherwise; up to [`MAX_PICKED`]. Empty list → empty.
    pub fn pick(&self, platform: &str) -> (Vec<String>, Option<&Node>) {
        let ranked = self.ranked();
        let first = ranked.first().copied();
        let out = ranked
            .into_iter()
            .flat_map(|n| {
                if platform == "web" {
                    n.hosts.iter()
                } else {
                    n.addrs.iter()
                }
            })
            .take(MAX_PICKED)
            .cloned()
            .collect();
        (out, first)
    }

    /// `(connections, client IPs)` summed over every node (`/goim/online/total`).
    pub fn totals(&self) -> (i64, i64) {
        self.nodes.iter().fold((0, 0), |(c, i), n| {
            (c + n.connections.max(0), i + n.client_ips.max(0))
        })
    }
}

/// The current node list, shared by every request; replaced whole on reload.
#[derive(Clone, Debug, Default)]
pub struct Nodes {
    // std RwLock: readers only clone an Arc, never await while holding it.
    current: Arc<RwLock<Arc<NodeList>>>,
}

impl Nodes {
    /// Nodes starting from `list`.
    pub fn new(list: NodeList) -> Self {
        Nodes {
            current: Arc::new(RwLock::new(Arc::new(list))),
        }
    }

    /// The current list.
    pub fn get(&self) -> Arc<NodeList> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the list.
    pub fn set(&self, list: NodeList) {
        let mut guard = match self.current.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        *guard = Arc::new(list);
    }
}

/// The key of the node list in the operator's ConfigMap.
pub const CONFIGMAP_KEY: &str = "nodes.json";

/// Where the node list comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A JSON file, its mtime polled every `poll`.
    File {
        /// The file.
        path: PathBuf,
        /// Poll interval.
        poll: Duration,
    },
    /// A ConfigMap watched through the API server.
    ConfigMap {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
}

impl Source {
    /// The source named by logic's and job's flags: a file wins over a
    /// ConfigMap (clap refuses both), neither means no node list.
    pub fn from_flags(
        file: Option<PathBuf>,
        configmap: Option<String>,
        namespace: String,
        poll: Duration,
    ) -> Option<Source> {
        match (file, configmap) {
            (Some(path), _) => Some(Source::File { path, poll }),
            (None, Some(name)) => Some(Source::ConfigMap { namespace, name }),
            (None, None) => None,
        }
    }

    /// The list to start with: the file's content (a missing file is an
    /// empty list: the operator may not have written it yet), or empty for a
    /// ConfigMap, which the watch fills in within a round trip.
    ///
    /// # Errors
    /// A file that exists but cannot be read or parsed.
    pub fn initial(&self) -> Result<NodeList> {
        match self {
            Source::File { path, .. } => match NodeList::load(path) {
                Err(Error::Read { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    tracing::warn!(path = %path.display(), "node list file missing; starting with no nodes");
                    Ok(NodeList::default())
                }
                other => other,
            },
            Source::ConfigMap { .. } => Ok(NodeList::default()),
        }
    }

    /// Calls `apply` with every new version of the list until `shutdown`
    /// fires. Errors are logged and the previous list kept.
    pub async fn watch(
        self,
        apply: impl FnMut(NodeList) + Send,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) {
        match self {
            Source::File { path, poll } => watch_file(path, poll, apply, shutdown).await,
            Source::ConfigMap { namespace, name } => {
                watch_configmap(namespace, name, apply, shutdown).await;
            }
        }
    }
}

async fn watch_file(
    path: PathBuf,
    interval: Duration,
    mut apply: impl FnMut(NodeList) + Send,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut seen: Option<SystemTime> = mtime(&path);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = &mut shutdown => return,
        }
        let now = mtime(&path);
        if now == seen {
            continue;
        }
        match NodeList::load(&path) {
            Ok(list) => {
                log_reload(&list);
                apply(list);
                seen = now;
            }
            Err(err) => {
                tracing::warn!(cause = %err, "node list reload failed; keeping the previous list");
                // Retry next tick: the writer may be mid-way.
            }
        }
    }
}

fn log_reload(list: &NodeList) {
    tracing::info!(
        generation = list.generation,
        nodes = list.nodes.len(),
        "node list reloaded"
    );
}

/// Watches one ConfigMap by name. kube's watcher re-lists after errors and
/// expired resource versions with backoff, so an API server restart only
/// delays updates. Deleting the ConfigMap keeps the last list: the operator
/// recreates it, and an empty list would stop every push in the meantime.
async fn watch_configmap(
    namespace: String,
    name: String,
    mut apply: impl FnMut(NodeList) + Send,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::{WatchStreamExt, watcher};

    let client = loop {
        match kube::Client::try_default().await {
            Ok(client) => break client,
            Err(err) => {
                tracing::warn!(cause = %Error::Kube(err), "retrying in 5 s");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                    () = &mut shutdown => return,
                }
            }
        }
    };
    let api: kube::Api<ConfigMap> = kube::Api::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let stream = watcher(api, config).default_backoff().applied_objects();
    futures::pin_mut!(stream);
    let mut last: Option<NodeList> = None;
    loop {
        let next = tokio::select! {
            next = stream.next() => next,
            () = &mut shutdown => return,
        };
        match next {
            Some(Ok(cm)) => {
                let Some(text) = cm.data.as_ref().and_then(|d| d.get(CONFIGMAP_KEY)) else {
                    tracing::warn!(%namespace, %name, "node list ConfigMap has no {CONFIGMAP_KEY}; keeping the previous list");
                    continue;
                };
                match serde_json::from_str::<NodeList>(text) {
                    // Re-lists deliver the same object again: apply changes only.
                    Ok(list) if last.as_ref() == Some(&list) => {}
                    Ok(list) => {
                        log_reload(&list);
                        last = Some(list.clone());
                        apply(list);
                    }
                    Err(err) => {
                        tracing::warn!(cause = %err, %namespace, %name, "node list ConfigMap is not valid JSON; keeping the previous list");
                    }
                }
            }
            Some(Err(err)) => tracing::warn!(cause = %err, "node list watch failed; retrying"),
            None => return,
        }
    }
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, weight: i64, conns: i64, draining: bool) -> Node {
        Node {
            name: name.to_owned(),
            hosts: vec![format!("{name}.example.com")],
            addrs: vec![format!("10.0.0.{}", name.len())],
            weight,
            connections: conns,
            client_ips: conns / 2,
            draining,
            ..Node::default()
        }
    }

    #[test]
    fn parses_extension_example() {
        let list: NodeList = serde_json::from_str(
            r#"{"generation": 42, "updated": "2026-11-27T10:00:00Z",
 "nodes": [{"name": "chat-comet-7d9f-abcde", "grpc": "127.0.0.12:3109",
            "hosts": ["comet-a.example.com"], "addrs": ["203.0.113.7"],
            "tcp_port": 3101, "ws_port": 3102, "wss_port": 3103,
            "weight": 10, "connections": 1532, "client_ips": 1200, "draining": false}]}"#,
        )
        .unwrap();
        assert_eq!(list.generation, 42);
        assert_eq!(list.nodes[0].wss_port, 3103);
        assert_eq!(list.totals(), (1532, 1200));
    }

    #[test]
    fn pick_skips_draining_and_prefers_less_loaded() {
        let list = NodeList {
            nodes: vec![
                node("a", 10, 900, false),
                node("bb", 10, 100, false),
                node("ccc", 100, 0, true),
            ],
            ..NodeList::default()
        };
        let (web, first) = list.pick("web");
        assert_eq!(web, vec!["bb.example.com", "a.example.com"]);
        assert_eq!(first.unwrap().name, "bb");
        let (native, _) = list.pick("android");
        assert_eq!(native, vec!["10.0.0.2", "10.0.0.1"]);
        assert_eq!(list.totals(), (1000, 500));
    }

    #[test]
    fn empty_and_all_draining_give_empty_lists() {
        assert!(NodeList::default().pick("web").0.is_empty());
        let list = NodeList {
            nodes: vec![node("a", 1, 1, true)],
            ..NodeList::default()
        };
        assert!(list.pick("web").0.is_empty());
    }

    #[test]
    fn at_most_five() {
        let list = NodeList {
            nodes: (0..8)
                .map(|i| node(&"x".repeat(i + 1), 1, 0, false))
                .collect(),
            ..NodeList::default()
        };
        assert_eq!(list.pick("web").0.len(), MAX_PICKED);
    }
}
