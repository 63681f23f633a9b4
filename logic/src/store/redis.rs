//! [`SessionStore`] on Redis, byte-compatible with goim's logic (§9).
//!
//! Every command runs through one [`ConnectionManager`] (multiplexed, lazily
//! connected so logic starts while Redis is down) and under our own deadline
//! as well as the manager's response timeout: the manager may retry a
//! reconnect, and a caller must get "unavailable" quickly rather than hang.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::BoxFuture;
use std::path::PathBuf;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, IntoConnectionInfo, Script, TlsCertificates};

use super::{Error, Online, Result, SessionStore};

/// Number of `ol_` hash fields; fixed by goim (`CityHash32(room) % 64`).
pub const ONLINE_SHARDS: u32 = 64;

/// Disconnect: delete `key_`/`mid_` entries only if they still name the caller.
/// `KEYS[1]` = `key_<key>`, optional `KEYS[2]` = `mid_<mid>`;
/// `ARGV[1]` = server, `ARGV[2]` = key.
const DEL_SCRIPT: &str = r"
local has = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  has = 1
end
if KEYS[2] and redis.call('HGET', KEYS[2], ARGV[2]) == ARGV[1] then
  redis.call('HDEL', KEYS[2], ARGV[2])
end
return has
";

/// Heartbeat: refresh TTLs, recreate what vanished (goim's EXPIRE-then-add).
/// `KEYS[1]` = `key_<key>`, optional `KEYS[2]` = `mid_<mid>`;
/// `ARGV[1]` = server, `ARGV[2]` = ttl seconds, `ARGV[3]` = key.
const EXPIRE_SCRIPT: &str = r"
local has = redis.call('EXPIRE', KEYS[1], ARGV[2])
if has == 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
if KEYS[2] then
  if redis.call('HEXISTS', KEYS[2], ARGV[3]) == 0 then
    redis.call('HSET', KEYS[2], ARGV[3], ARGV[1])
  end
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return has
";

/// Redis connection settings.
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://host:port/db`, or `rediss://` for TLS (user name and
    /// password may be in it too).
    pub url: String,
    /// ACL user name; replaces one in `url`.
    pub username: Option<String>,
    /// Password (of the ACL user, or `requirepass`); replaces one in `url`.
    pub password: Option<String>,
    /// PEM file of the CA(s) to trust for a `rediss://` server instead of
    /// the system's.
    pub ca_file: Option<PathBuf>,
    /// TTL `E` of every routing and online key.
    pub ttl: Duration,
    /// Deadline for one command (and for connecting).
    pub timeout: Duration,
}

impl RedisConfig {
    /// Plain settings for `url`, no separate credentials or CA.
    pub fn new(url: impl Into<String>, ttl: Duration, timeout: Duration) -> Self {
        RedisConfig {
            url: url.into(),
            username: None,
            password: None,
            ca_file: None,
            ttl,
            timeout,
        }
    }
}

/// Never prints a password, in `password` or in the URL.
impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url = match self.url.as_str().into_connection_info() {
            Ok(info) if info.redis_settings().password().is_some() => "<with password>",
            _ => self.url.as_str(),
        };
        f.debug_struct("RedisConfig")
            .field("url", &url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("ca_file", &self.ca_file)
            .field("ttl", &self.ttl)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// A client for `config`'s URL with its credentials and CA applied.
fn client(config: &RedisConfig) -> Result<redis::Client> {
    let mut info = config
        .url
        .as_str()
        .into_connection_info()
        .map_err(Error::Redis)?;
    let mut settings = info.redis_settings().clone();
    if let Some(username) = config.username.as_deref().filter(|u| !u.is_empty()) {
        settings = settings.set_username(username);
    }
    if let Some(password) = config.password.as_deref().filter(|p| !p.is_empty()) {
        settings = settings.set_password(password);
    }
    info = info.set_redis_settings(settings);
    let tls = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
    if tls {
        // rustls needs a process-wide provider; logic's is ring (as the rest
        // of the workspace). Already installed (a second store, a test) is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    match &config.ca_file {
        Some(path) => {
            let root_cert = std::fs::read(path).map_err(|source| Error::CaFile {
                path: path.clone(),
                source,
            })?;
            let certs = TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            };
            redis::Client::build_with_tls(info, certs).map_err(Error::Redis)
        }
        None => redis::Client::open(info).map_err(Error::Redis),
    }
}

