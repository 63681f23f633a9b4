//! Pod IPs: a fixed range inside 127.0.0.0/8, each address lent to one pod at
//! a time and handed back when the pod's processes are gone.
//!
//! The range is checked once, at construction, so every address the harness
//! ever gives a process to bind (and the probes to dial) is a loopback one.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, PoisonError};

/// Why a pool cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Pod IPs must stay on this host: only 127.0.0.0/8 is accepted.
    #[error("pod IP range {first}..={last} is not inside 127.0.0.0/8")]
    NotLoopback { first: Ipv4Addr, last: Ipv4Addr },
    #[error("pod IP range {first}..={last} is empty")]
    Empty { first: Ipv4Addr, last: Ipv4Addr },
}

/// A shared, cloneable pool of loopback addresses.
#[derive(Debug, Clone)]
pub struct IpPool {
    first: Ipv4Addr,
    last: Ipv4Addr,
    // A std Mutex: held only to pick or return one address, never across await.
    used: Arc<Mutex<BTreeSet<Ipv4Addr>>>,
}

impl IpPool {
    /// The addresses `first..=last`.
    ///
    /// # Errors
    /// If either end is outside 127.0.0.0/8 or the range is empty.
    pub fn new(first: Ipv4Addr, last: Ipv4Addr) -> Result<IpPool, PoolError> {
        if !first.is_loopback() || !last.is_loopback() {
            return Err(PoolError::NotLoopback { first, last });
        }
        if u32::from(first) > u32::from(last) {
            return Err(PoolError::Empty { first, last });
        }
        Ok(IpPool {
            first,
            last,
            used: Arc::default(),
        })
    }

    /// `127.0.<third>.1 ..= 127.0.<third>.254`: 254 addresses, one /24 per
    /// harness so that harnesses running side by side never share one.
    pub fn slash24(third: u8) -> IpPool {
        IpPool {
            first: Ipv4Addr::new(127, 0, third, 1),
            last: Ipv4Addr::new(127, 0, third, 254),
            used: Arc::default(),
        }
    }

    /// Whether `ip` belongs to this pool's range.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (u32::from(self.first)..=u32::from(self.last)).contains(&u32::from(ip))
    }

    /// Lends `preferred` when it is in range and free (a pod that already has
    /// an IP keeps it), otherwise the lowest free address; `None` when full.
    pub fn allocate(&self, preferred: Option<Ipv4Addr>) -> Option<Ipv4Addr> {
        let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(ip) = preferred.filter(|ip| self.contains(*ip) && !used.contains(ip)) {
            used.insert(ip);
            return Some(ip);
        }
        let ip = (u32::from(self.first)..=u32::from(self.last))
            .map(Ipv4Addr::from)
            .find(|ip| !used.contains(ip))?;
        used.insert(ip);
        Some(ip)
    }

    /// Hands `ip` back.
    pub fn release(&self, ip: Ipv4Addr) {
        self.used
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&ip);
    }

    /// The addresses lent out right now, lowest first.
    pub fn in_use(&self) -> Vec<Ipv4Addr> {
        self.used
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_addresses_outside_loopback() {
        let err = IpPool::new(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 9));
        assert!(matches!(err, Err(PoolError::NotLoopback { .. })));
        let err = IpPool::new(Ipv4Addr::new(127, 0, 0, 9), Ipv4Addr::new(127, 0, 0, 1));
        assert!(matches!(err, Err(PoolError::Empty { .. })));
    }

    #[test]
    fn lends_each_address_once_and_takes_it_back() {
        let pool = IpPool::new(Ipv4Addr::new(127, 0, 9, 1), Ipv4Addr::new(127, 0, 9, 2))
            .expect("valid range");
        let a = pool.allocate(None).expect("first");
        let b = pool.allocate(None).expect("second");
        assert_ne!(a, b);
        assert_eq!(pool.allocate(None), None, "pool of two is full");
        pool.release(a);
        assert_eq!(pool.allocate(None), Some(a));
        assert_eq!(pool.in_use(), vec![a, b]);
    }

    #[test]
    fn keeps_a_preferred_free_address() {
        let pool = IpPool::slash24(9);
        let want = Ipv4Addr::new(127, 0, 9, 7);
        assert_eq!(pool.allocate(Some(want)), Some(want));
        // Taken now, and an out-of-range preference is ignored.
        assert_eq!(pool.allocate(Some(want)), Some(Ipv4Addr::new(127, 0, 9, 1)));
        let outside = Ipv4Addr::new(127, 0, 10, 7);
        assert_eq!(
            pool.allocate(Some(outside)),
            Some(Ipv4Addr::new(127, 0, 9, 2))
        );
    }
}
