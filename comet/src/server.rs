//! Accept loops and the per-connection session (goim-protocol.md §4–5).
//!
//! A session runs in two phases. The handshake — WebSocket upgrade, waiting
//! for op 7, logic `Connect` — runs under one deadline; frames other than op 7
//! are discarded meanwhile. After op 8 the connection is registered in the
//! buckets and the session answers client frames until the idle timeout, the
//! client, the server (replacement, slow consumer, drain) or shutdown ends it.
//! Every authenticated session calls logic `Disconnect` exactly once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::SplitStream;
use herald_protocol::{Frame, Limits, op, ops};
use rand::Rng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message, http};
use tracing::{Instrument, debug, info_span, warn};

use crate::Shared;
use crate::conn::{CloseReason, Conn, Identity, Sink, write_loop};

/// Which client protocol a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Raw TCP: frames back to back.
    Tcp,
    /// WebSocket on `/sub`: one frame per message, pushes op-9 wrapped.
    Ws,
}

/// Why a session ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The WebSocket upgrade failed (bad request, wrong path, I/O).
    #[error("WebSocket upgrade failed")]
    Upgrade(#[source] tungstenite::Error),
    /// The TLS handshake (WSS) failed.
    #[error("TLS handshake failed")]
    Tls(#[source] std::io::Error),
    /// Upgrade plus authentication did not finish in time.
    #[error("handshake deadline passed")]
    HandshakeTimeout,
    /// Reading the TCP stream failed.
    #[error("read failed")]
    Read(#[source] std::io::Error),
    /// Reading the WebSocket failed (including an oversized message).
    #[error("WebSocket read failed")]
    WsRead(#[source] tungstenite::Error),
    /// The client sent a frame that breaks the inbound limits.
    #[error("invalid frame")]
    Frame(#[source] herald_protocol::frame::Error),
    /// Logic refused (or failed) the `Connect` call.
    #[error("authentication failed")]
    Auth(#[source] tonic::Status),
    /// No heartbeat within the idle timeout.
    #[error("idle timeout")]
    Idle,
    /// The server closed the connection.
    #[error("closed by server: {0}")]
    Closed(&'static str),
}

/// Largest WebSocket message or frame accepted: goim reads with an 8 KiB
/// buffer; a goim frame is at most 4112 bytes, so this leaves headroom.
const MAX_WS_MESSAGE: usize = 8 * 1024;
/// How long a finished session lets its writer flush (e.g. an op-18 redirect).
const WRITER_GRACE: Duration = Duration::from_secs(2);
/// Idle timeout when logic returns a non-positive heartbeat (it must not).
const DEFAULT_IDLE: Duration = Duration::from_secs(480);

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A client byte stream under a WebSocket: plain TCP, or TLS over TCP (WSS).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A server-side WebSocket over either stream; boxed so WS and WSS share one
/// session and writer implementation.
pub type WsStream = WebSocketStream<Box<dyn Io>>;

/// What a client listener speaks.
#[derive(Clone)]
pub(crate) enum Listen {
    Tcp,
    Ws,
    /// WebSocket over TLS; the acceptor holds the certificate.
    Wss(tokio_rustls::TlsAcceptor),
}

impl Listen {
    fn transport(&self) -> Transport {
        match self {
            Listen::Tcp => Transport::Tcp,
            Listen::Ws | Listen::Wss(_) => Transport::Ws,
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
    loop {
        let accepted = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Usually EMFILE; back off rather than spin.
                warn!(cause = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if shared.draining.load(Ordering::SeqCst) {
            debug!(%peer, "draining: refused connection");
            continue;
        }
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            warn!(%peer, "connection limit reached: refused connection");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let task_shared = shared.clone();
        let listen = listen.clone();
        shared.tasks.spawn(
            async move {
                let _permit = permit;
                if let Err(err) = session(stream, peer, listen, &task_shared).await {
                    debug!(cause = %err, "session ended");
                }
            }
            .instrument(info_span!("conn", %peer, ?transport)),
        );
    }
}

/// Reads frames from either transport.
enum Reader {
    Tcp { half: OwnedReadHalf, buf: BytesMut },
    Ws(SplitStream<WsStream>),
}

impl Reader {
    /// The next frame; `None` when the client closed. Cancel-safe: a partial
    /// TCP frame stays in `buf`.
    async fn next(&mut self) -> Result<Option<Frame>, Error> {
        match self {
            Reader::Tcp { half, buf } => loop {
                if let Some(frame) = Frame::decode(buf, Limits::INBOUND).map_err(Error::Frame)? {
                    return Ok(Some(frame));
                }
                if half.read_buf(buf).await.map_err(Error::Read)? == 0 {
                    return Ok(None);
                }
            },
            Reader::Ws(stream) => loop {
                let msg = match stream.next().await {
                    None | Some(Ok(Message::Close(_))) => return Ok(None),
                    Some(Err(err)) => return Err(Error::WsRead(err)),
                    Some(Ok(Message::Binary(msg))) => msg,
                    Some(Ok(Message::Text(msg))) => Bytes::from(msg),
                    // Pings are answered by tungstenite itself.
                    Some(Ok(_)) => continue,
                };
                return Frame::from_message(msg, Limits::INBOUND)
                    .map(Some)
                    .map_err(Error::Frame);
            },
        }
    }
}

/// Checks the upgrade request (§4.2) and remembers its Cookie header.
// The error type is tungstenite's `Callback` contract, not ours to shrink.
#[allow(clippy::result_large_err)]
fn check_upgrade(req: &Request, cookie: &mut String) -> Result<(), ErrorResponse> {
    if req.uri().path() != "/sub" || req.uri().query().is_some() {
        let mut resp = ErrorResponse::new(Some("expected GET /sub".to_owned()));
        *resp.status_mut() = http::StatusCode::BAD_REQUEST;
        return Err(resp);
    }
    if let Some(value) = req
        .headers()
        .get(http::header::COOKIE)
        .and_then(|v| v.to_str().ok())
    {
        value.clone_into(cookie);
    }
    Ok(())
}

/// Whether the token asks for op-18 redirects (`"herald":{"redirect":true}`).
/// Lenient like goim's token parsing: anything unexpected means "no".
fn wants_redirect(token: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(token)
        .ok()
        .and_then(|v| v.get("herald")?.get("redirect")?.as_bool())
        .unwrap_or(false)
}

async fn session(
    stream: TcpStream,
    peer: SocketAddr,
    listen: Listen,
    shared: &Arc<Shared>,
) -> Result<(), Error> {
    let transport = listen.transport();
    let deadline = Instant::now() + shared.config.handshake_timeout;
    let handshake = tokio::select! {
        () = shared.shutdown.cancelled() => return Ok(()),
        handshake = timeout_at(deadline, handshake(stream, listen, shared)) => {
            handshake.map_err(|_| Error::HandshakeTimeout).and_then(|inner| inner)
        }
    };
    shared.metrics.auth(match &handshake {
        Ok(Some(_)) => "ok",
        Ok(None) => "client_gone",
        Err(Error::HandshakeTimeout) => "timeout",
        Err(Error::Auth(_)) => "refused",
        Err(_) => "invalid",
    });
    let handshake = handshake?;
    let Some(Handshake {
        mut reader,
        sink,
        auth,
        reply,
        redirect,
    }) = handshake
    else {
        return Ok(());
    };

    let conn = Arc::new(Conn::new(
        Identity {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            key: reply.key,
            mid: reply.mid,
            transport,
            ip: peer.ip(),
            redirect,
        },
        &reply.accepts,
        shared.config.queue_bytes,
    ));
    let writer = {
        let shared = shared.clone();
        let written = move |n| shared.metrics.frames_out(transport, n);
        tokio::spawn(write_loop(conn.clone(), sink, written).in_current_span())
    };
    shared.metrics.connection_opened(transport);
    // Op 8 goes out before the connection is findable, so it precedes any push.
    let _ = conn.send(auth.reply(op::AUTH_REPLY, Bytes::new()).to_bytes());
    let mut room = (!reply.room_id.is_empty()).then_some(reply.room_id);
    if let Some(old) = shared.buckets.put(&conn, room.as_deref()) {
        old.close(CloseReason::Replaced);
    }
    if shared.draining.load(Ordering::SeqCst) {
        conn.close(CloseReason::Drain);
    }
    let idle = u64::try_from(reply.heartbeat)
        .ok()
        .filter(|&ns| ns > 0)
        .map_or(DEFAULT_IDLE, Duration::from_nanos);

    let result = serve(&mut reader, &conn, &mut room, shared, idle).await;
    shared.metrics.connection_closed(
        transport,
        match &result {
            Ok(()) => "client_or_shutdown",
            Err(Error::Idle) => "idle",
            Err(Error::Closed(reason)) => reason,
            Err(Error::Frame(_)) => "invalid_frame",
            Err(_) => "io",
        },
    );

    shared.buckets.remove(&conn, room.as_deref());
    conn.finish();
    let server = &shared.config.server_id;
    shared.logic.disconnect(conn.mid, &conn.key, server).await;
    // Logic keys routes by key and server, so the Disconnect of a connection
    // replaced by a same-key successor on this comet just deleted the
    // successor's route (goim defect, §13.3). A session refresh recreates it.
    if let Some(successor) = shared.buckets.get(&conn.key).filter(|c| c.id != conn.id) {
        shared
            .logic
            .heartbeat(successor.mid, &successor.key, server)
            .await;
    }
    let abort = writer.abort_handle();
    if conn.close_reason() == Some(CloseReason::SlowConsumer)
        || tokio::time::timeout(WRITER_GRACE, writer).await.is_err()
    {
        // A client that does not read would pin the writer in a write forever.
        abort.abort();
    }
    drop(reader);
    result
}

struct Handshake {
    reader: Reader,
    sink: Sink,
    auth: Frame,
    reply: herald_protocol::pb::ConnectReply,
    redirect: bool,
}

/// Upgrade (WebSocket), wait for op 7, call logic `Connect`. `None` when the
/// client went away first.
async fn handshake(
    stream: TcpStream,
    listen: Listen,
    shared: &Shared,
) -> Result<Option<Handshake>, Error> {
    let mut cookie = String::new();
    let (mut reader, sink) = match listen {
        Listen::Tcp => {
            let (read, write) = stream.into_split();
            let reader = Reader::Tcp {
                half: read,
                buf: BytesMut::with_capacity(4096),
            };
            (reader, Sink::Tcp(write))
        }
        Listen::Ws => upgrade(Box::new(stream), &mut cookie).await?,
        Listen::Wss(acceptor) => {
            let tls = acceptor.accept(stream).await.map_err(Error::Tls)?;
            upgrade(Box::new(tls), &mut cookie).await?
        }
    };
    let auth = loop {
        let Some(frame) = reader.next().await? else {
            return Ok(None);
        };
        if frame.op == op::AUTH {
            break frame;
        }
        // Anything before op 7 is dropped without reply (§5.1).
    };
    let redirect = wants_redirect(&auth.body);
    let reply = shared
        .logic
        .connect(&shared.config.server_id, cookie, auth.body.clone())
        .await
        .map_err(Error::Auth)?;
    Ok(Some(Handshake {
        reader,
        sink,
        auth,
        reply,
        redirect,
    }))
}

/// The WebSocket upgrade on `/sub`, with goim's message size limits.
async fn upgrade(stream: Box<dyn Io>, cookie: &mut String) -> Result<(Reader, Sink), Error> {
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_WS_MESSAGE))
        .max_frame_size(Some(MAX_WS_MESSAGE));
    // tungstenite's `Callback` contract fixes this closure's error type.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: Response| check_upgrade(req, cookie).map(|()| resp);
    let ws = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config))
        .await
        .map_err(Error::Upgrade)?;
    let (write, read) = ws.split();
    Ok((Reader::Ws(read), Sink::Ws(write)))
}

/// The authenticated phase: answer frames until something ends the session.
async fn serve(
    reader: &mut Reader,
    conn: &Arc<Conn>,
    room: &mut Option<String>,
    shared: &Arc<Shared>,
    idle: Duration,
) -> Result<(), Error> {
    let mut idle_deadline = Instant::now() + idle;
    // goim draws the refresh interval per connection; jitter spreads the
    // refreshes of connections that arrived together.
    let refresh_every = shared
        .config
        .session_refresh
        .mul_f64(rand::rng().random_range(0.75..1.25));
    let mut last_refresh = Instant::now();
    loop {
        let frame = tokio::select! {
            () = conn.closed.cancelled() => {
                return Err(Error::Closed(conn.close_reason().map_or("write failed", CloseReason::as_str)));
            }
            () = shared.shutdown.cancelled() => return Ok(()),
            () = sleep_until(idle_deadline) => return Err(Error::Idle),
            frame = reader.next() => frame?,
        };
        let Some(frame) = frame else {
            return Ok(());
        };
        shared.metrics.frame_in(conn.transport);
        let reply = match frame.op {
            op::HEARTBEAT => {
                idle_deadline = Instant::now() + idle;
                if last_refresh.elapsed() >= refresh_every {
                    last_refresh = Instant::now();
                    let shared = shared.clone();
                    let conn = conn.clone();
                    tokio::spawn(
                        async move {
                            let server = &shared.config.server_id;
                            shared.logic.heartbeat(conn.mid, &conn.key, server).await;
                        }
                        .in_current_span(),
                    );
                }
                let count = online_count(shared, room.as_deref());
                frame.reply(op::HEARTBEAT_REPLY, count.to_be_bytes().to_vec())
            }
            op::CHANGE_ROOM => {
                // A non-UTF-8 room cannot be named by anyone; the move fails
                // and the body is echoed anyway (§5.2).
                if let Ok(to) = std::str::from_utf8(&frame.body) {
                    let to = (!to.is_empty()).then(|| to.to_owned());
                    shared
                        .buckets
                        .change_room(conn, room.as_deref(), to.as_deref());
                    *room = to;
                }
                frame.reply(op::CHANGE_ROOM_REPLY, frame.body.clone())
            }
            op::SUB => {
                if let Ok(list) = ops::parse(&frame.body) {
                    conn.accept(&list);
                }
                frame.reply(op::SUB_REPLY, frame.body.clone())
            }
            op::UNSUB => {
                if let Ok(list) = ops::parse(&frame.body) {
                    conn.unaccept(&list);
                }
                frame.reply(op::UNSUB_REPLY, frame.body.clone())
            }
            other => {
                let reply = frame.reply(other, Bytes::new());
                shared.logic.receive(conn.mid, frame.into()).await;
                reply
            }
        };
        conn.send(reply.to_bytes())
            .map_err(|closed| Error::Closed(closed.0.as_str()))?;
    }
}

/// §5.4: the cluster count if logic reported a positive one, else the local
/// count, else 0 outside any room.
fn online_count(shared: &Shared, room: Option<&str>) -> i32 {
    let Some(room) = room else {
        return 0;
    };
    shared
        .logic
        .cluster_count(room)
        .unwrap_or_else(|| i32::try_from(shared.buckets.room_count(room)).unwrap_or(i32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_flag_is_read_leniently() {
        assert!(wants_redirect(br#"{"mid":1,"herald":{"redirect":true}}"#));
        assert!(!wants_redirect(br#"{"mid":1,"herald":{"redirect":"yes"}}"#));
        assert!(!wants_redirect(br#"{"mid":1}"#));
        assert!(!wants_redirect(b"not json"));
    }
}
