//! One connection to a comet and everything a client does on it.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use herald_protocol::frame::FrameCodec;
use herald_protocol::redirect::Redirect;
use herald_protocol::ws::{self, Frames};
use herald_protocol::{Frame, Limits, op};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::codec::Framed;

use crate::error::{Error, Result};

/// A byte stream a client can run over: a `TcpStream`, a TLS stream, an
/// in-memory duplex, ...
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

type BoxIo = Box<dyn Io>;

/// How a [`Client`] talks to its comet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Raw TCP: a stream of frames (§4.1).
    Tcp,
    /// WebSocket: one frame per binary message, pushes in op-9 batches (§4.2).
    WebSocket,
}

/// A push from the comet: a business op and the bytes handed to logic's
/// push API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    /// The push's op (1000, say).
    pub op: i32,
    /// The push body.
    pub body: Bytes,
    /// Whether it came inside an op-9 batch: always on WebSocket (§4.2),
    /// never from a Herald comet on TCP (§4.1).
    pub batched: bool,
}

/// What [`Client::next_event`] hands out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A push.
    Push(Push),
    /// Op 18: the comet is draining and closes this connection next; the
    /// client should reconnect elsewhere (§15.2).
    Redirect(Redirect),
}

enum Conn {
    Tcp(Framed<BoxIo, FrameCodec>),
    Ws(Box<WebSocketStream<BoxIo>>),
}

/// A goim client connection. See the [crate documentation](crate).
pub struct Client {
    conn: Conn,
    limits: Limits,
    timeout: Option<Duration>,
    /// The last `seq` sent; requests count up from 1.
    seq: i32,
    /// Messages read while waiting for a reply, oldest first.
    queued: VecDeque<Frame>,
    /// The rest of the op-9 batch [`Client::next_frame`] is handing out.
    batch: Option<Frames>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("transport", &self.transport())
            .field("timeout", &self.timeout)
            .field("seq", &self.seq)
            .field("queued", &self.queued.len())
            .finish_non_exhaustive()
    }
}

/// Runs `fut`, bounded by `timeout` when there is one.
async fn bounded<T>(timeout: Option<Duration>, fut: impl Future<Output = Result<T>>) -> Result<T> {
    match timeout {
        None => fut.await,
        Some(limit) => tokio::time::timeout(limit, fut)
            .await
            .map_err(|_| Error::Timeout(limit))?,
    }
}

impl Client {
    fn new(conn: Conn) -> Client {
        Client {
            conn,
            // Server output is not bounded by the inbound 4112 bytes (§2).
            limits: Limits::OUTBOUND,
            timeout: None,
            seq: 0,
            queued: VecDeque::new(),
            batch: None,
        }
    }

    /// Connects over raw TCP (§4.1), with Nagle's algorithm off.
    ///
    /// # Errors
    /// [`Error::Io`] when the connection fails.
    pub async fn connect_tcp(addr: impl ToSocketAddrs) -> Result<Client> {
        let stream = TcpStream::connect(addr).await.map_err(Error::Io)?;
        stream.set_nodelay(true).map_err(Error::Io)?;
        Ok(Client::tcp_over(stream))
    }

    /// A raw TCP client over a stream already connected (TLS, for example).
    pub fn tcp_over(stream: impl Io) -> Client {
        let codec = FrameCodec {
            limits: Limits::OUTBOUND,
        };
        Client::new(Conn::Tcp(Framed::new(Box::new(stream), codec)))
    }

