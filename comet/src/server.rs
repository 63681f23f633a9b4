//! Accept loops and the per-connection session (§4–5).
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
use herald_protocol::{Frame, Limits, op};
use rand::Rng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{Request, create_response, write_response};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message, http};
use tracing::{Instrument, debug, debug_span, warn};

use crate::Shared;
use crate::conn::{CloseReason, Conn, Identity, WsSink, write_loop};
use crate::metrics::Metrics;
use crate::tcp::TcpLink;

/// Which client protocol a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Raw TCP: frames back to back.
    Tcp,
    /// WebSocket on `/sub`: one frame per message, pushes op-9 wrapped.
    Ws,
    /// WebSocket over TLS: framed like [`Transport::Ws`], counted apart.
    Wss,
}

/// Why a session ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The WebSocket upgrade response could not be built.
    #[error("WebSocket upgrade failed")]
    Upgrade(#[source] tungstenite::Error),
    /// The WebSocket upgrade request was refused with an HTTP error.
    #[error("WebSocket upgrade refused: {0}")]
    UpgradeRefused(&'static str),
    /// Reading the upgrade request or writing its answer failed.
    #[error("WebSocket upgrade I/O failed")]
    UpgradeIo(#[source] std::io::Error),
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
    /// The server closed the connection.
    #[error("closed by server: {0}")]
    Closed(&'static str),
}

/// Largest WebSocket message or frame accepted: goim reads with an 8 KiB
/// buffer; a goim frame is at most 4112 bytes, so this leaves headroom.
const MAX_WS_MESSAGE: usize = 8 * 1024;

/// Read buffer of one WebSocket connection (see [`upgrade`]).
const WS_READ_BUFFER: usize = 4 * 1024;
/// Largest WebSocket upgrade request head (request line and headers).
/// tungstenite's own limit is 64 KiB and not configurable; browsers send
/// well under 2 KiB, and every byte here is held per pending connection.
const MAX_UPGRADE_HEAD: usize = 8 * 1024;
/// Most headers in the upgrade request. tungstenite allows 124 and drops the
/// connection without an answer past that; we answer 431.
const MAX_UPGRADE_HEADERS: usize = 64;
/// First pause after an accept failure such as EMFILE; doubles up to
/// [`ACCEPT_BACKOFF_MAX`] while accepts keep failing.
pub(crate) const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause between accept attempts while resources are exhausted.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Window in which rate-limited `Receive` ops are counted toward a flood close.
const FLOOD_WINDOW: Duration = Duration::from_secs(10);
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
    let mut backoff = ACCEPT_BACKOFF_MIN;
    // Set once on the listener, inherited by every accepted socket: two
    // fewer system calls per connection in a storm. Checked on the first
    // connection; a kernel that does not copy them gets them per socket.
    // `None` until the first connection tells.
    let mut per_socket = set_options(&listener, shared.config.send_buffer)
        .is_err()
        .then_some(true);
    loop {
        let Some((stream, peer)) = accept(&listener, &shared, &mut backoff).await else {
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
            session(accepted, permit, task_shared)
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

/// Accepts the next connection; `None` once the comet shuts down.
///
/// Accept errors are counted by reason. Out of descriptors or memory,
/// retrying at once would spin on the same error, so it pauses — `backoff`,
/// doubling up to [`ACCEPT_BACKOFF_MAX`] while the errors last, reset by the
/// next success; sessions that end meanwhile free what the next accept
/// needs. A connection that died before being accepted is retried at once.
pub(crate) async fn accept(
    listener: &TcpListener,
    shared: &Shared,
    backoff: &mut Duration,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            () = shared.shutdown.cancelled() => return None,
            accepted = listener.accept() => accepted,
        };
        let err = match accepted {
            Ok(accepted) => {
                *backoff = ACCEPT_BACKOFF_MIN;
                return Some(accepted);
            }
            Err(err) => err,
        };
        let reason = accept_error_reason(&err);
        shared.metrics.accept_error(reason);
        if reason == "aborted" {
            debug!(cause = %err, "accept: connection aborted");
            continue;
        }
        warn!(cause = %err, reason, pause_ms = backoff.as_millis(), "accept failed: backing off");
        tokio::select! {
            () = shared.shutdown.cancelled() => return None,
            () = tokio::time::sleep(*backoff) => {}
        }
        *backoff = (*backoff * 2).min(ACCEPT_BACKOFF_MAX);
    }
}

/// The `reason` label of an accept error: resource exhaustion by kind, a
/// connection that died before it was accepted, or anything else.
fn accept_error_reason(err: &std::io::Error) -> &'static str {
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

/// Reads frames from either transport, under the inbound limits.
enum Reader {
    /// TCP reads and writes in the session task.
    Tcp(TcpLink),
    /// WebSocket reads here; a writer task owns the sink.
    Ws {
        stream: SplitStream<WsStream>,
        limits: Limits,
    },
}

impl Reader {
    /// The next frame; `None` when the client closed. Cancel-safe. A TCP
    /// reader also writes `conn`'s queued pushes meanwhile.
    async fn next(
        &mut self,
        conn: Option<&Conn>,
        metrics: &Metrics,
    ) -> Result<Option<Frame>, Error> {
        match self {
            Reader::Tcp(link) => link.next(conn, metrics).await,
            Reader::Ws { stream, limits } => loop {
                let next = tokio::select! {
                    next = stream.next() => next,
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
                return Frame::from_message(msg, *limits)
                    .map(Some)
                    .map_err(Error::Frame);
            },
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

/// An upgrade request refused before any WebSocket exists: the HTTP status
/// it is answered with and the metric's `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// The head outgrew [`MAX_UPGRADE_HEAD`].
    HeadTooLarge,
    /// More than [`MAX_UPGRADE_HEADERS`] headers.
    TooManyHeaders,
    /// Not parseable as an HTTP/1.x request.
    Malformed,
    /// Not `GET /sub` without a query (§4.2).
    Path,
    /// A valid request, but not a WebSocket upgrade.
    NotWebSocket,
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Refusal::HeadTooLarge => "head_too_large",
            Refusal::TooManyHeaders => "too_many_headers",
            Refusal::Malformed => "malformed",
            Refusal::Path => "path",
            Refusal::NotWebSocket => "not_websocket",
        }
    }

    fn status_line(self) -> &'static str {
        match self {
            Refusal::HeadTooLarge | Refusal::TooManyHeaders => {
                "HTTP/1.1 431 Request Header Fields Too Large"
            }
            Refusal::Malformed | Refusal::Path | Refusal::NotWebSocket => {
                "HTTP/1.1 400 Bad Request"
            }
        }
    }
}

/// The parsed head as an `http` request, for tungstenite's response builder.
fn to_request(parsed: &httparse::Request<'_, '_>) -> Result<Request, Refusal> {
    let (Some(method), Some(path), Some(version)) = (parsed.method, parsed.path, parsed.version)
    else {
        return Err(Refusal::Malformed);
    };
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .version(if version == 0 {
            http::Version::HTTP_10
        } else {
            http::Version::HTTP_11
        });
    for header in parsed.headers.iter() {
        builder = builder.header(header.name, header.value);
    }
    builder.body(()).map_err(|_| Refusal::Malformed)
}

/// Checks the parsed upgrade request (§4.2): `GET /sub`, no query.
fn check_path(req: &Request) -> Result<(), Refusal> {
    if req.uri().path() != "/sub" || req.uri().query().is_some() {
        return Err(Refusal::Path);
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

/// A connection just accepted. Boxed: the session task keeps its arguments
/// for its whole life, and these are only needed until authentication.
struct Accepted {
    stream: TcpStream,
    peer: SocketAddr,
    listen: Listen,
}

/// One client connection, from accept to `Disconnect`; holds its slot of
/// the connection limit throughout.
async fn session(accepted: Box<Accepted>, _permit: OwnedSemaphorePermit, shared: Arc<Shared>) {
    let transport = accepted.listen.transport();
    // Boxed, like every logic call and the ending below: an async fn's
    // future is as large as everything live at its largest await, and the
    // task keeps that size for the whole connection. Unboxed, the handshake
    // (a tonic call) made every idle session ~4.6 KB.
    let Session {
        mut reader,
        conn,
        mut room,
        writer,
        idle,
    } = match Box::pin(authenticate(accepted, &shared)).await {
        Ok(Some(session)) => session,
        Ok(None) => return,
        Err(err) => {
            debug!(cause = %err, "session ended");
            return;
        }
    };
    let result = serve(&mut reader, &conn, &mut room, &shared, idle).await;
    shared.metrics.connection_closed(
        transport,
        match &result {
            Ok(()) => "client",
            Err(Error::Closed(reason)) => reason,
            Err(Error::Frame(herald_protocol::frame::Error::ShortPackLen(_))) => "short_pack_len",
            Err(Error::Frame(_)) => "invalid_frame",
            Err(_) => "io",
        },
    );
    if let Err(err) = result {
        debug!(cause = %err, "session ended");
    }

    shared.buckets.remove(&conn, room.as_deref());
    conn.finish();
    Box::pin(end(reader, writer, &conn, &shared)).await;
}

/// What an authenticated session keeps: only this lives as long as the
/// connection.
struct Session {
    reader: Reader,
    conn: Arc<Conn>,
    room: Option<String>,
    writer: Option<tokio::task::JoinHandle<()>>,
    idle: Duration,
}

/// Handshake under its deadline, then the connection registered and op 8
/// queued. `None` when the client or the comet went away first.
async fn authenticate(
    accepted: Box<Accepted>,
    shared: &Arc<Shared>,
) -> Result<Option<Session>, Error> {
    let Accepted {
        stream,
        peer,
        listen,
    } = *accepted;
    let transport = listen.transport();
    let deadline = Instant::now() + shared.config.handshake_timeout;
    let handshake = tokio::select! {
        () = shared.shutdown.cancelled() => return Ok(None),
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
    let Some(Handshake {
        reader,
        sink,
        auth,
        reply,
        redirect,
    }) = handshake?
    else {
        return Ok(None);
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
    let writer = sink.map(|sink| {
        let shared = shared.clone();
        let latency = shared.clone();
        let written = move |n| shared.metrics.frames_out(transport, n);
        let push_written = move |elapsed| latency.metrics.push_written(elapsed);
        tokio::spawn(write_loop(conn.clone(), sink, written, push_written).in_current_span())
    });
    shared.metrics.connection_opened(transport);
    // Op 8 goes out before the connection is findable, so it precedes any
    // push. The auth frame is dropped here: its body shares the handshake's
    // read buffer, which would otherwise stay allocated for the session.
    let _ = conn.send(auth.reply(op::AUTH_REPLY, Bytes::new()).to_bytes());
    drop(auth);
    let room = (!reply.room_id.is_empty()).then_some(reply.room_id);
    if let Some(old) = shared.buckets.put(&conn, room.as_deref()) {
        old.close(CloseReason::Replaced);
    }
    if shared.draining.load(Ordering::SeqCst) {
        conn.close(CloseReason::Drain);
    }
    // Shutdown closes what the buckets hold once it starts; one registered
    // just after that closes itself here.
    if shared.shutdown.is_cancelled() {
        conn.close(CloseReason::Shutdown);
    }
    let idle = u64::try_from(reply.heartbeat)
        .ok()
        .filter(|&ns| ns > 0)
        .map_or(DEFAULT_IDLE, Duration::from_nanos);
    conn.touch(idle);
    Ok(Some(Session {
        reader,
        conn,
        room,
        writer,
        idle,
    }))
}

/// After the session: what is still queued (an op-18 redirect, say) is
/// written, within [`WRITER_GRACE`], while logic forgets the route.
async fn end(
    mut reader: Reader,
    writer: Option<tokio::task::JoinHandle<()>>,
    conn: &Conn,
    shared: &Shared,
) {
    // A client that does not read would pin a write forever.
    let slow = conn.close_reason() == Some(CloseReason::SlowConsumer);
    let flush = async {
        if let Some(writer) = writer {
            let abort = writer.abort_handle();
            if slow || tokio::time::timeout(WRITER_GRACE, writer).await.is_err() {
                abort.abort();
            }
        } else if let (Reader::Tcp(link), false) = (&mut reader, slow) {
            let _ = tokio::time::timeout(WRITER_GRACE, link.flush(conn, &shared.metrics)).await;
        }
    };
    let forget = async {
        let server = &shared.config.server_id;
        shared.logic.disconnect(conn.mid, &conn.key, server).await;
        // Logic keys routes by key and server, so the Disconnect of a
        // connection replaced by a same-key successor on this comet just
        // deleted the successor's route (goim defect, §13.3). A session
        // refresh recreates it.
        if let Some(successor) = shared.buckets.get(&conn.key).filter(|c| c.id != conn.id) {
            shared
                .logic
                .heartbeat(successor.mid, &successor.key, server)
                .await;
        }
    };
    tokio::join!(flush, forget);
}

struct Handshake {
    reader: Reader,
    /// The WebSocket's write half; TCP writes from the reader.
    sink: Option<WsSink>,
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
    let limits = Limits {
        strict: shared.config.strict_pack_len,
        ..Limits::INBOUND
    };
    let (mut reader, sink) = match listen {
        Listen::Tcp => (Reader::Tcp(TcpLink::new(stream, limits)), None),
        Listen::Ws => upgrade(Box::new(stream), &mut cookie, limits, shared).await?,
        Listen::Wss(acceptor) => {
            let tls = acceptor.accept(stream).await.map_err(Error::Tls)?;
            upgrade(Box::new(tls), &mut cookie, limits, shared).await?
        }
    };
    let auth = loop {
        let Some(frame) = reader.next(None, &shared.metrics).await? else {
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
///
/// The request head is read here, into a buffer bounded by
/// [`MAX_UPGRADE_HEAD`] and parsed with at most [`MAX_UPGRADE_HEADERS`]
/// headers, so an oversized or malformed request gets an HTTP error answer
/// (and a count) instead of tungstenite's silent drop; tungstenite then
/// builds the 101 answer and runs the WebSocket over the same stream.
async fn upgrade(
    mut stream: Box<dyn Io>,
    cookie: &mut String,
    limits: Limits,
    shared: &Shared,
) -> Result<(Reader, Option<WsSink>), Error> {
    let mut buf = BytesMut::with_capacity(1024);
    let parsed = loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_UPGRADE_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => break to_request(&parsed).map(|req| (len, req)),
            Ok(httparse::Status::Partial) if buf.len() >= MAX_UPGRADE_HEAD => {
                break Err(Refusal::HeadTooLarge);
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => break Err(Refusal::TooManyHeaders),
            Err(_) => break Err(Refusal::Malformed),
        }
        let space = (MAX_UPGRADE_HEAD - buf.len()) as u64;
        let read = (&mut stream)
            .take(space)
            .read_buf(&mut buf)
            .await
            .map_err(Error::UpgradeIo)?;
        if read == 0 {
            return Err(Error::UpgradeIo(std::io::ErrorKind::UnexpectedEof.into()));
        }
    };
    let answer = parsed.and_then(|(len, req)| {
        check_path(&req)?;
        let resp = create_response(&req).map_err(|_| Refusal::NotWebSocket)?;
        Ok((len, req, resp))
    });
    let (len, req, resp) = match answer {
        Ok(answer) => answer,
        Err(refusal) => {
            shared.metrics.upgrade_refused(refusal.reason());
            let answer = format!(
                "{}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                refusal.status_line()
            );
            // Best effort: the client may already be gone.
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
            linger(&mut stream).await;
            return Err(Error::UpgradeRefused(refusal.reason()));
        }
    };
    if let Some(value) = req
        .headers()
        .get(http::header::COOKIE)
        .and_then(|v| v.to_str().ok())
    {
        value.clone_into(cookie);
    }
    let mut head = Vec::with_capacity(256);
    write_response(&mut head, &resp).map_err(Error::Upgrade)?;
    stream.write_all(&head).await.map_err(Error::UpgradeIo)?;
    stream.flush().await.map_err(Error::UpgradeIo)?;
    // tungstenite reserves a 128 KiB read buffer per connection by default:
    // the benchmark measured ~141 KB of RSS per idle WebSocket client. Client
    // messages are small (heartbeats, auth; at most MAX_WS_MESSAGE), so a
    // 4 KiB buffer costs at most a second read for the largest of them.
    let config = WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER)
        .max_message_size(Some(MAX_WS_MESSAGE))
        .max_frame_size(Some(MAX_WS_MESSAGE));
    // Bytes the client sent after the head already belong to the WebSocket.
    let early = buf.split_off(len).to_vec();
    let ws = WebSocketStream::from_partially_read(stream, early, Role::Server, Some(config)).await;
    let (write, read) = ws.split();
    Ok((
        Reader::Ws {
            stream: read,
            limits,
        },
        Some(write),
    ))
}

/// Reads and discards what the client still sends, briefly, before the
/// socket closes: closing with unread input makes the kernel send a reset,
/// which can destroy the error answer before the client reads it.
async fn linger(stream: &mut Box<dyn Io>) {
    const LINGER: Duration = Duration::from_millis(500);
    const LINGER_BYTES: u64 = 64 * 1024;
    let mut sink = tokio::io::sink();
    let _ = tokio::time::timeout(
        LINGER,
        tokio::io::copy(&mut stream.take(LINGER_BYTES), &mut sink),
    )
    .await;
}

/// The authenticated phase: answer frames until something ends the session.
async fn serve(
    reader: &mut Reader,
    conn: &Arc<Conn>,
    room: &mut Option<String>,
    shared: &Arc<Shared>,
    idle: Duration,
) -> Result<(), Error> {
    // goim draws the refresh interval per connection; jitter spreads the
    // refreshes of connections that arrived together.
    let refresh_every = shared
        .config
        .session_refresh
        .mul_f64(rand::rng().random_range(0.75..1.25));
    let mut last_refresh = Instant::now();
    // Most clients never send such ops: the bucket exists once one does.
    let mut receive_limit: Option<Box<ReceiveLimit>> = None;
    loop {
        // The reader also ends the session when the server closes `conn`
        // (slow consumer, replaced, drain, idle sweep, shutdown); no timer
        // or cancellation future per connection.
        let Some(frame) = reader.next(Some(conn), &shared.metrics).await? else {
            return Ok(());
        };
        shared.metrics.frame_in(conn.transport);
        let reply = match frame.op {
            op::HEARTBEAT => {
                conn.touch(idle);
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
                if let Ok(list) = op::parse_list(&frame.body) {
                    conn.accept(&list);
                }
                frame.reply(op::SUB_REPLY, frame.body.clone())
            }
            op::UNSUB => {
                if let Ok(list) = op::parse_list(&frame.body) {
                    conn.unaccept(&list);
                }
                frame.reply(op::UNSUB_REPLY, frame.body.clone())
            }
            other => {
                let limit = receive_limit
                    .get_or_insert_with(|| Box::new(ReceiveLimit::new(&shared.config)));
                match limit.check(Instant::now()) {
                    Verdict::Forward => shared.metrics.receive("forwarded"),
                    Verdict::Drop => {
                        // Dropped without a reply: the reply is goim's
                        // acknowledgement that logic got the op.
                        shared.metrics.receive("rate_limited");
                        continue;
                    }
                    Verdict::Close => {
                        shared.metrics.receive("rate_limited");
                        return Err(Error::Closed("receive_flood"));
                    }
                }
                let reply = frame.reply(other, Bytes::new());
                Box::pin(shared.logic.receive(conn.mid, frame.into())).await;
                reply
            }
        };
        conn.send(reply.to_bytes())
            .map_err(|closed| Error::Closed(closed.0.as_str()))?;
    }
}

/// What to do with one op bound for logic `Receive`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Forward,
    Drop,
    /// Dropped, and the connection has flooded long enough to be closed.
    Close,
}

/// Per-connection token bucket for ops forwarded to logic `Receive`.
///
/// Logic's `Receive` is where upstream messages cost the cluster (goim
/// forwards every op, unlimited); a client may burst up to `burst` ops,
/// then `rate` per second. Ops over the limit are dropped, and a client that
/// keeps flooding — `flood_close` drops within [`FLOOD_WINDOW`] — is closed:
/// a well-behaved client never gets there, and a flooding one would
/// otherwise hold a connection slot and a reader busy forever.
#[derive(Debug)]
struct ReceiveLimit {
    /// Refill per second; 0 disables the limit.
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    flood_close: u32,
    window_start: Instant,
    window_drops: u32,
}

impl ReceiveLimit {
    fn new(config: &crate::Config) -> ReceiveLimit {
        let now = Instant::now();
        let burst = f64::from(config.receive_burst.max(1));
        ReceiveLimit {
            rate: f64::from(config.receive_rate),
            burst,
            tokens: burst,
            last: now,
            flood_close: config.receive_flood_close,
            window_start: now,
            window_drops: 0,
        }
    }

    fn check(&mut self, now: Instant) -> Verdict {
        if self.rate <= 0.0 {
            return Verdict::Forward;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Forward;
        }
        if now.saturating_duration_since(self.window_start) >= FLOOD_WINDOW {
            self.window_start = now;
            self.window_drops = 0;
        }
        self.window_drops += 1;
        if self.flood_close > 0 && self.window_drops >= self.flood_close {
            Verdict::Close
        } else {
            Verdict::Drop
        }
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

    fn limit(rate: u32, burst: u32, flood_close: u32) -> ReceiveLimit {
        let mut config = crate::Config::new("c", "l");
        config.receive_rate = rate;
        config.receive_burst = burst;
        config.receive_flood_close = flood_close;
        ReceiveLimit::new(&config)
    }

    #[test]
    fn receive_limit_bursts_then_refills_at_its_rate() {
        let mut l = limit(10, 3, 0);
        let t0 = l.last;
        let verdicts: Vec<_> = (0..5).map(|_| l.check(t0)).collect();
        assert_eq!(
            verdicts,
            [
                Verdict::Forward,
                Verdict::Forward,
                Verdict::Forward,
                Verdict::Drop,
                Verdict::Drop
            ]
        );
        // 10/s: one token per 100 ms, never more than the burst.
        assert_eq!(l.check(t0 + Duration::from_millis(150)), Verdict::Forward);
        assert_eq!(l.check(t0 + Duration::from_millis(160)), Verdict::Drop);
        let later = t0 + Duration::from_secs(60);
        let forwarded = (0..10)
            .filter(|_| l.check(later) == Verdict::Forward)
            .count();
        assert_eq!(forwarded, 3);
    }

    #[test]
    fn receive_limit_closes_a_sustained_flood_only() {
        let mut l = limit(1, 1, 3);
        let t0 = l.last;
        assert_eq!(l.check(t0), Verdict::Forward);
        assert_eq!(l.check(t0), Verdict::Drop);
        assert_eq!(l.check(t0), Verdict::Drop);
        // A new window forgets earlier drops.
        let t1 = t0 + FLOOD_WINDOW + Duration::from_millis(1);
        assert_eq!(l.check(t1), Verdict::Forward);
        assert_eq!(l.check(t1), Verdict::Drop);
        assert_eq!(l.check(t1), Verdict::Drop);
        assert_eq!(l.check(t1), Verdict::Close);
        let mut unlimited = limit(0, 1, 1);
        assert!((0..100).all(|_| unlimited.check(t0) == Verdict::Forward));
    }

    #[test]
    fn redirect_flag_is_read_leniently() {
        assert!(wants_redirect(br#"{"mid":1,"herald":{"redirect":true}}"#));
        assert!(!wants_redirect(br#"{"mid":1,"herald":{"redirect":"yes"}}"#));
        assert!(!wants_redirect(br#"{"mid":1}"#));
        assert!(!wants_redirect(b"not json"));
    }
}
