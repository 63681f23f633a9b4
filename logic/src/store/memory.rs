//! [`SessionStore`] in process memory for `herald standalone`: the same
//! semantics as [`super::redis::RedisStore`] (TTLs, conditional delete,
//! whole-replacement of a comet's room counts) without a Redis.
//!
//! One std `Mutex` around all maps: every operation is a few map lookups with
//! no await inside, and one lock makes each call atomic like the Lua scripts.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use super::redis::unix_now;
use super::{Online, Result, SessionStore};

/// In-memory session store.
#[derive(Debug)]
pub struct MemoryStore {
    ttl: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// `key_<key>`: key → (comet, expiry).
    keys: HashMap<String, (String, Instant)>,
    /// `mid_<mid>`: mid → (key → comet, expiry of the whole hash).
    mids: HashMap<i64, (HashMap<String, String>, Instant)>,
    /// `ol_<comet>`: comet → its last report.
    online: HashMap<String, (Online, Instant)>,
}

impl State {
    /// Drops expired entries, as Redis would have.
    fn expire(&mut self, now: Instant) {
        self.keys.retain(|_, (_, exp)| *exp > now);
        self.mids
            .retain(|_, (keys, exp)| *exp > now && !keys.is_empty());
        self.online.retain(|_, (_, exp)| *exp > now);
    }
}

impl MemoryStore {
    /// An empty store whose entries live `ttl` after their last refresh.
    pub fn new(ttl: Duration) -> Self {
        MemoryStore {
            ttl,
            state: Mutex::new(State::default()),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State, Instant) -> T) -> T {
        let mut state = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let now = Instant::now();
        state.expire(now);
        f(&mut state, now)
    }
}

impl SessionStore for MemoryStore {
    fn add_mapping<'a>(
        &'a self,
        mid: i64,
        key: &'a str,
        server: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        let exp = Instant::now() + self.ttl;
        self.with(|s, _| {
            if mid > 0 {
                let entry = s.mids.entry(mid).or_insert_with(|| (HashMap::new(), exp));
                entry.0.insert(key.to_owned(), server.to_owned());
                entry.1 = exp;
            }
            s.keys.insert(key.to_owned(), (server.to_owned(), exp));
        });
        Box::pin(async { Ok(()) })
    }

    fn expire_mapping<'a>(
        &'a self,
        mid: i64,
        key: &'a str,
        server: &'a str,
    ) -> BoxFuture<'a, Result<bool>> {
        let exp = Instant::now() + self.ttl;
        let has = self.with(|s, _| {
            let has = match s.keys.get_mut(key) {
                Some(entry) => {
                    entry.1 = exp;
                    true
                }
                None => {
                    s.keys.insert(key.to_owned(), (server.to_owned(), exp));
                    false
                }
            };
            if mid > 0 {
                let entry = s.mids.entry(mid).or_insert_with(|| (HashMap::new(), exp));
                entry
                    .0
                    .entry(key.to_owned())
                    .or_insert_with(|| server.to_owned());
                entry.1 = exp;
            }
            has
        });
        Box::pin(async move { Ok(has) })
    }

    fn del_mapping<'a>(
        &'a self,
        mid: i64,
        key: &'a str,
        server: &'a str,
    ) -> BoxFuture<'a, Result<bool>> {
        let has = self.with(|s, _| {
            let has = s.keys.get(key).is_some_and(|(srv, _)| srv == server);
            if has {
                s.keys.remove(key);
            }
            if mid > 0
                && let Some((keys, _)) = s.mids.get_mut(&mid)
                && keys.get(key).is_some_and(|srv| srv == server)
            {
                keys.remove(key);
            }
            has
        });
        Box::pin(async move { Ok(has) })
    }

    fn servers_by_keys<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<String>>>> {
        let servers = self.with(|s, _| {
            keys.iter()
                .map(|k| s.keys.get(k).map(|(srv, _)| srv.clone()))
                .collect()
        });
        Box::pin(async move { Ok(servers) })
    }

    fn keys_by_mids<'a>(&'a self, mids: &'a [i64]) -> BoxFuture<'a, Result<Vec<(String, String)>>> {
        let routes = self.with(|s, _| {
            let mut out = Vec::new();
            for mid in mids {
                if let Some((keys, _)) = s.mids.get(mid) {
                    let mut pairs: Vec<(String, String)> =
                        keys.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                    // HashMap order is random; sort so answers are repeatable.
                    pairs.sort();
                    out.extend(pairs);
                }
            }
            out
        });
        Box::pin(async move { Ok(routes) })
    }

    fn add_server_online<'a>(&'a self, online: &'a Online) -> BoxFuture<'a, Result<()>> {
        let exp = Instant::now() + self.ttl;
        self.with(|s, _| {
            if online.room_count.is_empty() {
                s.online.remove(&online.server);
            } else {
                s.online
                    .insert(online.server.clone(), (online.clone(), exp));
            }
        });
        Box::pin(async { Ok(()) })
    }

    fn server_onlines(&self, stale_after: Duration) -> BoxFuture<'_, Result<Vec<Online>>> {
        let stale = i64::try_from(stale_after.as_secs()).unwrap_or(i64::MAX);
        let now = unix_now();
        let onlines = self.with(|s, _| {
            s.online.retain(|_, (o, _)| now - o.updated <= stale);
            s.online.values().map(|(o, _)| o.clone()).collect()
        });
        Box::pin(async move { Ok(onlines) })
    }
}
