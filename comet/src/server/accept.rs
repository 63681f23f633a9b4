//! Accept loops: one per client listener, one session task per connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use herald_runtime::listen::Acceptor;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{Instrument, debug, debug_span, warn};

use super::{Transport, session};
use crate::Shared;

/// What a client listener speaks.
#[derive(Clone)]
pub(crate) enum Listen {
    Tcp,
    Ws,
    /// WebSocket over TLS; the acceptor holds the certificate.
    Wss(tokio_rustls::TlsAcceptor),
}

impl Listen {
    pub(super) fn transport(&self) -> Transport {
        match self {
            Listen::Tcp => Transport::Tcp,
            Listen::Ws => Transport::Ws,
            Listen::Wss(_) => Transport::Wss,
        }
    }
}

/// Accepts connections until shutdown, one session task each.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    listen: Listen,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
) {
    let transport = listen.transport();
    let mut acceptor = Acceptor::default();
    // Set once on the listener, inherited by every accepted socket: two
    // fewer system calls per connection in a storm. Checked on the first
    // connection; a kernel that does not copy them gets them per socket.
    // `None` until the first connection tells.
    let mut per_socket = set_options(&listener, shared.config.send_buffer)
        .is_err()
        .then_some(true);
    loop {
        let Some((stream, peer)) = accept(&listener, &shared, &mut acceptor).await else {
            return;
        };
        if shared.draining.load(Ordering::SeqCst) {
            debug!(%peer, "draining: refused connection");
            continue;
        }
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            warn!(%peer, "connection limit reached: refused connection");
            continue;
        };
        if *per_socket.get_or_insert_with(|| !inherited(&stream, shared.config.send_buffer)) {
            // Best effort: the connection works either way.
            let _ = set_options(&stream, shared.config.send_buffer);
        }
        let task_shared = shared.clone();
        let listen = listen.clone();
        let accepted = Box::new(Accepted {
            stream,
            peer,
            listen,
        });
        shared.tasks.spawn(
            session::run(accepted, permit, task_shared)
                // At debug, not info: an enabled span is a few hundred bytes
                // of subscriber state per connection, and sessions log at debug.
                .instrument(debug_span!("conn", %peer, ?transport)),
        );
    }
}

/// `TCP_NODELAY` (frames go out as soon as they are written) and, when
/// configured, `SO_SNDBUF` (bounds what a client that stopped reading holds
/// in the kernel), on a listener or an accepted socket.
fn set_options<S: std::os::fd::AsFd>(
    socket: &S,
    send_buffer: Option<usize>,
) -> std::io::Result<()> {
    let socket = socket2::SockRef::from(socket);
    socket.set_tcp_nodelay(true)?;
    if let Some(size) = send_buffer {
        socket.set_send_buffer_size(size)?;
    }
    Ok(())
}

/// Whether `stream` came with the listener's options: no Nagle delay and a
/// send buffer of the configured size (Linux reports it doubled).
fn inherited(stream: &TcpStream, send_buffer: Option<usize>) -> bool {
    let socket = socket2::SockRef::from(stream);
    let nodelay = socket.tcp_nodelay().unwrap_or(false);
    let buffer = send_buffer.is_none_or(|size| {
        socket
            .send_buffer_size()
            .is_ok_and(|got| got == size || got == size * 2)
    });
    nodelay && buffer
}

/// Accepts the next connection; `None` once the comet shuts down. Failures
/// are counted by reason and paused on as every listener does
/// ([`Acceptor`]).
pub(crate) async fn accept(
    listener: &TcpListener,
    shared: &Shared,
    acceptor: &mut Acceptor,
) -> Option<(TcpStream, SocketAddr)> {
    acceptor
        .accept(listener, shared.shutdown.cancelled(), |reason| {
            shared.metrics.accept_error(reason);
        })
        .await
}

/// A connection just accepted. Boxed: the session task keeps its arguments
/// for its whole life, and these are only needed until authentication.
pub(super) struct Accepted {
    pub(super) stream: TcpStream,
    pub(super) peer: SocketAddr,
    pub(super) listen: Listen,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The accept loop sets `TCP_NODELAY` and `SO_SNDBUF` once on the
    /// listener and relies on the kernel copying them to accepted sockets;
    /// `inherited` is its check, and must tell the two cases apart.
    #[tokio::test]
    async fn accepted_sockets_inherit_the_listeners_options() {
        let size = 48 * 1024;
        let configured = TcpListener::bind("127.0.0.1:0").await.unwrap();
        set_options(&configured, Some(size)).unwrap();
        let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
        for (listener, expected) in [(configured, true), (plain, false)] {
            let addr = listener.local_addr().unwrap();
            let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
            let (_client, (stream, _)) = (client.unwrap(), accepted.unwrap());
            assert_eq!(inherited(&stream, Some(size)), expected, "{addr}");
            if expected {
                assert!(stream.nodelay().unwrap());
            }
        }
    }
}