/// Redis-backed session store.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    ttl_secs: i64,
    timeout: Duration,
    del: Script,
    expire: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("ttl_secs", &self.ttl_secs)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn key_key(key: &str) -> String {
    format!("key_{key}")
}
fn mid_key(mid: i64) -> String {
    format!("mid_{mid}")
}
fn online_key(server: &str) -> String {
    format!("ol_{server}")
}

/// Splits one comet's rooms into the 64 `ol_` shards (§9); `None` = empty.
pub fn shard_rooms(online: &Online) -> Vec<Option<Online>> {
    let mut shards: Vec<Option<Online>> = vec![None; ONLINE_SHARDS as usize];
    for (room, count) in &online.room_count {
        let shard = herald_protocol::cityhash::city_hash32(room.as_bytes()) % ONLINE_SHARDS;
        shards[shard as usize]
            .get_or_insert_with(|| Online {
                server: online.server.clone(),
                room_count: HashMap::new(),
                updated: online.updated,
            })
            .room_count
            .insert(room.clone(), *count);
    }
    shards
}

impl RedisStore {
    /// Builds the store without connecting; the first command connects
    /// (and, for `rediss://`, checks the server's certificate).
    ///
    /// # Errors
    /// An unparseable URL, an unreadable or invalid CA file.
    pub fn new(config: RedisConfig) -> Result<Self> {
        let client = client(&config)?;
        let RedisConfig { ttl, timeout, .. } = config;
        // One reconnect attempt per command: a caller waits at most `timeout`
        // anyway, and retrying inside the manager would only hide an outage.
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(timeout);
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config)
            .map_err(Error::Redis)?;
        Ok(RedisStore {
            conn,
            ttl_secs: i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX),
            timeout,
            del: Script::new(DEL_SCRIPT),
            expire: Script::new(EXPIRE_SCRIPT),
        })
    }

    /// Runs one Redis future under the store's deadline.
    async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(res) => res.map_err(Error::Redis),
            Err(_) => Err(Error::Timeout(self.timeout)),
        }
    }

    async fn add_mapping_impl(&self, mid: i64, key: &str, server: &str) -> Result<()> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        if mid > 0 {
            let mk = mid_key(mid);
            pipe.hset(&mk, key, server)
                .ignore()
                .expire(&mk, self.ttl_secs)
                .ignore();
        }
        let kk = key_key(key);
        pipe.set(&kk, server)
            .ignore()
            .expire(&kk, self.ttl_secs)
            .ignore();
        let mut conn = self.conn.clone();
        self.timed(pipe.query_async::<()>(&mut conn)).await
    }

    async fn script_impl(
        &self,
        script: &Script,
        mid: i64,
        key: &str,
        args: &[&str],
    ) -> Result<bool> {
        let mut inv = script.prepare_invoke();
        inv.key(key_key(key));
        if mid > 0 {
            inv.key(mid_key(mid));
        }
        for arg in args {
            inv.arg(*arg);
        }
        let mut conn = self.conn.clone();
        let has: i64 = self.timed(inv.invoke_async(&mut conn)).await?;
        Ok(has != 0)
    }

    async fn servers_by_keys_impl(&self, keys: &[String]) -> Result<Vec<Option<String>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<String> = keys.iter().map(|k| key_key(k)).collect();
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("MGET");
        cmd.arg(&names);
        self.timed(cmd.query_async::<Vec<Option<String>>>(&mut conn))
            .await
    }

    async fn keys_by_mids_impl(&self, mids: &[i64]) -> Result<Vec<(String, String)>> {
        if mids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for mid in mids {
            pipe.hgetall(mid_key(*mid));
        }
        let mut conn = self.conn.clone();
        let maps: Vec<Vec<(String, String)>> = self.timed(pipe.query_async(&mut conn)).await?;
        Ok(maps.into_iter().flatten().collect())
    }

    async fn add_server_online_impl(&self, online: &Online) -> Result<()> {
        let key = online_key(&online.server);
        let mut fields = Vec::new();
        for (shard, content) in shard_rooms(online).into_iter().enumerate() {
            if let Some(content) = content {
                let json = serde_json::to_string(&content).map_err(|source| Error::Shard {
                    key: key.clone(),
                    source,
                })?;
                fields.push((shard.to_string(), json));
            }
        }
        // Rewrite the whole hash in one MULTI so shards that became empty
        // disappear (goim leaves them behind) and readers never see a mix.
        let mut pipe = redis::pipe();
        pipe.atomic().del(&key).ignore();
        if !fields.is_empty() {
            pipe.cmd("HSET")
                .arg(&key)
                .arg(&fields)
                .ignore()
                .expire(&key, self.ttl_secs)
                .ignore();
        }
        let mut conn = self.conn.clone();
        self.timed(pipe.query_async::<()>(&mut conn)).await
    }

    async fn server_onlines_impl(&self, stale_after: Duration) -> Result<Vec<Online>> {
        let mut conn = self.conn.clone();
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg("ol_*")
                .arg("COUNT")
                .arg(500);
            let (next, batch): (u64, Vec<String>) = self.timed(cmd.query_async(&mut conn)).await?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let now = unix_now();
        let stale = i64::try_from(stale_after.as_secs()).unwrap_or(i64::MAX);
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let shards: HashMap<String, String> = self.timed(conn.hgetall(&key)).await?;
            let mut merged = Online {
                server: key.trim_start_matches("ol_").to_owned(),
                ..Online::default()
            };
            for json in shards.values() {
                let shard: Online = match serde_json::from_str(json) {
                    Ok(shard) => shard,
                    Err(source) => {
                        // One bad writer must not blind the whole cluster count.
                        tracing::warn!(cause = %Error::Shard { key: key.clone(), source }, "skipping shard");
                        continue;
                    }
                };
                merged.updated = merged.updated.max(shard.updated);
                merged.room_count.extend(shard.room_count);
            }
            if now - merged.updated > stale {
                // §9: a comet silent for too long is gone; drop its counts.
                let _: () = self.timed(conn.del(&key)).await?;
                continue;
            }
            out.push(merged);
        }
        Ok(out)
    }
}

