//! One connection's shared handle and its outbound queue.
//!
//! Everything that sends to a client — the session's replies, pushes from
//! gRPC, drain redirects — appends an already-encoded buffer to the
//! connection's [`Outbound`] queue. The queue is bounded in *bytes*, not
//! messages: a 1 MiB room batch and a 16-byte heartbeat reply are not the same
//! burden. A push that would overflow it closes the connection as a slow
//! consumer instead of blocking the pusher, so one stuck client cannot hold up
//! a room broadcast.
//!
//! Queueing wakes the connection's writer ([`Outbound::wake_writer`]), which
//! takes everything queued at once and writes it with one call (TCP: the
//! buffers concatenated, by the session task itself, see
//! [`crate::tcp::TcpWriter`]; WebSocket: every message fed, then one flush,
//! by a writer task, see [`crate::websocket::run_writer`]), so a burst of
//! pushes costs one syscall rather than one each.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::task::AtomicWaker;
use herald_protocol::limits;
use tokio::sync::Notify;

use crate::server::Transport;

/// Why a connection was closed by the server side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The outbound queue overflowed.
    SlowConsumer,
    /// A newer connection with the same key authenticated.
    Replaced,
    /// The comet is draining.
    Drain,
    /// The session already ended (the client left).
    Ended,
    /// No heartbeat within the idle timeout.
    Idle,
    /// The comet is shutting down (what a drain left, or no drain).
    Shutdown,
    /// Writing to the socket failed.
    WriteFailed,
}

impl CloseReason {
    /// A short label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Replaced => "replaced",
            CloseReason::Drain => "drain",
            CloseReason::Ended => "ended",
            CloseReason::Idle => "idle",
            CloseReason::Shutdown => "shutdown",
            CloseReason::WriteFailed => "write_failed",
        }
    }
}

/// A push could not be queued: the connection is being closed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("connection closed: {}", .0.as_str())]
pub struct Closed(pub CloseReason);

/// Why a push was not queued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    /// The connection is being closed.
    #[error(transparent)]
    Closed(#[from] Closed),
    /// The queue is full, but its writer is not waiting on the client's
    /// socket: comet itself is behind (its core is saturated), not the
    /// client. Nothing was queued and the connection stays; [`QUEUE_SPACE`] is
    /// notified once the writer takes the queue.
    #[error("queue full while the client keeps up")]
    Behind,
}

/// Notified whenever a writer takes a queue that a refused push
/// ([`Refused::Behind`]) waits on. One for the process: waiters look again
/// at their own connection, so a wake-up meant for another costs one look.
pub static QUEUE_SPACE: Notify = Notify::const_new();

/// One queued message; pushes remember when they were queued so the writer
/// can report push-to-write latency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// The encoded message.
    pub bytes: Bytes,
    /// When a push RPC queued it; `None` for session replies.
    pub pushed_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct QueueState {
    items: VecDeque<Queued>,
    bytes: usize,
    /// The writer writes what is queued, then stops; nothing more is accepted.
    finishing: bool,
    /// Why the server closed the connection, if it did.
    reason: Option<CloseReason>,
    /// The writer holds a batch the client's socket has not taken yet: the
    /// client is behind, so a full queue makes it a slow consumer.
    blocked: bool,
    /// A refused push waits for this queue to be taken.
    awaited: bool,
}

/// The byte-bounded outbound queue.
#[derive(Debug)]
pub struct Outbound {
    // A std Mutex: held only to push or swap a VecDeque, never across an await.
    state: Mutex<QueueState>,
    /// Wakes the writer: the writer task (WebSocket) or the session (TCP).
    /// One waiter, so a waker slot: no waiter future to keep per connection.
    writer: AtomicWaker,
    /// Wakes a WebSocket session's reader when the server closes it; a TCP
    /// session learns it through `writer`.
    closing: Notify,
    limit: usize,
}

impl Outbound {
    fn new(limit: usize) -> Outbound {
        Outbound {
            state: Mutex::new(QueueState::default()),
            writer: AtomicWaker::new(),
            closing: Notify::new(),
            limit,
        }
    }

