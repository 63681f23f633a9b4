//! Connections sharded into buckets by CityHash32(key) mod N (§12).
//!
//! Each bucket owns its key → connection map and its room → members map
//! behind one std `Mutex`. Sharding keeps lock contention proportional to
//! 1/N, and no push takes a lock shared by the whole comet: a key push locks
//! one bucket; a room push or broadcast locks each bucket in turn, only long
//! enough to clone the member handles (delivery happens after unlocking).
//! A std `Mutex` is right here: every critical section is a map operation,
//! never held across an `.await`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use herald_protocol::cityhash::city_hash32;

use crate::conn::Conn;

#[derive(Debug, Default)]
struct Bucket {
    conns: HashMap<String, Arc<Conn>>,
    /// Room → connection ids → handles. Keyed by id so that a replaced
    /// connection's late leave cannot evict its successor.
    rooms: HashMap<String, HashMap<u64, Arc<Conn>>>,
}

/// All buckets of this comet.
#[derive(Debug)]
pub struct Buckets {
    buckets: Box<[Mutex<Bucket>]>,
}

impl Buckets {
    /// `n` empty buckets (at least one).
    pub fn new(n: usize) -> Buckets {
        Buckets {
            buckets: (0..n.max(1)).map(|_| Mutex::default()).collect(),
        }
    }

    fn bucket(&self, key: &str) -> MutexGuard<'_, Bucket> {
        let index = city_hash32(key.as_bytes()) as usize % self.buckets.len();
        lock(&self.buckets[index])
    }

    /// Registers `conn` under its key, joining `room` if given. Returns the
    /// connection it replaced (same key), which the caller closes.
    pub fn put(&self, conn: &Arc<Conn>, room: Option<&str>) -> Option<Arc<Conn>> {
        let mut bucket = self.bucket(&conn.key);
        let old = bucket.conns.insert(conn.key.clone(), conn.clone());
        if let Some(room) = room {
            bucket
                .rooms
                .entry(room.to_owned())
                .or_default()
                .insert(conn.id, conn.clone());
        }
        old
    }

    /// Removes `conn` (only if it is still the registered one for its key)
    /// and its membership of `room`.
    pub fn remove(&self, conn: &Conn, room: Option<&str>) {
        let mut bucket = self.bucket(&conn.key);
        if bucket.conns.get(&conn.key).is_some_and(|c| c.id == conn.id) {
            bucket.conns.remove(&conn.key);
        }
        if let Some(room) = room {
            leave(&mut bucket, room, conn.id);
        }
    }

    /// Moves `conn` from room `from` to room `to` (either may be none).
    pub fn change_room(&self, conn: &Arc<Conn>, from: Option<&str>, to: Option<&str>) {
        if from == to {
            // goim drops a client that "moves" to its own room when alone in it
            // (§13.7); staying put is the right answer.
            return;
        }
        let mut bucket = self.bucket(&conn.key);
        if let Some(from) = from {
            leave(&mut bucket, from, conn.id);
        }
        if let Some(to) = to {
            bucket
                .rooms
                .entry(to.to_owned())
                .or_default()
                .insert(conn.id, conn.clone());
        }
    }

    /// The connection registered for `key`, if any.
    pub fn get(&self, key: &str) -> Option<Arc<Conn>> {
        self.bucket(key).conns.get(key).cloned()
    }

    /// Every member of `room`, collected bucket by bucket.
    pub fn room_members(&self, room: &str) -> Vec<Arc<Conn>> {
        let mut members = Vec::new();
        for bucket in self.buckets.iter() {
            if let Some(room) = lock(bucket).rooms.get(room) {
                members.extend(room.values().cloned());
            }
        }
        members
    }

    /// Members of `room` on this comet.
    pub fn room_count(&self, room: &str) -> usize {
        self.buckets
            .iter()
            .map(|bucket| lock(bucket).rooms.get(room).map_or(0, HashMap::len))
            .sum()
    }

    /// Local member count of every non-empty room.
    pub fn room_counts(&self) -> HashMap<String, i32> {
        let mut counts: HashMap<String, i32> = HashMap::new();
        for bucket in self.buckets.iter() {
            for (room, members) in &lock(bucket).rooms {
                let n = i32::try_from(members.len()).unwrap_or(i32::MAX);
                *counts.entry(room.clone()).or_default() += n;
            }
        }
        counts
    }

    /// The connections of one bucket; broadcasts walk buckets one at a time.
    pub fn bucket_conns(&self, index: usize) -> Vec<Arc<Conn>> {
        self.buckets
            .get(index)
            .map(|bucket| lock(bucket).conns.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Number of buckets.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Always false: there is at least one bucket.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// The connections whose idle deadline passed by `now`
    /// ([`crate::conn::coarse_ms`]); the caller closes them outside the locks.
    pub fn idle(&self, now: u64) -> Vec<Arc<Conn>> {
        let mut idle = Vec::new();
        for bucket in self.buckets.iter() {
            let bucket = lock(bucket);
            idle.extend(bucket.conns.values().filter(|c| c.idle_at(now)).cloned());
        }
        idle
    }

    /// Every connection.
    pub fn all(&self) -> Vec<Arc<Conn>> {
        (0..self.len()).flat_map(|i| self.bucket_conns(i)).collect()
    }

    /// (connections, distinct client IPs, non-empty rooms).
    pub fn load(&self) -> (usize, usize, usize) {
        let mut conns = 0;
        let mut ips = HashSet::new();
        let mut rooms = HashSet::new();
        for bucket in self.buckets.iter() {
            let bucket = lock(bucket);
            conns += bucket.conns.len();
            ips.extend(bucket.conns.values().map(|c| c.ip));
            rooms.extend(bucket.rooms.keys().cloned());
        }
        (conns, ips.len(), rooms.len())
    }
}

fn leave(bucket: &mut Bucket, room: &str, id: u64) {
    if let Some(members) = bucket.rooms.get_mut(room) {
        members.remove(&id);
        if members.is_empty() {
            bucket.rooms.remove(room);
        }
    }
}

fn lock(bucket: &Mutex<Bucket>) -> MutexGuard<'_, Bucket> {
    // Maps stay consistent even if a holder panicked; keep serving.
    bucket.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::Identity;
    use crate::server::Transport;

    fn conn(id: u64, key: &str) -> Arc<Conn> {
        Arc::new(Conn::new(
            Identity {
                id,
                key: key.to_owned(),
                mid: 0,
                transport: Transport::Tcp,
                ip: [127, 0, 0, 1].into(),
                redirect: false,
            },
            &[],
            1024,
        ))
    }

    #[test]
    fn replaced_connection_cannot_evict_successor() {
        let buckets = Buckets::new(4);
        let old = conn(1, "k");
        let new = conn(2, "k");
        assert!(buckets.put(&old, Some("r")).is_none());
        assert_eq!(buckets.put(&new, Some("r")).map(|c| c.id), Some(1));
        buckets.remove(&old, Some("r"));
        assert_eq!(buckets.get("k").map(|c| c.id), Some(2));
        assert_eq!(buckets.room_count("r"), 1);
    }

    #[test]
    fn change_room_to_same_room_keeps_membership() {
        let buckets = Buckets::new(2);
        let c = conn(1, "k");
        buckets.put(&c, Some("r"));
        buckets.change_room(&c, Some("r"), Some("r"));
        assert_eq!(buckets.room_count("r"), 1);
        buckets.change_room(&c, Some("r"), None);
        assert_eq!(buckets.room_count("r"), 0);
        assert_eq!(buckets.load(), (1, 1, 0));
    }
}