    /// Connects to a `ws://` URL (Herald and goim serve `/sub`) and upgrades
    /// (§4.2). `request` may also be a prepared request with headers, such as
    /// a `Cookie` (comet hands it to logic).
    ///
    /// # Errors
    /// [`Error::Url`] for a URL without a host or with `wss` (connect the
    /// TLS stream yourself and use [`Client::ws_over`]); [`Error::Io`] when
    /// the connection fails; [`Error::WebSocket`] when the upgrade does.
    pub async fn connect_ws(request: impl IntoClientRequest) -> Result<Client> {
        let request = request.into_client_request()?;
        let uri = request.uri();
        if uri.scheme_str() != Some("ws") {
            return Err(Error::Url(uri.to_string()));
        }
        let host = uri
            .host()
            .ok_or_else(|| Error::Url(uri.to_string()))?
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(80);
        let stream = TcpStream::connect((host, port)).await.map_err(Error::Io)?;
        stream.set_nodelay(true).map_err(Error::Io)?;
        Client::ws_over(stream, request).await
    }

    /// Upgrades a stream already connected (a TLS stream for `wss`, for
    /// example) to a WebSocket client.
    ///
    /// # Errors
    /// [`Error::WebSocket`] when the upgrade fails.
    pub async fn ws_over(stream: impl Io, request: impl IntoClientRequest) -> Result<Client> {
        let request = request.into_client_request()?;
        let stream: BoxIo = Box::new(stream);
        let (ws, _response) = tokio_tungstenite::client_async(request, stream).await?;
        Ok(Client::new(Conn::Ws(Box::new(ws))))
    }

    /// TCP or WebSocket.
    pub fn transport(&self) -> Transport {
        match self.conn {
            Conn::Tcp(_) => Transport::Tcp,
            Conn::Ws(_) => Transport::WebSocket,
        }
    }