    /// Wakes the connection's writer, which then takes the queue and writes
    /// it: for TCP the session task, in [`TcpWriter::poll_write`]; for a
    /// WebSocket the writer task, [`run_writer`].
    ///
    /// [`TcpWriter::poll_write`]: crate::tcp::TcpWriter::poll_write
    /// [`run_writer`]: crate::websocket::run_writer
    fn wake_writer(&self) {
        self.writer.wake();
    }

    /// Wakes everyone who waits for this connection: its writer (TCP
    /// session or WebSocket writer task) and a WebSocket session's reader.
    fn wake_all(&self) {
        self.closing.notify_waiters();
        self.wake_writer();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // A panic while holding this lock leaves a consistent VecDeque; keep going.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Wakes the pushes waiting for queue space ([`Refused::Behind`]) when one waited
/// on this queue: it was taken, or the connection is closing, and either
/// way the waiting push should look again rather than sit out its deadline.
fn wake_waiting_pushes(awaited: bool) {
    if awaited {
        QUEUE_SPACE.notify_waiters();
    }
}

/// Who a connection is, as settled by authentication.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Unique per comet process.
    pub id: u64,
    /// The key logic assigned.
    pub key: String,
    /// The user id logic assigned.
    pub mid: i64,
    /// TCP or WebSocket.
    pub transport: Transport,
    /// The client's address.
    pub ip: IpAddr,
    /// The token asked for Herald's op-18 redirect.
    pub redirect: bool,
}

/// The shared handle of one authenticated connection.
#[derive(Debug)]
pub struct Conn {
    /// Unique per comet process; tells a replaced connection from its successor.
    pub id: u64,
    /// The key logic assigned.
    pub key: String,
    /// The user id logic assigned (0 = anonymous).
    pub mid: i64,
    /// TCP or WebSocket: decides how pushes are framed.
    pub transport: Transport,
    /// The client's address.
    pub ip: IpAddr,
    /// The token asked for Herald's op-18 redirect.
    pub redirect: bool,
    /// A few ops at most: a scan beats hashing, and costs less memory.
    accepts: Mutex<Vec<i32>>,
    out: Outbound,
    /// When the idle sweep closes it, in [`coarse_ms`]; moved on by heartbeats.
    idle_deadline: AtomicU64,
}

/// Milliseconds since the first call: a cheap monotonic clock for idle
/// deadlines, which one sweep checks for every connection instead of one
/// timer per connection.
pub fn coarse_ms() -> u64 {
    static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);
    u64::try_from(EPOCH.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl Conn {
    /// A new handle for an authenticated client, with an empty queue of
    /// `queue_bytes` and `accepts` as its accepted ops.
    pub fn new(identity: Identity, accepts: &[i32], queue_bytes: usize) -> Conn {
        let Identity {
            id,
            key,
            mid,
            transport,
            ip,
            redirect,
        } = identity;
        let conn = Conn {
            id,
            key,
            mid,
            transport,
            ip,
            redirect,
            accepts: Mutex::new(Vec::with_capacity(accepts.len())),
            out: Outbound::new(queue_bytes),
            idle_deadline: AtomicU64::new(u64::MAX),
        };
        // The session checked the Connect reply's list against the limit.
        conn.accept(accepts);
        conn
    }

    /// Whether a key/mid/broadcast push of `op` should reach this connection.
    pub fn accepts(&self, op: i32) -> bool {
        self.accepts_lock().contains(&op)
    }

    /// Adds `ops` to the accepted set, all or none: `false`, and nothing
    /// added, when the set would hold more than
    /// [`limits::MAX_ACCEPTED_OPS`] ops (one connection could otherwise
    /// grow it by megabytes, and every push scans it).
    pub fn accept(&self, ops: &[i32]) -> bool {
        let mut set = self.accepts_lock();
        let before = set.len();
        for op in ops {
            if !set.contains(op) {
                if set.len() == limits::MAX_ACCEPTED_OPS {
                    set.truncate(before);
                    return false;
                }
                set.push(*op);
            }
        }
        true
    }

    /// Removes `ops` from the accepted set.
    pub fn unaccept(&self, ops: &[i32]) {
        self.accepts_lock().retain(|op| !ops.contains(op));
    }

    fn accepts_lock(&self) -> std::sync::MutexGuard<'_, Vec<i32>> {
        self.accepts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues one encoded message (a TCP byte run or one WebSocket message).
    ///
    /// # Errors
    /// [`Closed`] when the connection is closing, or when this message would
    /// overflow the queue — the connection is then closed as a slow consumer.
    pub fn send(&self, msg: Bytes) -> Result<(), Closed> {
        self.enqueue(msg, None).map_err(|refused| match refused {
            Refused::Closed(closed) => closed,
            Refused::Behind => Closed(CloseReason::SlowConsumer),
        })?;
        self.out.wake_writer();
        Ok(())
    }

    /// Queues `msg`; with `pushed_at` (a push, not a session reply) a full
    /// queue whose writer is not blocked on the socket is refused as
    /// [`Refused::Behind`] instead of closing the connection. The caller
    /// wakes the writer once it is queued.
    fn enqueue(&self, msg: Bytes, pushed_at: Option<Instant>) -> Result<(), Refused> {
        let mut state = self.out.lock();
        if let Some(reason) = state.reason {
            return Err(Closed(reason).into());
        }
        if state.finishing {
            return Err(Closed(CloseReason::Ended).into());
        }
        if state.bytes + msg.len() > self.out.limit {
            // A message larger than the whole queue never fits: slow as well.
            if pushed_at.is_some() && !state.blocked && state.bytes > 0 {
                state.awaited = true;
                return Err(Refused::Behind);
            }
            state.items.clear();
            state.bytes = 0;
            state.reason = Some(CloseReason::SlowConsumer);
            let awaited = std::mem::take(&mut state.awaited);
            drop(state);
            self.out.wake_all();
            wake_waiting_pushes(awaited);
            return Err(Closed(CloseReason::SlowConsumer).into());
        }
        state.bytes += msg.len();
        state.items.push_back(Queued {
            bytes: msg,
            pushed_at,
        });
        Ok(())
    }

    /// Queues a push given in both encodings, picking this connection's one;
    /// its queueing time starts the push-to-write latency measurement.
    ///
    /// The way to the socket: [`Conn::enqueue`] appends it to the queue,
    /// then [`Outbound::wake_writer`] wakes the connection's writer, which
    /// takes the queue and writes it ([`TcpWriter::poll_write`] in the TCP
    /// session task, or the WebSocket writer task [`run_writer`]).
    ///
    /// # Errors
    /// [`Refused::Closed`] as [`Conn::send`], except that a full queue whose
    /// client keeps up is [`Refused::Behind`] and leaves the connection open.
    ///
    /// [`TcpWriter::poll_write`]: crate::tcp::TcpWriter::poll_write
    /// [`run_writer`]: crate::websocket::run_writer
    pub fn push(&self, tcp: &Bytes, ws: &Bytes) -> Result<(), Refused> {
        let msg = match self.transport {
            Transport::Tcp => tcp.clone(),
            Transport::Ws | Transport::Wss => ws.clone(),
        };
        self.enqueue(msg, Some(Instant::now()))?;
        self.out.wake_writer();
        Ok(())
    }

    /// Closes the connection for `reason` after what is already queued is written.
    pub fn close(&self, reason: CloseReason) {
        let mut state = self.out.lock();
        state.finishing = true;
        state.reason.get_or_insert(reason);
        let awaited = std::mem::take(&mut state.awaited);
        drop(state);
        self.out.wake_all();
        wake_waiting_pushes(awaited);
    }

    /// Moves the idle deadline to `idle` from now.
    pub fn touch(&self, idle: Duration) {
        let ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
        self.idle_deadline
            .store(coarse_ms().saturating_add(ms), Ordering::Relaxed);
    }

    /// Whether the idle deadline passed by `now` ([`coarse_ms`]).
    pub fn idle_at(&self, now: u64) -> bool {
        self.idle_deadline.load(Ordering::Relaxed) <= now
    }

    /// Returns once the server closed this connection (any [`CloseReason`]).
    pub async fn closed(&self) {
        loop {
            // Registered before the look: `notify_waiters` wakes it even if
            // the close lands between the look and the wait.
            let notified = self.out.closing.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.close_reason().is_some() {
                return;
            }
            notified.await;
        }
    }

    /// Wakes the current task on the next push or close (the queue's one
    /// waiter, its writer: a TCP session or a WebSocket writer task).
    pub(crate) fn register_writer(&self, cx: &Context<'_>) {
        self.out.writer.register(cx.waker());
    }

    /// Everything queued, once there is something; `None` once nothing more
    /// will be written (finished, or closed as a slow consumer). Only one task
    /// polls a connection's queue (its writer task or its TCP session).
    pub(crate) fn poll_batch(&self, cx: &mut Context<'_>) -> Poll<Option<VecDeque<Queued>>> {
        if let ready @ Poll::Ready(_) = self.take_batch() {
            return ready;
        }
        // Register, then look again: a push between the first look and the
        // registration is seen by the second.
        self.register_writer(cx);
        self.take_batch()
    }

    /// Takes everything queued, if anything.
    /// [`Conn::poll_batch`] without registering: for a caller that already
    /// registered with [`Conn::register_writer`] before looking.
    pub(crate) fn take_batch(&self) -> Poll<Option<VecDeque<Queued>>> {
        let mut state = self.out.lock();
        if state.reason == Some(CloseReason::SlowConsumer) {
            return Poll::Ready(None);
        }
        if !state.items.is_empty() {
            state.bytes = 0;
            let items = std::mem::take(&mut state.items);
            let awaited = std::mem::take(&mut state.awaited);
            drop(state);
            wake_waiting_pushes(awaited);
            return Poll::Ready(Some(items));
        }
        if state.finishing {
            return Poll::Ready(None);
        }
        Poll::Pending
    }

    /// Whether the writer is waiting for the client's socket to take a
    /// batch (set by the writer; see [`Refused::Behind`]).
    pub(crate) fn set_blocked(&self, blocked: bool) {
        self.out.lock().blocked = blocked;
    }

    /// Tells the writer to write what is queued and stop (the session ended).
    pub fn finish(&self) {
        let mut state = self.out.lock();
        state.finishing = true;
        let awaited = std::mem::take(&mut state.awaited);
        drop(state);
        self.out.wake_writer();
        wake_waiting_pushes(awaited);
    }

    /// Why the server closed this connection, if it did.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.out.lock().reason
    }

    /// Waits for the next batch; `None` once the writer should stop.
    pub(crate) async fn next_batch(&self) -> Option<VecDeque<Queued>> {
        std::future::poll_fn(|cx| self.poll_batch(cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(limit: usize) -> Conn {
        let identity = Identity {
            id: 1,
            key: "k".to_owned(),
            mid: 0,
            transport: Transport::Tcp,
            ip: [127, 0, 0, 1].into(),
            redirect: false,
        };
        Conn::new(identity, &[1000], limit)
    }

    #[test]
    fn overflowing_the_byte_limit_closes_as_slow_consumer() {
        let c = conn(10);
        assert_eq!(c.send(Bytes::from_static(b"123456")), Ok(()));
        assert_eq!(c.send(Bytes::from_static(b"1234")), Ok(()), "exactly full");
        assert_eq!(
            c.send(Bytes::from_static(b"1")),
            Err(Closed(CloseReason::SlowConsumer))
        );
        assert!(
            matches!(c.take_batch(), Poll::Ready(None)),
            "nothing more is written"
        );
        assert_eq!(c.close_reason(), Some(CloseReason::SlowConsumer));
        assert_eq!(
            c.send(Bytes::from_static(b"1")),
            Err(Closed(CloseReason::SlowConsumer))
        );
    }

    /// The tests that wait on the process-wide [`QUEUE_SPACE`] take turns, so a
    /// wake-up one of them sees is its own.
    static QUEUE_SPACE_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    fn push(c: &Conn, bytes: &'static [u8]) -> Result<(), Refused> {
        c.push(&Bytes::from_static(bytes), &Bytes::from_static(bytes))
    }

    /// A connection whose 10-byte queue is nearly full and whose writer is
    /// not blocked, after one push was refused as [`Refused::Behind`].
    fn behind() -> Conn {
        let c = conn(10);
        push(&c, b"12345678").unwrap();
        assert_eq!(push(&c, b"abc"), Err(Refused::Behind));
        c
    }

    /// A full queue whose writer is not waiting on the socket means comet is
    /// behind: the push is refused, the connection stays, and the writer
    /// taking the queue notifies the refused push.
    #[tokio::test]
    async fn a_full_queue_of_a_client_that_keeps_up_refuses_without_closing() {
        let _turn = QUEUE_SPACE_TESTS.lock().await;
        let c = behind();
        assert_eq!(c.close_reason(), None, "the connection stays open");
        let space = QUEUE_SPACE.notified();
        tokio::pin!(space);
        space.as_mut().enable();
        assert!(matches!(c.take_batch(), Poll::Ready(Some(b)) if b.len() == 1));
        tokio::time::timeout(Duration::from_secs(1), space)
            .await
            .expect("taking the queue wakes the waiting push");
        assert_eq!(push(&c, b"abc"), Ok(()), "space again");
    }

    /// A waiting push also wakes when its connection closes, and then finds
    /// it closed instead of sitting out its deadline.
    #[tokio::test]
    async fn closing_a_connection_wakes_the_push_waiting_on_it() {
        let _turn = QUEUE_SPACE_TESTS.lock().await;
        let c = behind();
        let space = QUEUE_SPACE.notified();
        tokio::pin!(space);
        space.as_mut().enable();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), space.as_mut())
                .await
                .is_err(),
            "nothing wakes it before the close"
        );
        c.close(CloseReason::Replaced);
        tokio::time::timeout(Duration::from_secs(1), space)
            .await
            .expect("closing wakes the waiting push");
        assert_eq!(
            push(&c, b"abc"),
            Err(Refused::Closed(Closed(CloseReason::Replaced)))
        );
    }

    /// A full queue while the writer waits on the client's socket: slow
    /// consumer, closed, as before. So is a push bigger than the whole queue.
    #[test]
    fn a_full_queue_of_a_blocked_client_closes_it() {
        let c = conn(10);
        push(&c, b"12345678").unwrap();
        c.set_blocked(true);
        assert_eq!(
            push(&c, b"abc"),
            Err(Refused::Closed(Closed(CloseReason::SlowConsumer)))
        );
        assert_eq!(c.close_reason(), Some(CloseReason::SlowConsumer));

        let c = conn(10);
        assert_eq!(
            push(&c, b"0123456789a"),
            Err(Refused::Closed(Closed(CloseReason::SlowConsumer))),
            "never fits"
        );
    }

    #[tokio::test]
    async fn writer_batches_everything_queued() {
        let c = conn(100);
        c.send(Bytes::from_static(b"ab")).unwrap();
        c.send(Bytes::from_static(b"cd")).unwrap();
        c.push(&Bytes::from_static(b"ef"), &Bytes::from_static(b"ws"))
            .unwrap();
        let batch = c.next_batch().await.unwrap();
        let bytes: Vec<_> = batch.iter().map(|q| q.bytes.clone()).collect();
        assert_eq!(
            bytes,
            [
                Bytes::from_static(b"ab"),
                Bytes::from_static(b"cd"),
                Bytes::from_static(b"ef")
            ]
        );
        assert!(
            batch[0].pushed_at.is_none() && batch[2].pushed_at.is_some(),
            "only pushes carry a queueing time"
        );
        // Taking the batch frees its bytes.
        c.send(Bytes::from(vec![0u8; 100])).unwrap();
        c.close(CloseReason::Drain);
        assert_eq!(
            c.next_batch().await.map(|b| b.len()),
            Some(1),
            "queued data still flushed"
        );
        assert!(c.next_batch().await.is_none());
        assert_eq!(c.send(Bytes::new()), Err(Closed(CloseReason::Drain)));
    }

    #[test]
    fn accepted_ops_change() {
        let c = conn(10);
        assert!(c.accepts(1000));
        assert!(c.accept(&[1001]));
        c.unaccept(&[1000]);
        assert!(c.accepts(1001) && !c.accepts(1000));
    }

    #[test]
    fn the_accepted_set_stops_at_its_limit_all_or_nothing() {
        let c = conn(10);
        let fill: Vec<i32> = (0..).take(limits::MAX_ACCEPTED_OPS - 1).collect();
        assert!(c.accept(&fill), "1000 plus these fill it exactly");
        assert!(c.accept(&[0, 1]), "ops already there cost nothing");
        assert!(!c.accept(&[-1, -2]));
        assert!(!c.accepts(-1), "a refused list adds nothing");
        c.unaccept(&[0]);
        assert!(c.accept(&[-1]));
    }
}
