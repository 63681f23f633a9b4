//! Where a role gets the node list (§15.4), and the copy it serves from.
//!
//! Outside Kubernetes the list is a file whose mtime is polled; inside, the
//! operator's ConfigMap (`<pushcluster>-nodes`, key `nodes.json`) is watched
//! through the API server (feature `kube`), so an update reaches logic and
//! job within a round trip instead of a kubelet volume sync (up to a minute);
//! `herald standalone` hands its one comet over in memory. Either way the
//! parsed list is swapped in whole, so readers never see a half-applied
//! update, and a document that fails to parse keeps the previous list (a bad
//! write must not empty the cluster's node list).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

pub use herald_protocol::nodes::{CONFIGMAP_KEY, DrainSettings, Node, NodeList};

/// Why the node list could not be used.
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
    /// The file is not node-list JSON.
    #[error("parsing node list {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// No Kubernetes client could be configured (no kubeconfig, not in a pod).
    #[cfg(feature = "kube")]
    #[error("configuring the kubernetes client for the node list ConfigMap")]
    Kube(#[source] kube::Error),
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Reads and parses a node-list file.
///
/// # Errors
/// Unreadable file or invalid JSON.
pub fn load(path: &Path) -> Result<NodeList> {
    let text = std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    NodeList::parse(&text).map_err(|source| Error::Parse {
        path: path.to_owned(),
        source,
    })
}

/// The current node list, shared by every reader; replaced whole on reload.
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
    #[cfg(feature = "kube")]
    ConfigMap {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// A fixed list handed over in process (`herald standalone`).
    Memory(NodeList),
}

/// The node-list flags of every role that reads the list (logic, job,
/// comet), flattened into each role's arguments: one definition, so the
/// roles cannot drift apart in names, variables or defaults.
#[cfg(feature = "kube")]
#[derive(Clone, Debug, clap::Args)]
pub struct SourceArgs {
    /// Node list JSON file (docs/protocol.md §15.4 format); none = no nodes.
    #[arg(long, env = "HERALD_NODE_LIST", conflicts_with = "node_list_configmap")]
    pub node_list: Option<PathBuf>,
    /// Watch the node list in this ConfigMap (key `nodes.json`) instead of a file.
    #[arg(long, env = crate::contract::NODE_LIST_CONFIGMAP)]
    pub node_list_configmap: Option<String>,
    /// Namespace of `--node-list-configmap` (in a pod: its own namespace).
    #[arg(long, env = crate::contract::POD_NAMESPACE, default_value = "default")]
    pub node_list_namespace: String,
    /// How often the node list file's mtime is checked, in milliseconds.
    #[arg(long, env = "HERALD_NODE_LIST_POLL_MS", default_value_t = 2000)]
    pub node_list_poll_ms: u64,
}

#[cfg(feature = "kube")]
impl SourceArgs {
    /// The source these flags name: a file wins over a ConfigMap (clap
    /// refuses both), neither means no node list.
    pub fn source(self) -> Option<Source> {
        let SourceArgs {
            node_list,
            node_list_configmap,
            node_list_namespace,
            node_list_poll_ms,
        } = self;
        let poll = Duration::from_millis(node_list_poll_ms);
        match (node_list, node_list_configmap) {
            (Some(path), _) => Some(Source::File { path, poll }),
            (None, Some(name)) => Some(Source::ConfigMap {
                namespace: node_list_namespace,
                name,
            }),
            (None, None) => None,
        }
    }
}

impl Source {
    /// Whether the source is a file polled every zero seconds (a config error).
    pub fn polls_zero(&self) -> bool {
        matches!(self, Source::File { poll, .. } if poll.is_zero())
    }

    /// The list to start with: the file's content (a missing file is an
    /// empty list: the operator may not have written it yet), the in-memory
    /// list, or empty for a ConfigMap, which the watch fills in within a
    /// round trip.
    ///
    /// # Errors
    /// A file that exists but cannot be read or parsed.
    pub fn initial(&self) -> Result<NodeList> {
        match self {
            Source::File { path, .. } => match load(path) {
                Err(Error::Read { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    tracing::warn!(path = %path.display(), "node list file missing; starting with no nodes");
                    Ok(NodeList::default())
                }
                other => other,
            },
            #[cfg(feature = "kube")]
            Source::ConfigMap { .. } => Ok(NodeList::default()),
            Source::Memory(list) => Ok(list.clone()),
        }
    }

    /// Calls `apply` with every new version of the list until `shutdown`
    /// completes. Errors are logged and the previous list kept. A memory
    /// source never changes, so it only waits.
    pub async fn watch(
        self,
        apply: impl FnMut(NodeList) + Send,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        match self {
            Source::File { path, poll } => watch_file(path, poll, apply, shutdown).await,
            #[cfg(feature = "kube")]
            Source::ConfigMap { namespace, name } => {
                watch_configmap(namespace, name, apply, shutdown).await;
            }
            Source::Memory(_) => shutdown.await,
        }
    }
}

async fn watch_file(
    path: PathBuf,
    interval: Duration,
    mut apply: impl FnMut(NodeList) + Send,
    shutdown: impl Future<Output = ()> + Send,
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
        match load(&path) {
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

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Watches one ConfigMap by name. kube's watcher re-lists after errors and
/// expired resource versions with backoff, so an API server restart only
/// delays updates. Deleting the ConfigMap keeps the last list: the operator
/// recreates it, and an empty list would stop every push in the meantime.
#[cfg(feature = "kube")]
async fn watch_configmap(
    namespace: String,
    name: String,
    mut apply: impl FnMut(NodeList) + Send,
    shutdown: impl Future<Output = ()> + Send,
) {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::{WatchStreamExt, watcher};

    let mut shutdown = std::pin::pin!(shutdown);
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
                match NodeList::parse(text.as_bytes()) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn list(generation: i64) -> NodeList {
        NodeList {
            generation,
            updated: String::new(),
            nodes: vec![Node {
                name: "c".to_owned(),
                ..Node::default()
            }],
            drain: None,
        }
    }

    #[test]
    fn a_missing_file_starts_empty_a_bad_one_fails() {
        let dir = std::env::temp_dir().join(format!("herald-nodes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("nodes.json");
        let source = Source::File {
            path: path.clone(),
            poll: Duration::from_millis(10),
        };
        assert_eq!(source.initial().unwrap(), NodeList::default());
        std::fs::write(&path, b"not json").unwrap();
        assert!(matches!(source.initial(), Err(Error::Parse { .. })));
        std::fs::write(&path, serde_json::to_vec(&list(3)).unwrap()).unwrap();
        assert_eq!(source.initial().unwrap(), list(3));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_memory_source_is_its_list_and_waits_for_shutdown() {
        let source = Source::Memory(list(7));
        assert_eq!(source.initial().unwrap(), list(7));
        let mut applied = 0;
        source.watch(|_| applied += 1, async {}).await;
        assert_eq!(applied, 0);
    }

    #[tokio::test]
    async fn a_file_change_is_applied_and_a_bad_write_keeps_the_list() {
        let dir = std::env::temp_dir().join(format!("herald-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("nodes.json");
        std::fs::write(&path, serde_json::to_vec(&list(1)).unwrap()).unwrap();
        let source = Source::File {
            path: path.clone(),
            poll: Duration::from_millis(20),
        };
        let nodes = Nodes::new(source.initial().unwrap());
        let stop = crate::Shutdown::new();
        let watched = nodes.clone();
        let task = tokio::spawn(source.watch(move |l| watched.set(l), stop.wait()));
        // mtime granularity: make sure the next write is seen as a change.
        tokio::time::sleep(Duration::from_millis(50)).await;
        std::fs::write(&path, b"{broken").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(nodes.get().generation, 1, "a bad write keeps the list");
        std::fs::write(&path, serde_json::to_vec(&list(2)).unwrap()).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while nodes.get().generation != 2 {
            assert!(tokio::time::Instant::now() < deadline, "change not applied");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.trigger();
        task.await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
