//! Session routing and room counts: where each key/mid is connected and how
//! many members each room has on each comet (§9).
//!
//! [`SessionStore`] is a trait because `herald standalone` swaps Redis for an
//! in-memory map; [`redis::RedisStore`] serves clusters, [`memory::MemoryStore`] a single process.

use std::collections::HashMap;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub mod memory;
pub mod redis;

/// Why the store could not answer. Every variant means "backend unavailable"
/// to callers (gRPC `Unavailable`, HTTP 503).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command failed (connection refused, server error, response timeout).
    #[error("redis command failed")]
    Redis(#[source] ::redis::RedisError),
    /// The `--redis-ca-file` could not be read.
    #[error("cannot read the Redis CA file {}", path.display())]
    CaFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Our own deadline around a command expired (e.g. while reconnecting).
    #[error("redis did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// An `ol_` shard held something other than the §9 JSON.
    #[error("malformed online shard in {key}")]
    Shard {
        /// The `ol_` key.
        key: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One comet's room counts, as stored in one `ol_` shard and as merged back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Online {
    /// Comet id.
    pub server: String,
    /// Room `type://id` → member count.
    pub room_count: HashMap<String, i32>,
    /// Unix seconds of the report.
    pub updated: i64,
}

/// Routing and room-count storage shared by every logic replica.
pub trait SessionStore: Send + Sync + std::fmt::Debug {
    /// Routes `key` (and `mid`'s `key` field when `mid > 0`) to `server`.
    fn add_mapping<'a>(
        &'a self,
        mid: i64,
        key: &'a str,
        server: &'a str,
    ) -> BoxFuture<'a, Result<()>>;

    /// Refreshes the TTLs of the routes, recreating any that vanished.
    /// Returns whether the key route still existed.
    fn expire_mapping<'a>(
        &'a self,
        mid: i64,
        key: &'a str,
        server: &'a str,
    ) -> BoxFuture<'a, Result<bool>>;

    /// Deletes the routes only where they still point at `server`, so a late
    /// Disconnect from an old comet cannot remove a reconnect's route.
    /// Returns whether the key route was deleted.
    fn del_mapping<'a>(
        &'a self,
        mid: i64,
        key: &'a str,
        server: &'a str,
    ) -> BoxFuture<'a, Result<bool>>;

    /// The comet of each key, `None` for unknown keys, in input order.
    fn servers_by_keys<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<String>>>>;

    /// Every `(key, comet)` of the mids, in mid order.
    fn keys_by_mids<'a>(&'a self, mids: &'a [i64]) -> BoxFuture<'a, Result<Vec<(String, String)>>>;

    /// Replaces `online.server`'s room counts.
    fn add_server_online<'a>(&'a self, online: &'a Online) -> BoxFuture<'a, Result<()>>;

    /// Every comet's fresh room counts (older than `stale_after` are dropped).
    fn server_onlines(
        &self,
        stale_after: std::time::Duration,
    ) -> BoxFuture<'_, Result<Vec<Online>>>;

    /// Whether the store answers now (readiness); in-memory always does.
    fn ping(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
}
