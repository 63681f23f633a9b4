//! Opening one client: a socket bound to its source address, the connect,
//! for WebSocket the upgrade, then op 7 → op 8 within [`HANDSHAKE`]; what
//! comes back ([`Opened`]) the generator turns into a sink or a probe.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::{Clock, Transport};
use crate::wire::{self, Scanner, Tally};

/// Why a client could not connect.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket call failed.
    #[error("client {mid}: {step}")]
    Io {
        /// The client.
        mid: u64,
        /// What it was doing.
        step: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The server answered the WebSocket upgrade with something other than 101.
    #[error("client {mid}: WebSocket upgrade refused: {status}")]
    Upgrade {
        /// The client.
        mid: u64,
        /// The status line.
        status: String,
    },
    /// The server closed the connection before the op-8 reply.
    #[error("client {mid}: closed before authentication completed")]
    Closed {
        /// The client.
        mid: u64,
    },
    /// No op-8 reply in time.
    #[error("client {mid}: no authentication reply within {0:?}", HANDSHAKE)]
    Timeout {
        /// The client.
        mid: u64,
    },
}

/// Result with this module's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

const HANDSHAKE: Duration = Duration::from_secs(10);

/// One client to open.
#[derive(Debug, Clone)]
pub(crate) struct ClientSpec {
    pub(crate) mid: u64,
    pub(crate) room: String,
    pub(crate) transport: Transport,
    /// Whether to authenticate (the floor server takes bare connections).
    pub(crate) auth: bool,
    pub(crate) probe: bool,
    /// A receive buffer size to set before connecting (S7 shrinks it so a
    /// client that stops reading backs up into comet's queue sooner).
    pub(crate) rcvbuf: Option<u32>,
    /// Check sequence numbers from the body (pushes through logic and job).
    pub(crate) body_seq: bool,
}

/// A connected client before it becomes a sink or a probe.
#[derive(Debug)]
pub(super) struct Opened {
    pub(super) spec: ClientSpec,
    pub(super) stream: TcpStream,
    pub(super) scanner: Scanner,
    pub(super) tally: Tally,
}

/// Opens one client from source `src` to `target`; returns when op 8 arrived.
pub(super) async fn open(
    spec: ClientSpec,
    src: Ipv4Addr,
    target: SocketAddr,
    clock: Clock,
) -> Result<Opened> {
    let mid = spec.mid;
    let io = |step| move |source| Error::Io { mid, step, source };
    let socket = TcpSocket::new_v4().map_err(io("socket"))?;
    if let Some(size) = spec.rcvbuf {
        socket
            .set_recv_buffer_size(size)
            .map_err(io("receive buffer size"))?;
    }
    socket
        .bind(SocketAddr::new(src.into(), 0))
        .map_err(io("bind source address"))?;
    let mut stream = socket.connect(target).await.map_err(io("connect"))?;
    stream.set_nodelay(true).map_err(io("nodelay"))?;
    let mut scanner = Scanner::new(spec.transport == Transport::Ws, spec.body_seq);
    let mut tally = Tally::default();
    if !spec.auth {
        return Ok(Opened {
            spec,
            stream,
            scanner,
            tally,
        });
    }
    let handshake = async {
        let mut buf = [0u8; 1024];
        let auth = wire::auth_frame(wire::token(mid, &spec.room).as_slice());
        if spec.transport == Transport::Ws {
            stream
                .write_all(&wire::ws_upgrade(&target.to_string()))
                .await
                .map_err(io("send upgrade"))?;
            // Read the 101 response up to its blank line; keep what follows.
            let mut head = Vec::with_capacity(256);
            let end = loop {
                let n = stream.read(&mut buf).await.map_err(io("read upgrade"))?;
                if n == 0 {
                    return Err(Error::Closed { mid });
                }
                head.extend_from_slice(&buf[..n]);
                if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                    break at + 4;
                }
            };
            if !head.starts_with(b"HTTP/1.1 101") {
                let status = String::from_utf8_lossy(&head[..head.len().min(64)]).into_owned();
                return Err(Error::Upgrade { mid, status });
            }
            scanner.feed(&head[end..], &mut tally, clock.ns(), None);
            stream
                .write_all(&wire::ws_client_frame(&auth))
                .await
                .map_err(io("send auth"))?;
        } else {
            stream.write_all(&auth).await.map_err(io("send auth"))?;
        }
        while tally.auth_replies == 0 {
            let n = stream.read(&mut buf).await.map_err(io("read auth reply"))?;
            if n == 0 {
                return Err(Error::Closed { mid });
            }
            scanner.feed(&buf[..n], &mut tally, clock.ns(), None);
        }
        Ok(())
    };
    tokio::time::timeout(HANDSHAKE, handshake)
        .await
        .map_err(|_| Error::Timeout { mid })??;
    Ok(Opened {
        spec,
        stream,
        scanner,
        tally,
    })
}
