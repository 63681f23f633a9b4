//! One client connection's session, from the handshake to `Disconnect`.
//!
//! A session runs in two phases. The handshake — WebSocket upgrade, waiting
//! for op 7, logic `Connect` — runs under one deadline; frames other than op 7
//! are discarded meanwhile. After op 8 the connection is registered in the
//! buckets and the session answers client frames until the idle timeout, the
//! client, the server (replacement, slow consumer, drain) or shutdown ends it.
//! Every authenticated session calls logic `Disconnect` exactly once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use herald_protocol::{Frame, Limits, limits, op};
use rand::Rng;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, timeout_at};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tracing::{Instrument, debug};

use super::Error;
use super::accept::{Accepted, Listen};
use super::receive_limit::{ReceiveLimit, Verdict};
use super::upgrade::upgrade;
use crate::Shared;
use crate::conn::{CloseReason, Conn, Identity};
use crate::metrics::Metrics;
use crate::tcp::TcpLink;
use crate::websocket::{WsReader, WsSink, close_frame, run_writer, send_close};

/// How long a finished session lets its writer flush (e.g. an op-18 redirect).
const WRITER_GRACE: Duration = Duration::from_secs(2);
/// Idle timeout when logic returns a non-positive heartbeat (it must not).
const DEFAULT_IDLE: Duration = Duration::from_secs(480);

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The session's end of the client socket: frames are read here, under
/// the inbound limits.
enum Link {
    /// TCP: the session task reads, and its link also runs the connection's
    /// writer ([`crate::tcp::TcpWriter`]) while it waits for a frame.
    Tcp(TcpLink),
    /// WebSocket: the read half; the write half belongs to the writer task
    /// ([`run_writer`]).
    Ws(WsReader),
}

impl Link {
    /// The next frame; `None` when the client closed. Cancel-safe. A TCP
    /// link also writes `conn`'s queued pushes meanwhile.
    async fn next(
        &mut self,
        conn: Option<&Conn>,
        metrics: &Metrics,
    ) -> Result<Option<Frame>, Error> {
        match self {
            Link::Tcp(tcp) => tcp.next(conn, metrics).await,
            Link::Ws(reader) => reader.next(conn).await,
        }
    }
}

/// Whether a JSON token asks for op-18 redirects (`"herald":{"redirect":true}`),
/// for a goim logic that does not answer `herald_redirect`. Lenient like
/// goim's token parsing: anything unexpected means "no".
fn wants_redirect(token: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(token)
        .ok()
        .and_then(|v| v.get("herald")?.get("redirect")?.as_bool())
        .unwrap_or(false)
}

