//! A raw-TCP client connection, read and written by its session task alone.
//!
//! An idle connection is most of what a comet holds, so this keeps one
//! cheap: no writer task (WebSocket connections have one, see
//! [`crate::websocket::run_writer`]) and no buffer while idle. The session
//! waits for the socket's readiness, not inside a read, so the read buffer
//! exists only while a frame is incomplete or being decoded.
//!
//! The writer is [`TcpWriter`]: while the session waits for the next frame
//! ([`TcpLink::next`]), it also polls [`TcpWriter::poll_write`], which takes
//! the connection's [`Outbound`](crate::conn) queue in one batch when a push
//! or reply woke it ([`Conn::push`] → the queue → this writer) and writes it
//! with as few `write` calls as the socket allows.

use std::collections::VecDeque;
use std::io;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use herald_protocol::{Frame, Limits};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::conn::{CloseReason, Conn, Queued};
use crate::metrics::Metrics;
use crate::server::{Error, Transport};

/// How much a read asks for. Client frames are small (a heartbeat is 16
/// bytes, the largest accepted frame 4112); a burst of them fits.
const READ_CHUNK: usize = 4096;

/// A batch taken from the outbound queue and not yet fully written.
#[derive(Debug)]
struct Pending {
    buf: Bytes,
    written: usize,
    frames: usize,
    /// Queueing times of the pushes in the batch, for push-to-write latency.
    pushed: Vec<Instant>,
    /// The socket did not take it all at once: the connection was marked
    /// blocked ([`Conn::set_blocked`]) until the rest is written.
    blocked: bool,
}

impl Pending {
    fn new(batch: VecDeque<Queued>) -> Pending {
        let frames = batch.len();
        // Empty for reply-only batches, so nothing is allocated then.
        let pushed = batch.iter().filter_map(|q| q.pushed_at).collect();
        let buf = if frames == 1 {
            batch
                .into_iter()
                .next()
                .map(|q| q.bytes)
                .unwrap_or_default()
        } else {
            let total = batch.iter().map(|q| q.bytes.len()).sum();
            let mut buf = BytesMut::with_capacity(total);
            for item in &batch {
                buf.extend_from_slice(&item.bytes);
            }
            buf.freeze()
        };
        Pending {
            buf,
            written: 0,
            frames,
            pushed,
            blocked: false,
        }
    }
}

/// One client's socket, its partial inbound frame and its writer.
#[derive(Debug)]
pub(crate) struct TcpLink {
    stream: TcpStream,
    /// Bytes read and not yet decoded; unallocated between frames.
    buf: BytesMut,
    limits: Limits,
    /// Writes the connection's queue to `stream`, polled by [`TcpLink::next`].
    writer: TcpWriter,
}

/// The writer of a TCP connection: drains its outbound queue into the
/// socket. Not a task of its own: the session task polls it while it waits
/// for the next frame ([`TcpLink::next`]), and after the session
/// ([`TcpLink::flush`]).
#[derive(Debug, Default)]
struct TcpWriter {
    /// Boxed: rarely there, and the session future would carry it always.
    pending: Option<Box<Pending>>,
    /// The outbound queue said it is finished: nothing more to write.
    queue_done: bool,
}

impl TcpLink {
    pub(crate) fn new(stream: TcpStream, limits: Limits) -> TcpLink {
        TcpLink {
            stream,
            buf: BytesMut::new(),
            limits,
            writer: TcpWriter::default(),
        }
    }

