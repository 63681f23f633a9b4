//! The one HTTP server of every Herald role: logic's push API and client
//! port, and the `/metrics` `/healthz` `/readyz` listener ([`crate::admin`]).
//!
//! `axum::serve` has no deadline of any kind: a client that sends its request
//! head one byte a second, stops a chunked body after one chunk, or just
//! keeps an idle keep-alive connection open holds a descriptor and a task for
//! ever, and enough of them starve every listener of the process (they share
//! one descriptor table). [`serve`] bounds each connection by [`Limits`]:
//!
//! - **header deadline**: a new connection must deliver its first request
//!   head within it, and a kept-alive one the next head within it of the
//!   head's first byte;
//! - **idle deadline**: a kept-alive connection with no request in flight is
//!   closed when nothing arrives within it;
//! - **body deadline**: a request body must arrive whole within it of the
//!   head (total, not between chunks: a body that trickles a byte a second
//!   would otherwise never end); past it the request is answered `408` and
//!   the connection closed;
//! - **connection cap**: past it a new connection is answered `503` and
//!   closed at once, so a flood costs a descriptor only for an instant.
//!
//! Refusals and cuts are counted in [`Refusals`], registered in the role's
//! registry (`<role>_http_refused_total{listener,reason}`).
//!
//! Why a clock of its own rather than hyper's `header_read_timeout`: since
//! hyper 1.6 that timer also runs while a kept-alive connection waits for
//! its next request (hyper PR 3828), so it is header and idle deadline in
//! one and the two cannot differ; a pool that keeps connections a minute
//! would see them cut after the (short) header deadline. tower-http's
//! `RequestBodyTimeoutLayer` restarts its timer at every frame, which a
//! trickling body defeats. The clock here is per connection and moves
//! between three phases: *head* (from accept, or from the first byte after
//! idle, to the request being handed to the router), *busy* (requests in
//! flight: the body deadline and the handler's own timeouts apply) and
//! *idle* (no request in flight since the last answer).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tracing::debug;

use crate::listen::Acceptor;

/// What one HTTP listener allows a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// From accept (or the first byte after idle) to a complete request head.
    pub header_timeout: Duration,
    /// From a complete request head to the end of its body.
    pub body_timeout: Duration,
    /// A kept-alive connection with nothing in flight is closed after this.
    pub idle_timeout: Duration,
    /// Connections held at once; more are answered `503` and closed.
    pub max_connections: usize,
}

impl Default for Limits {
    /// The flags' defaults ([`LimitsArgs`]).
    fn default() -> Self {
        crate::args::defaults::<LimitsArgs>().limits()
    }
}

impl Limits {
    /// The limits of a `/metrics` `/healthz` `/readyz` listener: its callers
    /// are a scraper and the kubelet's probes, a few connections at most.
    pub fn admin() -> Limits {
        Limits {
            max_connections: ADMIN_MAX_CONNECTIONS,
            ..Limits::default()
        }
    }
}

/// Connections an admin listener holds at once.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// The `--http-*` flags of a role with an HTTP API (logic), one group so
/// every HTTP listener of the role reads them the same way.
#[derive(Clone, Debug, clap::Args)]
pub struct LimitsArgs {
    /// Time a client has to send a complete request head, from connecting
    /// (or from the head's first byte on a kept-alive connection).
    #[arg(long, env = "HERALD_HTTP_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    pub http_header_timeout_ms: u64,
    /// Time a client has to send a whole request body after its head; past
    /// it the request is answered 408 and the connection closed.
    #[arg(long, env = "HERALD_HTTP_BODY_TIMEOUT_MS", default_value_t = 30_000)]
    pub http_body_timeout_ms: u64,
    /// A kept-alive connection with no request in flight is closed after this.
    #[arg(long, env = "HERALD_HTTP_IDLE_TIMEOUT_MS", default_value_t = 60_000)]
    pub http_idle_timeout_ms: u64,
    /// Connections each HTTP listener holds at once; more are answered 503
    /// and closed.
    #[arg(long, env = "HERALD_HTTP_MAX_CONNECTIONS", default_value_t = 4096)]
    pub http_max_connections: usize,
}

impl LimitsArgs {
    /// The limits these flags say (zeros are refused by [`Limits::validate`]).
    pub fn limits(&self) -> Limits {
        Limits {
            header_timeout: Duration::from_millis(self.http_header_timeout_ms),
            body_timeout: Duration::from_millis(self.http_body_timeout_ms),
            idle_timeout: Duration::from_millis(self.http_idle_timeout_ms),
            max_connections: self.http_max_connections,
        }
    }
}