/// One client connection, from accept to `Disconnect`; holds its slot of
/// the connection limit throughout.
pub(super) async fn run(
    accepted: Box<Accepted>,
    _permit: OwnedSemaphorePermit,
    shared: Arc<Shared>,
) {
    let transport = accepted.listen.transport();
    // Boxed, like every logic call and the ending below: an async fn's
    // future is as large as everything live at its largest await, and the
    // task keeps that size for the whole connection. Unboxed, the handshake
    // (a tonic call) made every idle session ~4.6 KB.
    let Session {
        mut link,
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
    let result = serve(&mut link, &conn, &mut room, &shared, idle).await;
    shared
        .metrics
        .connection_closed(transport, close_reason(&result));
    let close = match result {
        Err(err) => {
            debug!(cause = %err, "session ended");
            close_frame(&err)
        }
        Ok(()) => None,
    };

    shared.buckets.remove(&conn, room.as_deref());
    conn.finish();
    Box::pin(end(link, writer, close, &conn, &shared)).await;
}

/// What an authenticated session keeps: only this lives as long as the
/// connection.
struct Session {
    link: Link,
    conn: Arc<Conn>,
    room: Option<String>,
    writer: Option<tokio::task::JoinHandle<Option<WsSink>>>,
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
        link,
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
        tokio::spawn(run_writer(conn.clone(), sink, written, push_written).in_current_span())
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
    if shared.shutdown.is_triggered() {
        conn.close(CloseReason::Shutdown);
    }
    let idle = u64::try_from(reply.heartbeat)
        .ok()
        .filter(|&ns| ns > 0)
        .map_or(DEFAULT_IDLE, Duration::from_nanos);
    conn.touch(idle);
    Ok(Some(Session {
        link,
        conn,
        room,
        writer,
        idle,
    }))
}

/// After the session: what is still queued (an op-18 redirect, say) is
/// written, within [`WRITER_GRACE`], then a WebSocket gets its `close`
/// frame, while logic forgets the route.
async fn end(
    mut link: Link,
    writer: Option<tokio::task::JoinHandle<Option<WsSink>>>,
    close: Option<CloseFrame>,
    conn: &Conn,
    shared: &Shared,
) {
    // A client that does not read would pin a write forever.
    let slow = conn.close_reason() == Some(CloseReason::SlowConsumer);
    let flush = async {
        if let Some(writer) = writer {
            let abort = writer.abort_handle();
            if slow {
                abort.abort();
            } else {
                match tokio::time::timeout(WRITER_GRACE, writer).await {
                    Ok(Ok(Some(mut sink))) => send_close(&mut sink, close, WRITER_GRACE).await,
                    Ok(_) => {}
                    Err(_) => abort.abort(),
                }
            }
        } else if let (Link::Tcp(tcp), false) = (&mut link, slow) {
            let _ = tokio::time::timeout(WRITER_GRACE, tcp.flush(conn, &shared.metrics)).await;
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
    link: Link,
    /// The WebSocket's write half, for its writer task; a TCP link is its
    /// own writer.
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
    let (mut link, mut sink): (Link, Option<WsSink>) = match listen {
        Listen::Tcp => (Link::Tcp(TcpLink::new(stream, limits)), None),
        Listen::Ws => {
            let (reader, sink) = upgrade(Box::new(stream), &mut cookie, limits, shared).await?;
            (Link::Ws(reader), Some(sink))
        }
        Listen::Wss(acceptor) => {
            let tls = acceptor.accept(stream).await.map_err(Error::Tls)?;
            let (reader, sink) = upgrade(Box::new(tls), &mut cookie, limits, shared).await?;
            (Link::Ws(reader), Some(sink))
        }
    };
    let auth = loop {
        let frame = match link.next(None, &shared.metrics).await {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(None),
            Err(err) => {
                if let Some(sink) = sink.as_mut() {
                    send_close(sink, close_frame(&err), WRITER_GRACE).await;
                }
                return Err(err);
            }
        };
        if frame.op == op::AUTH {
            break frame;
        }
        // Anything before op 7 is dropped without reply (§5.1).
    };
    let reply = shared
        .logic
        .connect(&shared.config.server_id, cookie, auth.body.clone())
        .await
        .map_err(Error::Auth)?;
    if let Some(reason) = over_limits(&reply) {
        shared.metrics.refused(reason);
        // Logic wrote the route already: take it back.
        let server = &shared.config.server_id;
        shared.logic.disconnect(reply.mid, &reply.key, server).await;
        return Err(Error::Limit(reason));
    }
    // Herald's logic answers from the verified token, whatever its mode (a
    // JWT is no JSON to read here); goim's logic never sets the field, so
    // the token's own JSON still counts.
    let redirect = reply.herald_redirect || wants_redirect(&auth.body);
    Ok(Some(Handshake {
        link,
        sink,
        auth,
        reply,
        redirect,
    }))
}

/// Which per-connection limit a `Connect` reply breaks, as the refusal's
/// metric reason. Herald's logic refuses such tokens itself.
fn over_limits(reply: &herald_protocol::pb::ConnectReply) -> Option<&'static str> {
    if !limits::room_fits(&reply.room_id) {
        return Some("room_id_too_long");
    }
    let mut distinct = reply.accepts.clone();
    distinct.sort_unstable();
    distinct.dedup();
    (distinct.len() > limits::MAX_ACCEPTED_OPS).then_some("accepted_ops_limit")
}

/// The authenticated phase: answer frames until something ends the session.
async fn serve(
    link: &mut Link,
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
        // The link also ends the session when the server closes `conn`
        // (slow consumer, replaced, drain, idle sweep, shutdown); no timer
        // or cancellation future per connection.
        let Some(frame) = link.next(Some(conn), &shared.metrics).await? else {
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
                // and the body is echoed anyway (§5.2). A room past the
                // length limit fails the same way, counted: the HTTP API
                // refuses to push to it too.
                match std::str::from_utf8(&frame.body) {
                    Ok(to) if !limits::room_fits(to) => shared.metrics.refused("room_id_too_long"),
                    Ok(to) => {
                        let to = (!to.is_empty()).then(|| to.to_owned());
                        shared
                            .buckets
                            .change_room(conn, room.as_deref(), to.as_deref());
                        *room = to;
                    }
                    Err(_) => {}
                }
                frame.reply(op::CHANGE_ROOM_REPLY, frame.body.clone())
            }
            op::SUB => {
                // Over the limit the set is left as it was, like a list that
                // does not parse, and the body is echoed all the same.
                if let Ok(list) = op::parse_list(&frame.body)
                    && !conn.accept(&list)
                {
                    shared.metrics.refused("accepted_ops_limit");
                }
                frame.reply(op::SUB_REPLY, frame.body.clone())
            }
            op::UNSUB => {
                if let Ok(list) = op::parse_list(&frame.body) {
                    conn.unaccept(&list);
                }
                frame.reply(op::UNSUB_REPLY, frame.body.clone())
            }
            reserved if op::is_reserved(reserved) => {
                // goim's sentinels and Herald's extension ops are never
                // answered: an echo would put them on the wire, to a client
                // that may not have asked for extensions. Nor does logic
                // get them; what they will mean (op 20, resume) is the
                // comet's to handle.
                shared.metrics.refused("client_reserved_op");
                continue;
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

/// The `reason` an ended session is counted under. A WebSocket client
/// that drops its socket without a close frame left as a TCP client that
/// closes does (`client`); a malformed or oversized WebSocket frame is an
/// invalid frame like a malformed goim frame, not an I/O failure.
fn close_reason(result: &Result<(), Error>) -> &'static str {
    use herald_protocol::frame::Error as FrameError;
    use tokio_tungstenite::tungstenite::Error as WsError;
    use tokio_tungstenite::tungstenite::error::ProtocolError;
    match result {
        Ok(()) => "client",
        Err(Error::Closed(reason)) => reason,
        Err(Error::Frame(FrameError::ShortPackLen(_))) => "short_pack_len",
        Err(Error::Frame(_)) => "invalid_frame",
        Err(Error::WsRead(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake))) => {
            "client"
        }
        Err(Error::WsRead(WsError::Capacity(_) | WsError::Protocol(_))) => "invalid_frame",
        Err(_) => "io",
    }
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