    /// The next frame; `None` when the client closed. Meanwhile, once `conn`
    /// is given (after authentication), writes what its queue holds
    /// ([`TcpWriter::poll_write`]), and ends with [`Error::Closed`] as soon
    /// as the server closes `conn`: what is still queued is then left to
    /// [`TcpLink::flush`]. Cancel-safe: a partial frame stays buffered and a
    /// taken batch stays pending.
    pub(crate) async fn next(
        &mut self,
        conn: Option<&Conn>,
        metrics: &Metrics,
    ) -> Result<Option<Frame>, Error> {
        // A poll function, not a select over futures: the session keeps no
        // waiter futures while it waits, only the socket's and the queue's
        // waker registrations.
        std::future::poll_fn(|cx| self.poll_next(cx, conn, metrics)).await
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        conn: Option<&Conn>,
        metrics: &Metrics,
    ) -> Poll<Result<Option<Frame>, Error>> {
        loop {
            if let Some(conn) = conn {
                // Registered before the look, and even while a write waits
                // for the socket: closing a connection wakes it this way,
                // and a push wakes the writer polled below.
                conn.register_writer(cx);
                if let Some(reason) = conn.close_reason() {
                    return Poll::Ready(Err(Error::Closed(reason.as_str())));
                }
            }
            match Frame::decode(&mut self.buf, self.limits) {
                Ok(Some(frame)) => return Poll::Ready(Ok(Some(frame))),
                Ok(None) => {}
                Err(err) => return Poll::Ready(Err(Error::Frame(err))),
            }
            if self.buf.is_empty() && self.buf.capacity() > 0 {
                // Between frames: give the memory back while the client is quiet.
                self.buf = BytesMut::new();
            }
            if let Some(conn) = conn {
                match self.writer.poll_write(&self.stream, cx, conn, metrics) {
                    // Written, or the socket filled up (readiness now
                    // cleared, so the next poll registers for it).
                    Poll::Ready(Ok(())) => continue,
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                    // Nothing to write, or the socket is not writable yet.
                    Poll::Pending => {}
                }
            }
            match self.stream.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => {
                    self.buf.reserve(READ_CHUNK);
                    match self.stream.try_read_buf(&mut self.buf) {
                        Ok(0) => return Poll::Ready(Ok(None)),
                        // Decoded at the top; a would-block cleared readiness.
                        Ok(_) => {}
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                        Err(err) => return Poll::Ready(Err(Error::Read(err))),
                    }
                }
                Poll::Ready(Err(err)) => return Poll::Ready(Err(Error::Read(err))),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Writes everything still queued or pending (the session ended), then
    /// shuts the write side down so the client sees the end of the stream.
    pub(crate) async fn flush(&mut self, conn: &Conn, metrics: &Metrics) -> Result<(), Error> {
        self.writer.flush(&mut self.stream, conn, metrics).await
    }
}

impl TcpWriter {
    /// Writes `conn`'s queue to `stream`: takes everything queued as one
    /// batch when none is pending, and writes as much of it as the socket
    /// takes now. Ready when it wrote or the socket filled up (look again);
    /// pending when there is nothing to write or the socket is not writable,
    /// with the task registered for either (the caller registered it with
    /// [`Conn::register_writer`] before looking).
    fn poll_write(
        &mut self,
        stream: &TcpStream,
        cx: &mut Context<'_>,
        conn: &Conn,
        metrics: &Metrics,
    ) -> Poll<Result<(), Error>> {
        if self.pending.is_none() && !self.queue_done {
            // Registered by the caller, before this look.
            match conn.take_batch() {
                Poll::Ready(Some(batch)) => self.pending = Some(Box::new(Pending::new(batch))),
                Poll::Ready(None) => self.queue_done = true,
                Poll::Pending => {}
            }
        }
        if self.pending.is_none() {
            return Poll::Pending;
        }
        match stream.poll_write_ready(cx) {
            Poll::Ready(Ok(())) => {
                let was_blocked = self.pending.as_ref().is_some_and(|p| p.blocked);
                // Most batches fit the socket buffer: written now.
                self.write_pending(stream, metrics)?;
                // Tell pushes whether a full queue is the client's doing
                // (see `Refused::Behind`); only on changes.
                match &mut self.pending {
                    Some(pending) if !pending.blocked => {
                        pending.blocked = true;
                        conn.set_blocked(true);
                    }
                    None if was_blocked => conn.set_blocked(false),
                    _ => {}
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(write_failed(err))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// [`TcpLink::flush`]: everything still queued or pending, written.
    async fn flush(
        &mut self,
        stream: &mut TcpStream,
        conn: &Conn,
        metrics: &Metrics,
    ) -> Result<(), Error> {
        loop {
            if self.pending.is_none() && !self.queue_done {
                match conn.next_batch().await {
                    Some(batch) => self.pending = Some(Box::new(Pending::new(batch))),
                    None => self.queue_done = true,
                }
            }
            if self.pending.is_some() {
                stream.writable().await.map_err(write_failed)?;
                self.write_pending(stream, metrics)?;
            } else if self.queue_done {
                break;
            }
        }
        let _ = stream.shutdown().await;
        Ok(())
    }

    /// Writes as much of the pending batch as the socket takes now.
    fn write_pending(&mut self, stream: &TcpStream, metrics: &Metrics) -> Result<(), Error> {
        let Some(pending) = &mut self.pending else {
            return Ok(());
        };
        while pending.written < pending.buf.len() {
            match stream.try_write(&pending.buf[pending.written..]) {
                Ok(0) => return Err(write_failed(io::ErrorKind::WriteZero.into())),
                Ok(n) => pending.written += n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(err) => return Err(write_failed(err)),
            }
        }
        metrics.frames_out(Transport::Tcp, pending.frames);
        let done = Instant::now();
        for at in &pending.pushed {
            metrics.push_written(done.saturating_duration_since(*at));
        }
        self.pending = None;
        Ok(())
    }
}

fn write_failed(err: io::Error) -> Error {
    tracing::debug!(cause = %err, "write failed");
    Error::Closed(CloseReason::WriteFailed.as_str())
}
