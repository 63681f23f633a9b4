//! A WebSocket client connection (WS or WSS), split in two halves.
//!
//! The session task reads frames from the read half ([`WsReader`]). The
//! write half belongs to the connection's writer, a task of its own
//! ([`run_writer`]): [`Conn::push`] queues a message and wakes it, and it
//! writes everything queued with one flush (push → the queue → this writer →
//! the socket). TCP connections have no writer task, see [`crate::tcp`].

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use herald_protocol::{Frame, Limits};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::conn::{CloseReason, Conn};
use crate::server::Error;

/// A client byte stream under a WebSocket: plain TCP, or TLS over TCP (WSS).
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A server-side WebSocket over either stream; boxed so WS and WSS share one
/// session and writer implementation.
pub(crate) type WsStream = WebSocketStream<Box<dyn Io>>;

/// The write half of a WebSocket client, owned by its writer ([`run_writer`]).
pub(crate) type WsSink = SplitSink<WsStream, Message>;

/// The read half of a WebSocket client, read by its session task.
pub(crate) struct WsReader {
    stream: SplitStream<WsStream>,
    limits: Limits,
}

impl WsReader {
    /// Reads frames from `stream` under the inbound `limits`.
    pub(crate) fn new(stream: SplitStream<WsStream>, limits: Limits) -> WsReader {
        WsReader { stream, limits }
    }

    /// The next frame; `None` when the client closed. Once `conn` is given
    /// (after authentication), ends with [`Error::Closed`] as soon as the
    /// server closes it. Cancel-safe.
    pub(crate) async fn next(&mut self, conn: Option<&Conn>) -> Result<Option<Frame>, Error> {
        loop {
            let next = tokio::select! {
                next = self.stream.next() => next,
                () = closed(conn) => None,
            };
            if let Some(reason) = conn.and_then(Conn::close_reason) {
                return Err(Error::Closed(reason.as_str()));
            }
            let msg = match next {
                None | Some(Ok(Message::Close(_))) => return Ok(None),
                Some(Err(err)) => return Err(Error::WsRead(err)),
                Some(Ok(Message::Binary(msg))) => msg,
                Some(Ok(Message::Text(msg))) => Bytes::from(msg),
                // Pings are answered by tungstenite itself.
                Some(Ok(_)) => continue,
            };
            return Frame::from_message(msg, self.limits)
                .map(Some)
                .map_err(Error::Frame);
        }
    }
}

/// Once the server closed `conn`; never, before authentication.
async fn closed(conn: Option<&Conn>) {
    match conn {
        Some(conn) => conn.closed().await,
        None => std::future::pending().await,
    }
}

/// The close frame for a session that ended with `err`, per RFC 6455:
/// 1009 for a message past the size limit (the WebSocket's own limit, or a
/// goim frame's `pack_len`), 1002 for a protocol error (a malformed
/// WebSocket frame or goim frame). `None`, an empty close, for the rest.
pub(crate) fn close_frame(err: &Error) -> Option<CloseFrame> {
    use herald_protocol::frame::Error as FrameError;
    use tokio_tungstenite::tungstenite::Error as WsError;
    let (code, reason) = match err {
        Error::Frame(FrameError::TooLarge { .. }) | Error::WsRead(WsError::Capacity(_)) => {
            (CloseCode::Size, "message too big")
        }
        Error::Frame(_) => (CloseCode::Protocol, "invalid frame"),
        // A client that reset its socket reads no close frame.
        Error::WsRead(WsError::Protocol(
            tokio_tungstenite::tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        )) => return None,
        Error::WsRead(WsError::Protocol(_)) => (CloseCode::Protocol, "protocol error"),
        _ => return None,
    };
    Some(CloseFrame {
        code,
        reason: reason.into(),
    })
}

/// Sends a close frame carrying `frame` (an empty close without one), for
/// at most `within`: a client that does not read cannot hold the session.
pub(crate) async fn send_close(sink: &mut WsSink, frame: Option<CloseFrame>, within: Duration) {
    let _ = tokio::time::timeout(within, sink.send(Message::Close(frame))).await;
}

/// The writer of a WebSocket connection, run as its own task: drains
/// `conn`'s queue into `sink` until the connection finishes or a write
/// fails; `written(n)` is told the size of every batch written, and
/// `push_written(latency)` the queue-to-written time of every push in it.
/// Returns the sink for the close frame, which the session chooses, unless
/// a write failed.
pub(crate) async fn run_writer(
    conn: std::sync::Arc<Conn>,
    mut ws: WsSink,
    written: impl Fn(usize),
    push_written: impl Fn(Duration),
) -> Option<WsSink> {
    while let Some(batch) = conn.next_batch().await {
        let n = batch.len();
        // Empty for reply-only batches, so nothing is allocated then.
        let pushed: Vec<Instant> = batch.iter().filter_map(|q| q.pushed_at).collect();
        let mut result = Ok(());
        // Blocked while the sink waits on the socket: a queue that fills
        // meanwhile is the client's doing, not comet's.
        conn.set_blocked(true);
        for item in batch {
            if let Err(err) = ws.feed(Message::Binary(item.bytes)).await {
                result = Err(err);
                break;
            }
        }
        let result = match result {
            Ok(()) => ws.flush().await,
            Err(err) => Err(err),
        };
        conn.set_blocked(false);
        if let Err(err) = result {
            tracing::debug!(cause = %err, "write failed");
            conn.close(CloseReason::WriteFailed);
            return None;
        }
        written(n);
        let done = Instant::now();
        for at in pushed {
            push_written(done.saturating_duration_since(at));
        }
    }
    Some(ws)
}
