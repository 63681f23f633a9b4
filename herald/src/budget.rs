//! `herald standalone`'s descriptor budget: comet and logic run in one
//! process and so share one descriptor table (`RLIMIT_NOFILE`). Without a
//! split, 1,100 idle connections to the HTTP push API under the common
//! 1,024 limit took every descriptor, and no client could connect to the
//! comet. Each listener gets a cap within its share, so a flood on one is
//! answered and closed there and the others keep theirs.

/// Descriptors kept out of every share: standard streams, the epoll and
/// event descriptors of the runtime, the listeners, loopback gRPC between
/// the roles, Redis and Kafka connections, log files.
const RESERVED: u64 = 64;

/// How the soft descriptor limit is split between the listeners.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Budget {
    /// The soft `RLIMIT_NOFILE` split.
    pub(crate) limit: u64,
    /// Kept for the process itself and the admin listener.
    pub(crate) reserved: u64,
    /// Comet client connections (TCP and WebSocket together).
    pub(crate) comet: usize,
    /// Logic's HTTP push API.
    pub(crate) http: usize,
    /// Logic's client listener, when served.
    pub(crate) client: Option<usize>,
}

impl Budget {
    /// Splits `limit` descriptors. Off the top: [`RESERVED`], the admin
    /// listener's cap and a sixteenth (headroom for what grows with load:
    /// more Kafka or Redis connections, sockets in their closing steps).
    /// Of the rest, clients are what the process is for: the HTTP API gets
    /// an eighth (its callers are backends with connection pools), the
    /// client listener a sixteenth, the comet everything else. Every share
    /// is at least 1.
    pub(crate) fn split(limit: u64, client: bool) -> Budget {
        let admin = herald_runtime::http::ADMIN_MAX_CONNECTIONS as u64;
        let reserved = RESERVED + admin + limit / 16;
        let shared = limit.saturating_sub(reserved);
        let http = (shared / 8).max(1);
        let client_share = client.then(|| (shared / 16).max(1));
        let comet = shared
            .saturating_sub(http + client_share.unwrap_or(0))
            .max(1);
        let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        Budget {
            limit,
            reserved,
            comet: size(comet),
            http: size(http),
            client: client_share.map(size),
        }
    }

    /// Caps the listeners' connections to their shares (never above what
    /// they were: a share larger than a role's own default changes nothing)
    /// and logs the split.
    pub(crate) fn apply(&self, logic: &mut herald_logic::Config, comet: &mut herald_comet::Config) {
        comet.max_connections = comet.max_connections.min(self.comet);
        let http = &mut logic.http_limits.max_connections;
        *http = (*http).min(self.http);
        if let Some(client) = self.client {
            let cap = &mut logic.client_limits.max_connections;
            *cap = (*cap).min(client);
        }
        tracing::info!(
            nofile = self.limit,
            reserved = self.reserved,
            comet = comet.max_connections,
            http = logic.http_limits.max_connections,
            client = ?self.client.map(|_| logic.client_limits.max_connections),
            "descriptor budget: connections each listener may hold"
        );
    }

    /// The split of this process's soft `RLIMIT_NOFILE` (the soft limit is
    /// what `accept` runs into; nothing in Herald raises it).
    pub(crate) fn of_process(client: bool) -> std::io::Result<Budget> {
        Ok(Budget::split(nofile()?, client))
    }
}

/// The soft `RLIMIT_NOFILE` from `/proc/self/limits` (the workspace has no
/// unsafe code, so no `getrlimit`); `unlimited` reads as `u64::MAX`.
fn nofile() -> std::io::Result<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits")?;
    let soft = limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next());
    match soft {
        Some("unlimited") => Ok(u64::MAX),
        Some(n) => n.parse().map_err(std::io::Error::other),
        None => Err(std::io::Error::other(
            "no \"Max open files\" in /proc/self/limits",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::Budget;

    #[test]
    fn shares_never_exceed_the_limit() {
        for limit in [1, 64, 256, 1024, 4096, 65_536, 1 << 20, u64::MAX] {
            for client in [false, true] {
                let b = Budget::split(limit, client);
                let held = b.comet as u128 + b.http as u128 + b.client.unwrap_or(0) as u128;
                if limit >= 1024 {
                    assert!(held + u128::from(b.reserved) <= u128::from(limit), "{b:?}");
                    assert!(b.comet > 4 * b.http, "{b:?}");
                }
                assert!(b.comet >= 1 && b.http >= 1, "{b:?}");
                assert_eq!(b.client.is_some(), client);
            }
        }
    }

    #[test]
    fn the_common_limit_of_1024() {
        let b = Budget::split(1024, false);
        assert_eq!((b.reserved, b.http, b.comet), (192, 104, 728));
        let b = Budget::split(1024, true);
        assert_eq!((b.http, b.client, b.comet), (104, Some(52), 676));
    }

    /// The limit read is the one `ulimit -n` shows.
    #[test]
    fn reads_the_process_limit() {
        let shell = std::process::Command::new("sh")
            .args(["-c", "ulimit -n"])
            .output()
            .unwrap();
        let expected = String::from_utf8(shell.stdout).unwrap();
        let expected = match expected.trim() {
            "unlimited" => u64::MAX,
            n => n.parse().unwrap(),
        };
        assert_eq!(super::nofile().unwrap(), expected);
    }
}
