//! The client side of comet (§4–5): what happens to a client connection,
//! in order.
//!
//! - [`accept`]: the accept loops of the TCP, WebSocket and WSS listeners,
//!   with the connection limit and a back-off while accepts fail; one
//!   session task per connection.
//! - [`upgrade`]: WebSocket connections only (after TLS for WSS): the HTTP
//!   upgrade on `/sub`, its size limits and error answers.
//! - [`session`]: the handshake with logic (op 7 → `Connect` → op 8), then
//!   the authenticated session: heartbeats, op lists, room changes and
//!   upstream ops ([`receive_limit`]) until it ends, then `Disconnect`.
//!
//! The session reads frames from the client and its queue is written back
//! through [`crate::tcp`] (read and written by the session task) or
//! [`crate::websocket`] (read by the session, written by a writer task).

use tokio_tungstenite::tungstenite;

mod accept;
mod receive_limit;
mod session;
mod upgrade;

pub(crate) use accept::{Listen, accept, accept_loop};

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
    /// Logic's `Connect` reply breaks a per-connection limit (room id
    /// length or accepted ops; a goim logic does not check them).
    #[error("Connect reply refused: {0}")]
    Limit(&'static str),
    /// The server closed the connection.
    #[error("closed by server: {0}")]
    Closed(&'static str),
}
