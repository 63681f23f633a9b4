//! S4's handshake floor (the `floor-handshake` process): a bare `epoll`
//! loop that accepts, reads the auth frame, answers with a pre-encoded
//! reply and closes when the client does.

use std::io::Write;

use herald_protocol::frame::HEADER_LEN;

use super::{Error, Result, announced_listener};
use crate::wire;

/// Serves S4's floor in this process (the `floor-handshake` target): the
/// least a connection server does per authenticated connection, on one
/// thread with a bare `epoll` loop (mio): accept, register, read the op-7
/// frame, write a pre-encoded op-8 reply, and close when the client does.
/// No token check, no call to logic, no task per connection: what is left
/// is the kernel's share of a connection (accept, the socket, its epoll
/// registration, one read and one write over loopback, the close), which
/// every server pays. It runs until the benchmark stops it.
pub(crate) fn handshake() -> Result<()> {
    use mio::{Events, Interest, Poll, Token};
    let io = |step| move |source| Error::Io { step, source };
    const LISTENER: Token = Token(usize::MAX);
    let listener = announced_listener()?;
    listener.set_nonblocking(true).map_err(io("nonblocking"))?;
    let mut listener = mio::net::TcpListener::from_std(listener);
    let mut poll = Poll::new().map_err(io("epoll"))?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .map_err(io("register listener"))?;
    let reply = wire::auth_reply_frame();
    let mut conns = slab::Slab::new();
    let mut events = Events::with_capacity(1024);
    let mut buf = [0u8; 4096];
    loop {
        if let Err(err) = poll.poll(&mut events, None) {
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(io("epoll wait")(err));
        }
        for event in &events {
            if event.token() == LISTENER {
                accept_all(&listener, &poll, &mut conns);
                continue;
            }
            let slot = event.token().0;
            let open = conns
                .get_mut(slot)
                .is_some_and(|conn: &mut HandshakeConn| conn.serve(&mut buf, &reply));
            if !open && let Some(mut conn) = conns.try_remove(slot) {
                let _ = poll.registry().deregister(&mut conn.stream);
            }
        }
    }
}

/// Accepts every connection waiting on `listener` and registers it under
/// its slot in `conns`.
fn accept_all(
    listener: &mio::net::TcpListener,
    poll: &mio::Poll,
    conns: &mut slab::Slab<HandshakeConn>,
) {
    // WouldBlock ends the batch; so do running out of descriptors and a
    // client gone before accept: the storm's counts show those.
    while let Ok((mut stream, _)) = listener.accept() {
        let _ = stream.set_nodelay(true);
        let entry = conns.vacant_entry();
        let token = mio::Token(entry.key());
        if poll
            .registry()
            .register(&mut stream, token, mio::Interest::READABLE)
            .is_ok()
        {
            entry.insert(HandshakeConn { stream, header: 0 });
        }
    }
}

/// One client of the handshake floor.
#[derive(Debug)]
struct HandshakeConn {
    stream: mio::net::TcpStream,
    /// Header bytes received so far, up to [`HEADER_LEN`].
    header: usize,
}

impl HandshakeConn {
    /// Reads what has arrived; writes `reply` once the auth frame's header
    /// is in (later bytes, heartbeats, are read and dropped). `false` when
    /// the client closed or the socket failed.
    fn serve(&mut self, buf: &mut [u8], reply: &[u8]) -> bool {
        use std::io::{ErrorKind, Read};
        loop {
            match self.stream.read(buf) {
                Ok(0) => return false,
                Ok(n) => {
                    let before = self.header;
                    self.header = (self.header + n).min(HEADER_LEN);
                    if before < HEADER_LEN
                        && self.header == HEADER_LEN
                        && self.stream.write_all(reply).is_err()
                    {
                        return false;
                    }
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => return true,
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }
}