impl Limits {
    /// Rejects a zero deadline or cap (either would refuse everything).
    ///
    /// # Errors
    /// What is wrong, for the role's configuration error.
    pub fn validate(&self) -> Result<(), String> {
        let zero = [self.header_timeout, self.body_timeout, self.idle_timeout]
            .iter()
            .any(Duration::is_zero);
        if zero || self.max_connections == 0 {
            return Err("HTTP timeouts and --http-max-connections must be non-zero".to_owned());
        }
        Ok(())
    }
}

/// Why a listener refused or cut a connection (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Over [`Limits::max_connections`]: answered 503 and closed.
    Connections,
    /// No complete request head within [`Limits::header_timeout`].
    HeaderTimeout,
    /// No whole body within [`Limits::body_timeout`]: answered 408.
    BodyTimeout,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::Connections => "connections",
            Refusal::HeaderTimeout => "header_timeout",
            Refusal::BodyTimeout => "body_timeout",
        }
    }
}

type RefusalLabels = Vec<(&'static str, &'static str)>;

/// `http_refused_total{listener,reason}` in a role's registry; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Refusals(Family<RefusalLabels, Counter>);

impl Refusals {
    /// Registers the counter in `registry` (under the role's prefix).
    pub fn register(registry: &mut Registry) -> Refusals {
        let refusals = Refusals::default();
        registry.register(
            "http_refused",
            "HTTP connections refused or cut by a listener's limits, by listener and reason",
            refusals.0.clone(),
        );
        refusals
    }

    /// Counts one refusal on `listener`.
    pub fn count(&self, listener: &'static str, refusal: Refusal) {
        self.0
            .get_or_create(&vec![("listener", listener), ("reason", refusal.label())])
            .inc();
    }
}

/// One listener: its name in logs and metrics, its limits, where refusals
/// are counted (a role without a registry counts nowhere) and whether
/// accepted sockets get `TCP_NODELAY`.
#[derive(Clone, Debug)]
pub struct Listener {
    /// The `listener` label (`api`, `client`, `admin`).
    pub name: &'static str,
    /// What a connection may do.
    pub limits: Limits,
    /// Where refusals are counted.
    pub refusals: Option<Refusals>,
    /// Set `TCP_NODELAY` on accepted sockets (latency-bound APIs).
    pub nodelay: bool,
}

impl Listener {
    /// A listener named `name` with `limits`, no counter and Nagle left on.
    pub fn new(name: &'static str, limits: Limits) -> Listener {
        Listener {
            name,
            limits,
            refusals: None,
            nodelay: false,
        }
    }

    fn refused(&self, refusal: Refusal) {
        if let Some(refusals) = &self.refusals {
            refusals.count(self.name, refusal);
        }
    }
}

/// What a connection over the cap is told before it is closed.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\nretry-after: 1\r\n\r\n";

