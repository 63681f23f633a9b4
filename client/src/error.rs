//! What can go wrong on a client connection.

use std::time::Duration;

use herald_protocol::Frame;
use herald_protocol::redirect::Redirect;
use tokio_tungstenite::tungstenite;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The comet closed (or reset) the connection.
    #[error("the comet closed the connection")]
    Closed,
    /// The comet closed the connection instead of answering op 7 with op 8:
    /// logic refused the token (§5.1), or the handshake deadline passed.
    #[error("authentication refused: the comet closed the connection instead of answering op 8")]
    AuthRefused,
    /// A wait bounded by [`crate::Client::set_timeout`] ran out. The client
    /// is still usable: nothing that arrived later is lost.
    #[error("nothing arrived within {0:?}")]
    Timeout(Duration),
    /// The comet sent op 18 (§15.2): it is draining and about to close this
    /// connection. Returned by [`crate::Client::next_push`] only;
    /// [`crate::Client::next_event`] hands the redirect out as an event.
    #[error("redirected: the comet is draining ({0:?})")]
    Redirected(Redirect),
    /// The comet sent a frame that breaks §2 (or this client's size limit).
    #[error("bad frame from the comet: {0}")]
    Frame(#[from] herald_protocol::frame::Error),
    /// A frame of the right kind with the wrong content: an op-9 batch header
    /// other than `{ver 1, seq 0}`, a heartbeat reply that is not 4 bytes, a
    /// reply that does not echo its request, an op-18 body that is not JSON.
    #[error("unexpected {what}: {frame:?}")]
    Unexpected {
        /// What was wrong.
        what: &'static str,
        /// The frame as received.
        frame: Box<Frame>,
    },
    /// A WebSocket text message: comets send binary messages only (§4.2).
    #[error("the comet sent a WebSocket text message")]
    TextMessage,
    /// The WebSocket URL cannot be connected to by [`crate::Client::connect_ws`]:
    /// no host, or `wss` (use [`crate::Client::ws_over`] with a TLS stream).
    #[error("cannot connect to {0}")]
    Url(String),
    /// The WebSocket layer failed (the upgrade was refused, for example).
    #[error("websocket: {0}")]
    WebSocket(Box<tungstenite::Error>),
    /// Reading or writing the socket failed.
    #[error("i/o: {0}")]
    Io(std::io::Error),
}

impl Error {
    pub(crate) fn unexpected(what: &'static str, frame: Frame) -> Error {
        Error::Unexpected {
            what,
            frame: Box::new(frame),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(err: std::io::Error) -> Error {
        use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
        match err.kind() {
            ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof => Error::Closed,
            _ => Error::Io(err),
        }
    }
}

impl From<tungstenite::Error> for Error {
    fn from(err: tungstenite::Error) -> Error {
        use tungstenite::error::ProtocolError::ResetWithoutClosingHandshake;
        match err {
            tungstenite::Error::ConnectionClosed
            | tungstenite::Error::AlreadyClosed
            | tungstenite::Error::Protocol(ResetWithoutClosingHandshake) => Error::Closed,
            tungstenite::Error::Io(err) => err.into(),
            other => Error::WebSocket(Box::new(other)),
        }
    }
}

impl From<herald_protocol::frame::CodecError> for Error {
    fn from(err: herald_protocol::frame::CodecError) -> Error {
        match err {
            herald_protocol::frame::CodecError::Frame(err) => Error::Frame(err),
            herald_protocol::frame::CodecError::Io(err) => err.into(),
        }
    }
}
