//! The WebSocket upgrade request head on `/sub` (§4.2), checked under
//! limits of its own before any WebSocket exists.
//!
//! Comet reads the head into a buffer of at most [`MAX_UPGRADE_HEAD`] bytes
//! and calls [`parse_head`] after every read; this module is the pure half
//! of that (no socket), kept here so it is fuzzed (`protocol/fuzz`, target
//! `upgrade`) without building the comet.

use tungstenite::handshake::server::{Request, Response, create_response};
use tungstenite::http;

/// Largest WebSocket upgrade request head (request line and headers).
/// tungstenite's own limit is 64 KiB and not configurable; browsers send
/// well under 2 KiB, and every byte here is held per pending connection.
pub const MAX_UPGRADE_HEAD: usize = 8 * 1024;

/// Most headers in the upgrade request. tungstenite allows 124 and drops the
/// connection without an answer past that; comet answers 431.
pub const MAX_UPGRADE_HEADERS: usize = 64;

/// An upgrade request refused before any WebSocket exists: the HTTP status
/// it is answered with and the metric's `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
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
    /// The `reason` label of comet's refusal counter.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::HeadTooLarge => "head_too_large",
            Refusal::TooManyHeaders => "too_many_headers",
            Refusal::Malformed => "malformed",
            Refusal::Path => "path",
            Refusal::NotWebSocket => "not_websocket",
        }
    }

    /// The status line of the HTTP answer.
    pub fn status_line(self) -> &'static str {
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

/// A whole head that asks for the WebSocket on `/sub`.
#[derive(Debug)]
pub struct Upgrade {
    /// Bytes of the head; what follows in the buffer already belongs to the
    /// WebSocket.
    pub len: usize,
    /// The request, for its headers (the cookie).
    pub request: Request,
    /// The 101 answer tungstenite built for it.
    pub response: Response,
}

/// Reads the head at the start of `buf` (everything read so far).
///
/// `Ok(None)`: not whole yet and `buf` is under [`MAX_UPGRADE_HEAD`], so
/// read more (at most `MAX_UPGRADE_HEAD - buf.len()` bytes) and call again.
///
/// # Errors
/// The [`Refusal`] to answer with; a head that is not whole within
/// [`MAX_UPGRADE_HEAD`] bytes is always [`Refusal::HeadTooLarge`].
pub fn parse_head(buf: &[u8]) -> Result<Option<Upgrade>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_UPGRADE_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_UPGRADE_HEAD => {
            return Err(Refusal::HeadTooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::TooManyHeaders),
        Err(_) => return Err(Refusal::Malformed),
    };
    let request = to_request(&parsed)?;
    check_path(&request)?;
    let response = create_response(&request).map_err(|_| Refusal::NotWebSocket)?;
    Ok(Some(Upgrade {
        len,
        request,
        response,
    }))
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

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &[u8] = b"GET /sub HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\n\r\nearly";

    #[test]
    fn a_whole_upgrade_is_answered_and_early_bytes_are_left() {
        let up = parse_head(GOOD).unwrap().unwrap();
        assert_eq!(&GOOD[up.len..], b"early");
        assert_eq!(up.response.status(), http::StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(
            up.response.headers()["Sec-WebSocket-Accept"],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        // Every proper prefix of the head asks for more.
        let head = GOOD.len() - b"early".len();
        for cut in 0..head {
            assert!(parse_head(&GOOD[..cut]).unwrap().is_none(), "{cut}");
        }
    }

    #[test]
    fn refusals() {
        let refused = |head: &[u8]| parse_head(head).unwrap_err();
        assert_eq!(refused(b"GET /sub?x=1 HTTP/1.1\r\n\r\n"), Refusal::Path);
        assert_eq!(refused(b"GET /other HTTP/1.1\r\n\r\n"), Refusal::Path);
        assert_eq!(refused(b"GET /sub HTTP/1.1\r\n\r\n"), Refusal::NotWebSocket);
        assert_eq!(refused(b"\x00\x01 nonsense\r\n\r\n"), Refusal::Malformed);
        let many: Vec<u8> = [&b"GET /sub HTTP/1.1\r\n"[..]]
            .into_iter()
            .chain(std::iter::repeat_n(
                &b"A: b\r\n"[..],
                MAX_UPGRADE_HEADERS + 1,
            ))
            .flatten()
            .copied()
            .collect();
        assert_eq!(refused(&many), Refusal::TooManyHeaders);
        let mut long = b"GET /sub HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_UPGRADE_HEAD, b'a');
        assert_eq!(refused(&long), Refusal::HeadTooLarge);
        assert!(parse_head(&long[..MAX_UPGRADE_HEAD - 1]).unwrap().is_none());
    }
}