    /// Bounds every later call (each send, each wait for a frame, each
    /// request with its reply) by `timeout`; `None` waits for ever.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// [`Client::set_timeout`], for chaining after a connect.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = Some(timeout);
        self
    }

    /// The bound set by [`Client::set_timeout`].
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    // ------------------------------------------------------------- writing

    /// Sends one frame as it is.
    ///
    /// # Errors
    /// [`Error::Closed`] or [`Error::Io`] when the write fails.
    pub async fn send(&mut self, frame: Frame) -> Result<()> {
        let conn = &mut self.conn;
        bounded(self.timeout, async move {
            match conn {
                Conn::Tcp(framed) => framed.send(frame).await?,
                Conn::Ws(ws) => ws.send(Message::Binary(frame.to_bytes())).await?,
            }
            Ok(())
        })
        .await
    }

    /// Sends bytes as they are: on TCP into the stream, on WebSocket as one
    /// binary message. For testing what a comet does with broken frames.
    ///
    /// # Errors
    /// As [`Client::send`].
    pub async fn send_raw(&mut self, bytes: impl Into<Bytes>) -> Result<()> {
        let bytes = bytes.into();
        let conn = &mut self.conn;
        bounded(self.timeout, async move {
            match conn {
                Conn::Tcp(framed) => {
                    // `send` flushes, so nothing waits in the codec's buffer.
                    framed.get_mut().write_all(&bytes).await?;
                    framed.get_mut().flush().await?;
                }
                Conn::Ws(ws) => ws.send(Message::Binary(bytes)).await?,
            }
            Ok(())
        })
        .await
    }

    fn next_seq(&mut self) -> i32 {
        self.seq = self.seq.checked_add(1).unwrap_or(1);
        self.seq
    }

    /// Sends `op` with `body` (ver 1, the next `seq`) and waits for the
    /// frame of `reply_op` with the same `seq`. Anything that arrives first
    /// is kept for the readers.
    ///
    /// # Errors
    /// [`Error::Closed`] when the connection ends first; as [`Client::send`].
    pub async fn request(
        &mut self,
        op: i32,
        body: impl Into<Bytes>,
        reply_op: i32,
    ) -> Result<Frame> {
        let seq = self.next_seq();
        let request = Frame {
            ver: 1,
            op,
            seq,
            body: body.into(),
        };
        bounded(self.timeout, async {
            self.send(request).await?;
            loop {
                let message = self.read_wire().await?;
                if message.op == reply_op && message.seq == seq {
                    return Ok(message);
                }
                self.queued.push_back(message);
            }
        })
        .await
    }

    /// Authenticates (op 7 with `token`, §5.1) and waits for op 8, which it
    /// returns (empty body, `ver` and `seq` echoed).
    ///
    /// `token` is the op-7 body: a [`crate::Token`] (`&token`), or any JSON
    /// (a `String`, ...).
    ///
    /// # Errors
    /// [`Error::AuthRefused`] when the comet closes the connection instead:
    /// logic refused the token.
    pub async fn auth(&mut self, token: impl Into<Bytes>) -> Result<Frame> {
        match self.request(op::AUTH, token, op::AUTH_REPLY).await {
            Err(Error::Closed) => Err(Error::AuthRefused),
            other => other,
        }
    }

    /// Sends a heartbeat (op 2) and returns the online count of the
    /// client's room from the reply (op 3, §5.4); 0 outside a room.
    ///
    /// # Errors
    /// As [`Client::request`]; [`Error::Unexpected`] when the reply body is
    /// not 4 bytes.
    pub async fn heartbeat(&mut self) -> Result<i32> {
        let reply = self
            .request(op::HEARTBEAT, Bytes::new(), op::HEARTBEAT_REPLY)
            .await?;
        match <[u8; 4]>::try_from(&reply.body[..]) {
            Ok(count) => Ok(i32::from_be_bytes(count)),
            Err(_) => Err(Error::unexpected(
                "heartbeat reply body (not 4 bytes)",
                reply,
            )),
        }
    }

    /// Moves to `room` (op 12; empty = leave the current room) and waits for
    /// the echo (op 13). The comet echoes even when the move failed (§5.2).
    ///
    /// # Errors
    /// As [`Client::request`]; [`Error::Unexpected`] when the reply does not
    /// echo the room.
    pub async fn change_room(&mut self, room: &str) -> Result<()> {
        let body = Bytes::copy_from_slice(room.as_bytes());
        self.echoed(op::CHANGE_ROOM, body, op::CHANGE_ROOM_REPLY)
            .await
    }

    /// Adds `ops` to the ops this connection accepts (op 14 → 15).
    ///
    /// # Errors
    /// As [`Client::change_room`].
    pub async fn subscribe(&mut self, ops: &[i32]) -> Result<()> {
        self.echoed(op::SUB, op_list(ops), op::SUB_REPLY).await
    }

    /// Removes `ops` from the ops this connection accepts (op 16 → 17).
    ///
    /// # Errors
    /// As [`Client::change_room`].
    pub async fn unsubscribe(&mut self, ops: &[i32]) -> Result<()> {
        self.echoed(op::UNSUB, op_list(ops), op::UNSUB_REPLY).await
    }

    async fn echoed(&mut self, op: i32, body: Bytes, reply_op: i32) -> Result<()> {
        let reply = self.request(op, body.clone(), reply_op).await?;
        if reply.body == body {
            Ok(())
        } else {
            Err(Error::unexpected(
                "reply that does not echo its request",
                reply,
            ))
        }
    }

    /// Closes the connection: a WebSocket close message, or the TCP write
    /// side shut down.
    ///
    /// # Errors
    /// [`Error::Io`] when the close cannot be written.
    pub async fn close(mut self) -> Result<()> {
        let result = match &mut self.conn {
            Conn::Tcp(framed) => SinkExt::<Frame>::close(framed).await.map_err(Error::from),
            Conn::Ws(ws) => WebSocketStream::close(ws, None).await.map_err(Error::from),
        };
        match result {
            Err(Error::Closed) => Ok(()),
            other => other,
        }
    }

    // ------------------------------------------------------------- reading

    /// Reads one message off the wire, ignoring `queued`.
    async fn read_wire(&mut self) -> Result<Frame> {
        let limits = self.limits;
        match &mut self.conn {
            Conn::Tcp(framed) => match framed.next().await {
                Some(frame) => Ok(frame?),
                None => Err(Error::Closed),
            },
            Conn::Ws(ws) => loop {
                match ws.next().await.ok_or(Error::Closed)?? {
                    Message::Binary(data) => return Ok(Frame::from_message(data, limits)?),
                    Message::Close(_) => return Err(Error::Closed),
                    Message::Text(_) => return Err(Error::TextMessage),
                    // Pings are answered by the WebSocket layer.
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                }
            },
        }
    }

    /// The next frame as it came off the wire: on WebSocket one message,
    /// with an op-9 batch left closed; on TCP one frame. Frames of a batch
    /// that [`Client::next_frame`] has begun to open stay for it.
    ///
    /// # Errors
    /// [`Error::Closed`] at the end of the connection, [`Error::Timeout`],
    /// [`Error::Frame`] for a frame that breaks §2.
    pub async fn next_message(&mut self) -> Result<Frame> {
        if let Some(message) = self.queued.pop_front() {
            return Ok(message);
        }
        bounded(self.timeout, self.read_wire()).await
    }

    async fn next_opened(&mut self) -> Result<(Frame, bool)> {
        loop {
            if let Some(batch) = &mut self.batch {
                match batch.next() {
                    Some(frame) => return Ok((frame?, true)),
                    None => self.batch = None,
                }
            }
            let message = match self.queued.pop_front() {
                Some(message) => message,
                None => self.read_wire().await?,
            };
            if message.op != op::RAW {
                return Ok((message, false));
            }
            if message.ver != 1 || message.seq != 0 {
                return Err(Error::unexpected("op-9 header (not ver 1, seq 0)", message));
            }
            self.batch = Some(ws::frames(message.body, self.limits));
        }
    }

    /// The next frame, with op-9 batches opened: every frame the comet
    /// sent, replies included, in order.
    ///
    /// # Errors
    /// As [`Client::next_message`]; [`Error::Unexpected`] for an op-9
    /// header other than `{ver 1, seq 0}` (§4.2).
    pub async fn next_frame(&mut self) -> Result<Frame> {
        let (frame, _) = bounded(self.timeout, self.next_opened()).await?;
        Ok(frame)
    }

    /// The next push or redirect. Replies nobody waits for (ops 3, 8, 13,
    /// 15, 17 outside a batch) are skipped. Every other frame is a push,
    /// including the empty echo of an upstream op sent with
    /// [`Client::send`] (use [`Client::request`] to consume it).
    ///
    /// # Errors
    /// As [`Client::next_frame`]; [`Error::Unexpected`] for an op-18 body
    /// that is not §15.2's JSON.
    pub async fn next_event(&mut self) -> Result<Event> {
        bounded(self.timeout, async {
            loop {
                let (frame, batched) = self.next_opened().await?;
                if !batched {
                    match frame.op {
                        op::HEARTBEAT_REPLY
                        | op::AUTH_REPLY
                        | op::CHANGE_ROOM_REPLY
                        | op::SUB_REPLY
                        | op::UNSUB_REPLY => continue,
                        op::REDIRECT => {
                            return match Redirect::parse(&frame.body) {
                                Ok(redirect) => Ok(Event::Redirect(redirect)),
                                Err(_) => Err(Error::unexpected("op-18 body", frame)),
                            };
                        }
                        _ => {}
                    }
                }
                return Ok(Event::Push(Push {
                    op: frame.op,
                    body: frame.body,
                    batched,
                }));
            }
        })
        .await
    }

    /// The next push, as [`Client::next_event`] but for pushes only.
    ///
    /// # Errors
    /// [`Error::Redirected`] when op 18 comes instead; otherwise as
    /// [`Client::next_event`].
    pub async fn next_push(&mut self) -> Result<Push> {
        match self.next_event().await? {
            Event::Push(push) => Ok(push),
            Event::Redirect(redirect) => Err(Error::Redirected(redirect)),
        }
    }
}

/// An op-14/16 body: decimal ops joined by `,` (§3).
fn op_list(ops: &[i32]) -> Bytes {
    let list: Vec<String> = ops.iter().map(i32::to_string).collect();
    Bytes::from(list.join(","))
}
