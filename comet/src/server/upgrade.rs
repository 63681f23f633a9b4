//! The WebSocket upgrade on `/sub` (§4.2), under limits of its own: the
//! request head is read and checked here, answered with an HTTP error when
//! refused, and the WebSocket is then built over the same stream.

use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use herald_protocol::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{Request, create_response, write_response};
use tokio_tungstenite::tungstenite::http;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::Error;
use crate::Shared;
use crate::websocket::{Io, WsReader, WsSink};

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

/// The WebSocket upgrade on `/sub`, with goim's message size limits.
///
/// The request head is read here, into a buffer bounded by
/// [`MAX_UPGRADE_HEAD`] and parsed with at most [`MAX_UPGRADE_HEADERS`]
/// headers, so an oversized or malformed request gets an HTTP error answer
/// (and a count) instead of tungstenite's silent drop; tungstenite then
/// builds the 101 answer and runs the WebSocket over the same stream.
pub(super) async fn upgrade(
    mut stream: Box<dyn Io>,
    cookie: &mut String,
    limits: Limits,
    shared: &Shared,
) -> Result<(WsReader, WsSink), Error> {
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
    Ok((WsReader::new(read, limits), write))
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
