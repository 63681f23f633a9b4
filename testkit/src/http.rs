//! A bare HTTP/1.1 client: one request per connection (`Connection:
//! close`), the whole answer read. Enough for logic's push API and the
//! `/metrics` `/healthz` `/readyz` endpoints, with no HTTP stack to build.

use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};

/// Bound on one whole request.
const WAIT: Duration = Duration::from_secs(30);

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The status line and headers.
    pub head: String,
    /// The body (chunked transfer decoded), lossily as text.
    pub body: String,
}

impl Response {
    /// Fails unless the status is 200.
    ///
    /// # Errors
    /// Any other status, with the whole answer.
    pub fn ok(self) -> anyhow::Result<Response> {
        anyhow::ensure!(self.status == 200, "{}\n\n{}", self.head, self.body);
        Ok(self)
    }
}

/// `GET path`.
///
/// # Errors
/// Connecting, writing or reading fails, the answer is not HTTP, or it
/// takes over 30 s.
pub async fn get(addr: impl ToSocketAddrs, path: &str) -> anyhow::Result<Response> {
    request(addr, "GET", path, &[]).await
}

/// `POST path` with `body`.
///
/// # Errors
/// As [`get`].
pub async fn post(addr: impl ToSocketAddrs, path: &str, body: &[u8]) -> anyhow::Result<Response> {
    request(addr, "POST", path, body).await
}

/// `method path` with `body`.
///
/// # Errors
/// As [`get`].
pub async fn request(
    addr: impl ToSocketAddrs,
    method: &str,
    path: &str,
    body: &[u8],
) -> anyhow::Result<Response> {
    request_with(addr, method, path, &[], body).await
}

/// `method path` with more header lines (`name`, `value`: an
/// `Authorization`, say) and `body`.
///
/// # Errors
/// As [`get`].
pub async fn request_with(
    addr: impl ToSocketAddrs,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<Response> {
    let answer = tokio::time::timeout(WAIT, async {
        let mut stream = TcpStream::connect(addr).await?;
        let extra: String = headers
            .iter()
            .map(|(name, value)| format!("{name}: {value}\r\n"))
            .collect();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Content-Length: {}\r\n\
             Connection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        anyhow::Ok(answer)
    })
    .await
    .with_context(|| format!("{method} {path} took over {WAIT:?}"))?
    .with_context(|| format!("{method} {path}"))?;
    parse(&answer).with_context(|| format!("{method} {path}"))
}

fn parse(answer: &[u8]) -> anyhow::Result<Response> {
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers in the answer")?;
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    let raw = &answer[split + 4..];
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    let chunked = head.lines().any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with("transfer-encoding:") && line.contains("chunked")
    });
    let body = if chunked { dechunk(raw)? } else { raw.to_vec() };
    Ok(Response {
        status,
        head,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut raw: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let end = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunk size line")?;
        let size = std::str::from_utf8(&raw[..end])?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)?;
        raw = &raw[end + 2..];
        if size == 0 {
            return Ok(body);
        }
        body.extend_from_slice(raw.get(..size).context("short chunk")?);
        raw = raw.get(size + 2..).context("chunk end")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_plain_and_chunked_answers() {
        let plain = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").expect("plain");
        assert_eq!((plain.status, plain.body.as_str()), (200, "ok"));
        let chunked = parse(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .expect("chunked");
        assert_eq!((chunked.status, chunked.body.as_str()), (404, "abcde"));
        assert!(chunked.ok().is_err());
    }
}
