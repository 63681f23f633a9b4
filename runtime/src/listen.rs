//! Binding a role's listeners. Roles take bound listeners (`run(config,
//! listeners, shutdown)`), so tests bind port 0 and the binary binds the
//! configured addresses through here.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("binding {addr}")]
pub struct BindError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// Why the kernel refused.
    #[source]
    pub source: std::io::Error,
}

/// Binds `addr` for TCP.
///
/// # Errors
/// The address is in use, not local, or not allowed.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// Binds `addr` when given (an optional listener such as the admin server).
///
/// # Errors
/// As [`bind`].
pub async fn bind_some(addr: Option<SocketAddr>) -> Result<Option<TcpListener>, BindError> {
    match addr {
        Some(addr) => bind(addr).await.map(Some),
        None => Ok(None),
    }
}

/// Accepting with a pause after failures, for every listener a role runs
/// (comet's client and gRPC listeners, every HTTP listener).
///
/// Out of descriptors or memory, retrying at once would spin a core on the
/// same error (tonic's and axum's own loops do), so a failure pauses the
/// listener: 10 ms, doubling up to 1 s while the errors last, back to 10 ms
/// on the next success. Connections that end meanwhile free what the next
/// accept needs, and those waiting stay in the kernel's backlog. A
/// connection that died before it was accepted is skipped at once.
#[derive(Debug)]
pub struct Acceptor {
    pause: Duration,
}

impl Default for Acceptor {
    fn default() -> Self {
        Acceptor {
            pause: Acceptor::FIRST_PAUSE,
        }
    }
}

impl Acceptor {
    /// The pause after the first failure in a row.
    pub const FIRST_PAUSE: Duration = Duration::from_millis(10);
    /// The longest pause.
    pub const LONGEST_PAUSE: Duration = Duration::from_secs(1);

    /// The next connection on `listener`, or `None` once `stop` completes
    /// (while waiting for a connection or pausing). Each failure is handed
    /// to `failed` with its [`accept_error_reason`], to be counted.
    pub async fn accept(
        &mut self,
        listener: &TcpListener,
        stop: impl Future<Output = ()>,
        mut failed: impl FnMut(&'static str),
    ) -> Option<(TcpStream, SocketAddr)> {
        let mut stop = std::pin::pin!(stop);
        loop {
            let accepted = tokio::select! {
                () = &mut stop => return None,
                accepted = listener.accept() => accepted,
            };
            let err = match accepted {
                Ok(accepted) => {
                    self.pause = Acceptor::FIRST_PAUSE;
                    return Some(accepted);
                }
                Err(err) => err,
            };
            let reason = accept_error_reason(&err);
            failed(reason);
            if reason == "aborted" {
                debug!(cause = %err, "accept: connection aborted");
                continue;
            }
            warn!(cause = %err, reason, pause_ms = self.pause.as_millis(), "accept failed: backing off");
            tokio::select! {
                () = &mut stop => return None,
                () = tokio::time::sleep(self.pause) => {}
            }
            self.pause = (self.pause * 2).min(Acceptor::LONGEST_PAUSE);
        }
    }
}

/// The `reason` label of an accept error: resource exhaustion by kind
/// (`emfile`, `enfile`, `enobufs`, `enomem`), a connection that died before
/// it was accepted (`aborted`), or `other`.
pub fn accept_error_reason(err: &std::io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(libc::EMFILE) => "emfile",
        Some(libc::ENFILE) => "enfile",
        Some(libc::ENOBUFS) => "enobufs",
        Some(libc::ENOMEM) => "enomem",
        _ => match err.kind() {
            std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionRefused => "aborted",
            _ => "other",
        },
    }
}

/// A port nothing listens on at 127.0.0.1, for a server process a test or
/// the benchmark starts: [`free_port_on`] that address.
pub fn free_port() -> u16 {
    free_port_on(std::net::Ipv4Addr::LOCALHOST.into())
}

/// A port nothing listens on at `ip`, for a server process a test starts.
///
/// # Panics
/// When [`try_free_port_on`] finds none.
pub fn free_port_on(ip: std::net::IpAddr) -> u16 {
    try_free_port_on(ip).unwrap_or_else(|err| panic!("no free port at {ip}: {err}"))
}

/// A port nothing listens on at `ip`, for a server process a test (or the
/// benchmark) starts.
///
/// Picked below the kernel's ephemeral range: a port found by binding port 0
/// lies inside that range, and between its release and the server's own
/// bind any outgoing connection on the machine may take it as its source
/// port (the server then fails with "Address already in use"). No source
/// port is ever chosen below the range. Ports handed out by this process
/// are not handed out again.
///
/// # Errors
/// The last bind error when no port in the range could be bound after many
/// tries.
pub fn try_free_port_on(ip: std::net::IpAddr) -> std::io::Result<u16> {
    use std::hash::BuildHasher;
    static TAKEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    const LOWEST: u16 = 10_000;
    let below = ephemeral_low().max(LOWEST + 1_000);
    let mut taken = TAKEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let random = std::collections::hash_map::RandomState::new();
    let mut last_err = None;
    for attempt in 0..10_000u32 {
        let offset = random.hash_one((attempt, std::process::id())) % u64::from(below - LOWEST);
        let port = LOWEST + u16::try_from(offset).unwrap_or(0);
        if taken.contains(&port) {
            continue;
        }
        match std::net::TcpListener::bind((ip, port)) {
            Ok(_) => {
                taken.push(port);
                return Ok(port);
            }
            Err(err) => last_err = Some(err),
        }
    }
    Err(last_err.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::AddrInUse, "every port handed out")
    }))
}

/// The first port of `net.ipv4.ip_local_port_range` (32768 when unreadable).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_taken_address_names_itself() {
        let taken = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = bind(addr).await.unwrap_err();
        assert_eq!(err.addr, addr);
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        assert!(bind_some(None).await.unwrap().is_none());
    }

    #[test]
    fn free_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let low = ephemeral_low();
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        for port in ports {
            assert!(port < low, "{port} is in the ephemeral range from {low}");
            std::net::TcpListener::bind(("127.0.0.1", port)).expect("bindable");
        }
    }
}
