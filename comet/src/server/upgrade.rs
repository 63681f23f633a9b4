//! The WebSocket upgrade on `/sub` (§4.2), under limits of its own: the
//! request head is read here and checked by
//! [`herald_protocol::upgrade::parse_head`], answered with an HTTP error when
//! refused, and the WebSocket is then built over the same stream.

use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use herald_protocol::Limits;
use herald_protocol::upgrade::{MAX_UPGRADE_HEAD, Upgrade, parse_head};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::write_response;
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

/// The WebSocket upgrade on `/sub`, with goim's message size limits.
///
/// The request head is read here, into a buffer bounded by
/// [`MAX_UPGRADE_HEAD`] and parsed with at most
/// [`MAX_UPGRADE_HEADERS`](herald_protocol::upgrade::MAX_UPGRADE_HEADERS)
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
    let answer = loop {
        match parse_head(&buf) {
            Ok(Some(upgrade)) => break Ok(upgrade),
            Ok(None) => {}
            Err(refusal) => break Err(refusal),
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
    let Upgrade {
        len,
        request: req,
        response: resp,
    } = match answer {
        Ok(upgrade) => upgrade,
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