/// Serves `router` on `listener` within `config`'s limits until `shutdown`
/// completes; then stops accepting and waits for the requests in flight
/// (each still bounded by the deadlines; the role bounds the whole drain).
///
/// # Errors
/// None today: accept errors are retried with a pause (out of descriptors,
/// waiting is what frees them); the `Result` keeps room for one that is not.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: Listener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let config = Arc::new(config);
    let cap = Arc::new(Semaphore::new(config.limits.max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The clock below is the header deadline; hyper's own timer would also
    // cut idle connections at the header deadline (see the module docs).
    builder.http1().header_read_timeout(None);
    let graceful = GracefulShutdown::new();
    let mut acceptor = Acceptor::default();
    let mut shutdown = std::pin::pin!(shutdown);
    // Accept failures are logged by the acceptor; not a refusal of a client.
    while let Some((stream, peer)) = acceptor.accept(&listener, &mut shutdown, |_| {}).await {
        let Ok(permit) = cap.clone().try_acquire_owned() else {
            config.refused(Refusal::Connections);
            debug!(listener = config.name, %peer, "connection cap reached: answered 503");
            // Never waits: a client that does not read gets what fits in
            // the socket buffer (all of it, on a fresh socket) and the close.
            let _ = stream.try_write(BUSY);
            continue;
        };
        if config.nodelay {
            let _ = stream.set_nodelay(true);
        }
        let clock = Arc::new(Clock::new(config.limits));
        let io = TokioIo::new(Guarded::new(stream, clock.clone(), config.clone()));
        let service = hyper::service::service_fn({
            let (router, config) = (router.clone(), config.clone());
            move |request| handle(request, router.clone(), clock.clone(), config.clone())
        });
        let conn = graceful.watch(builder.serve_connection(io, service).into_owned());
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                debug!(%peer, cause = %err, "HTTP connection ended");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// One request: the body gets its deadline, the router answers, and a body
/// that missed it turns the answer into `408` with the connection closed.
async fn handle(
    request: Request<Incoming>,
    router: Router,
    clock: Arc<Clock>,
    config: Arc<Listener>,
) -> Result<Response<Body>, Infallible> {
    let _busy = clock.request();
    let late = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + config.limits.body_timeout;
    let request = request.map(|body| {
        Body::new(Deadline {
            body,
            deadline,
            sleep: None,
            late: late.clone(),
        })
    });
    let mut response = tower::ServiceExt::oneshot(router, request)
        .await
        .unwrap_or_else(|never| match never {});
    if late.load(Ordering::SeqCst) {
        config.refused(Refusal::BodyTimeout);
        // Whatever the handler made of the failed read, the client is told
        // what happened, and the rest of its body is never read.
        response = Response::new(Body::from("request body not received in time"));
        *response.status_mut() = StatusCode::REQUEST_TIMEOUT;
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(response)
}

/// A request body that fails once `deadline` passes before its end.
struct Deadline {
    body: Incoming,
    deadline: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    late: Arc<AtomicBool>,
}

/// The error a [`Deadline`] body ends with.
#[derive(Debug, thiserror::Error)]
#[error("request body not received within the body deadline")]
pub struct BodyTimeout;

impl hyper::body::Body for Deadline {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        ready!(sleep.as_mut().poll(cx));
        this.late.store(true, Ordering::SeqCst);
        Poll::Ready(Some(Err(Box::new(BodyTimeout))))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Where a connection is in its life, for its deadline.
#[derive(Clone, Copy, Debug)]
enum Phase {
    /// Waiting for a complete request head since `.0`.
    Head(Instant),
    /// This many requests in flight: no connection deadline.
    Busy(usize),
    /// Nothing in flight since `.0`.
    Idle(Instant),
}

/// A connection's phase, shared by its socket (which sees bytes arrive) and
/// its requests (which see heads complete and answers leave).
struct Clock {
    limits: Limits,
    phase: Mutex<Phase>,
}

impl Clock {
    fn new(limits: Limits) -> Clock {
        Clock {
            limits,
            phase: Mutex::new(Phase::Head(Instant::now())),
        }
    }

    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes arrived: an idle connection starts a request head.
    fn bytes(&self) {
        let mut phase = self.phase();
        if let Phase::Idle(_) = *phase {
            *phase = Phase::Head(Instant::now());
        }
    }

    /// A request head is complete; busy until the guard drops.
    fn request(self: &Arc<Self>) -> Busy {
        let mut phase = self.phase();
        *phase = match *phase {
            Phase::Busy(n) => Phase::Busy(n + 1),
            Phase::Head(_) | Phase::Idle(_) => Phase::Busy(1),
        };
        Busy(self.clone())
    }

    /// When the connection must be cut, and why; `None` while busy.
    fn deadline(&self) -> Option<(Instant, Option<Refusal>)> {
        match *self.phase() {
            Phase::Head(since) => Some((
                since + self.limits.header_timeout,
                Some(Refusal::HeaderTimeout),
            )),
            Phase::Idle(since) => Some((since + self.limits.idle_timeout, None)),
            Phase::Busy(_) => None,
        }
    }
}

/// A request in flight; dropping it (answer given, or the request dropped
/// with its connection) makes the connection idle when it was the last.
struct Busy(Arc<Clock>);

impl Drop for Busy {
    fn drop(&mut self) {
        let mut phase = self.0.phase();
        *phase = match *phase {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Idle(Instant::now()),
        };
    }
}

/// An accepted socket that fails its reads once its [`Clock`]'s deadline
/// passes. hyper reads whenever it waits for a request (head or idle), so a
/// pending read is where the deadline is checked and its timer armed.
struct Guarded {
    stream: TcpStream,
    clock: Arc<Clock>,
    config: Arc<Listener>,
    /// The armed timer and the deadline it is set for.
    sleep: Pin<Box<Sleep>>,
    armed: Option<Instant>,
}

impl Guarded {
    fn new(stream: TcpStream, clock: Arc<Clock>, config: Arc<Listener>) -> Guarded {
        Guarded {
            stream,
            clock,
            config,
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed: None,
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.clock.bytes();
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
            Poll::Pending => {}
        }
        let Some((deadline, refusal)) = this.clock.deadline() else {
            return Poll::Pending;
        };
        if this.armed != Some(deadline) {
            this.sleep.as_mut().reset(deadline);
            this.armed = Some(deadline);
        }
        ready!(this.sleep.as_mut().poll(cx));
        if let Some(refusal) = refusal {
            this.config.refused(refusal);
        }
        let what = if refusal.is_some() {
            "request head not received in time"
        } else {
            "idle connection"
        };
        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)))
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