/// Current unix time in seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl SessionStore for RedisStore {
    fn ping(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            self.timed(redis::cmd("PING").query_async::<String>(&mut conn))
                .await
                .map(|_| ())
        })
    }

    fn add_mapping<'a>(
        &'a self,
        mid: i64,
        key: &'a str,
        server: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.add_mapping_impl(mid, key, server))
    }

    fn expire_mapping<'a>(
        &'a self,
        mid: i64,
        key: &'a str,
        server: &'a str,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let ttl = self.ttl_secs.to_string();
            self.script_impl(&self.expire, mid, key, &[server, &ttl, key])
                .await
        })
    }

    fn del_mapping<'a>(
        &'a self,
        mid: i64,
        key: &'a str,
        server: &'a str,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move { self.script_impl(&self.del, mid, key, &[server, key]).await })
    }

    fn servers_by_keys<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<String>>>> {
        Box::pin(self.servers_by_keys_impl(keys))
    }

    fn keys_by_mids<'a>(&'a self, mids: &'a [i64]) -> BoxFuture<'a, Result<Vec<(String, String)>>> {
        Box::pin(self.keys_by_mids_impl(mids))
    }

    fn add_server_online<'a>(&'a self, online: &'a Online) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.add_server_online_impl(online))
    }

    fn server_onlines(&self, stale_after: Duration) -> BoxFuture<'_, Result<Vec<Online>>> {
        Box::pin(self.server_onlines_impl(stale_after))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms_land_in_cityhash_shards() {
        let online = Online {
            server: "c1".to_owned(),
            room_count: HashMap::from([
                ("live://1000".to_owned(), 3),
                ("live://1001".to_owned(), 1),
            ]),
            updated: 5,
        };
        let shards = shard_rooms(&online);
        // T14: live://1000 → 43, live://1001 → 7.
        assert_eq!(shards[43].as_ref().unwrap().room_count["live://1000"], 3);
        assert_eq!(shards[7].as_ref().unwrap().room_count["live://1001"], 1);
        assert_eq!(shards.iter().filter(|s| s.is_some()).count(), 2);
    }
}
