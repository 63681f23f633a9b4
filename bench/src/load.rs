//! The load generator: thousands of goim clients in one single-threaded
//! process.
//!
//! Each client is one socket. Connecting (TCP or WebSocket upgrade, then op 7
//! → op 8) runs as short tasks on the current-thread runtime; afterwards most
//! clients become *sinks*: plain non-blocking sockets, taken off the reactor,
//! that one task sweeps every `sweep` interval into a single shared buffer,
//! counting frames by their length prefixes and checking sequence numbers
//! (see [`crate::wire::Scanner`]). About one client in a hundred is a *probe*:
//! it stays on the reactor, reads as soon as bytes arrive and records each
//! message's latency from its scheduled send time. Sweeping lazily is what
//! lets one core hold 19,000 clients: a sweep reads many frames per syscall.
//!
//! Sources are spread over `127.0.x.y` addresses, at most
//! [`PER_SOURCE`] connections each, so no address runs out of ports.
//!
//! Opening one client (connect, upgrade, authenticate) is in `open`; this
//! file holds the population: sinks, probes and the sweep.

mod open;

use std::cell::{Cell, RefCell};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::net::TcpStream;
use tokio::task::{JoinHandle, JoinSet};

pub(crate) use self::open::ClientSpec;
pub use self::open::{Error, Result};
use self::open::{Opened, open};
use crate::wire::{self, Scanner, Tally};

/// Most connections bound to one source address.
pub(crate) const PER_SOURCE: usize = 2_000;
/// Bytes read per `read` call; one buffer shared by every sink and probe.
const READ_BUF: usize = 64 * 1024;
/// Sinks swept before yielding, so probes and injectors are not held up by a
/// whole 19k-socket sweep.
const SWEEP_CHUNK: usize = 256;
/// How often every client sends its (pre-encoded) heartbeat.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(30);

/// TCP or WebSocket clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Transport {
    /// goim over raw TCP.
    Tcp,
    /// goim over WebSocket (`/sub`).
    Ws,
}

/// The source address of the `index`-th connection.
pub(crate) fn source_addr(index: usize) -> Ipv4Addr {
    let slot = index / PER_SOURCE;
    Ipv4Addr::new(127, 0, 1 + (slot / 250) as u8, 1 + (slot % 250) as u8)
}

/// Nanoseconds since the run's epoch: the clock of every send time and latency.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock(Instant);

impl Clock {
    pub(crate) fn new() -> Clock {
        Clock(Instant::now())
    }

    pub(crate) fn ns(self) -> u64 {
        self.at(Instant::now())
    }

    pub(crate) fn at(self, instant: Instant) -> u64 {
        u64::try_from(instant.saturating_duration_since(self.0).as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A swept client.
#[derive(Debug)]
struct Sink {
    stream: std::net::TcpStream,
    ws: bool,
    scanner: Scanner,
    tally: Tally,
    open: bool,
    /// A paused sink is not read (S7's slow consumers).
    paused: bool,
}

/// What the probes share: their tallies and one latency histogram.
#[derive(Debug)]
struct Probes {
    tallies: Vec<Tally>,
    closed: u64,
    latency: Histogram<u64>,
}

/// Totals over every client.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub(crate) struct Totals {
    pub(crate) clients: u64,
    pub(crate) open: u64,
    pub(crate) paused: u64,
    pub(crate) messages: u64,
    pub(crate) lost: u64,
    pub(crate) reordered: u64,
    pub(crate) bytes: u64,
    /// Messages, loss and reorders of the clients that are not paused.
    pub(crate) active_messages: u64,
    pub(crate) active_lost: u64,
    pub(crate) active_closed: u64,
}

/// Outcome of a [`Generator::connect`] call.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(crate) struct ConnectStats {
    pub(crate) requested: usize,
    pub(crate) connected: usize,
    pub(crate) failed: usize,
    pub(crate) seconds: f64,
    pub(crate) per_second: f64,
    /// Connections the kernel dropped meanwhile because an accept queue was
    /// full (machine-wide); each costs a client a 1 s retransmission.
    pub(crate) listen_overflows: u64,
}

/// The client population of one run. Must live inside a `LocalSet`.
#[derive(Debug)]
pub(crate) struct Generator {
    clock: Clock,
    sinks: Rc<RefCell<Vec<Sink>>>,
    probes: Rc<RefCell<Probes>>,
    buf: Rc<RefCell<Box<[u8]>>>,
    probe_tasks: Vec<JoinHandle<()>>,
    sweeper: Option<JoinHandle<()>>,
    sweep: Rc<Cell<Duration>>,
    /// Index of the next connection, for source-address spreading.
    next_index: usize,
    first_error: Option<String>,
}

impl Generator {
    pub(crate) fn new(clock: Clock, sweep: Duration) -> Generator {
        Generator {
            clock,
            sinks: Rc::default(),
            probes: Rc::new(RefCell::new(Probes {
                tallies: Vec::new(),
                closed: 0,
                latency: new_histogram(),
            })),
            buf: Rc::new(RefCell::new(vec![0u8; READ_BUF].into_boxed_slice())),
            probe_tasks: Vec::new(),
            sweeper: None,
            sweep: Rc::new(Cell::new(sweep)),
            next_index: 0,
            first_error: None,
        }
    }

    /// The first connection error seen, for the report.
    pub(crate) fn first_error(&self) -> Option<&str> {
        self.first_error.as_deref()
    }

    /// Opens `specs` against `target` with at most `concurrency` handshakes in
    /// flight; returns counts and the authenticated-connections rate.
    pub(crate) async fn connect(
        &mut self,
        target: SocketAddr,
        specs: Vec<ClientSpec>,
        concurrency: usize,
    ) -> ConnectStats {
        let requested = specs.len();
        let overflows = crate::proc::listen_overflows();
        let start = Instant::now();
        let mut set = JoinSet::new();
        let (mut connected, mut failed) = (0, 0);
        let mut specs = specs.into_iter();
        loop {
            while set.len() < concurrency.max(1) {
                let Some(spec) = specs.next() else { break };
                let src = source_addr(self.next_index);
                self.next_index += 1;
                set.spawn_local(open(spec, src, target, self.clock));
            }
            let Some(joined) = set.join_next().await else {
                break;
            };
            match joined {
                Ok(Ok(opened)) => {
                    connected += 1;
                    self.adopt(opened);
                }
                Ok(Err(err)) => {
                    failed += 1;
                    self.first_error.get_or_insert_with(|| err.to_string());
                }
                Err(err) => {
                    failed += 1;
                    self.first_error.get_or_insert_with(|| err.to_string());
                }
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        ConnectStats {
            requested,
            connected,
            failed,
            seconds,
            per_second: connected as f64 / seconds.max(1e-9),
            listen_overflows: crate::proc::listen_overflows().saturating_sub(overflows),
        }
    }

    fn adopt(&mut self, opened: Opened) {
        let Opened {
            spec,
            stream,
            scanner,
            tally,
        } = opened;
        let ws = spec.transport == Transport::Ws;
        if spec.probe {
            let index = {
                let mut probes = self.probes.borrow_mut();
                probes.tallies.push(tally);
                probes.tallies.len() - 1
            };
            let heartbeat = wire::heartbeat_frame();
            let heartbeat = if ws {
                wire::ws_client_frame(&heartbeat)
            } else {
                heartbeat
            };
            let task = probe(
                stream,
                scanner,
                index,
                self.probes.clone(),
                self.buf.clone(),
                self.clock,
                heartbeat,
            );
            self.probe_tasks.push(tokio::task::spawn_local(task));
            return;
        }
        match stream.into_std() {
            Ok(stream) => self.sinks.borrow_mut().push(Sink {
                stream,
                ws,
                scanner,
                tally,
                open: true,
                paused: false,
            }),
            Err(err) => {
                self.first_error
                    .get_or_insert_with(|| format!("client {}: into_std: {err}", spec.mid));
            }
        }
    }

    /// Starts the sweeping task (idempotent).
    pub(crate) fn start_sweeping(&mut self) {
        if self.sweeper.is_some() {
            return;
        }
        let sinks = self.sinks.clone();
        let buf = self.buf.clone();
        let sweep = self.sweep.clone();
        let clock = self.clock;
        self.sweeper = Some(tokio::task::spawn_local(async move {
            let heartbeat_tcp = wire::heartbeat_frame();
            let heartbeat_ws = wire::ws_client_frame(&heartbeat_tcp);
            let mut last_heartbeat = Instant::now();
            loop {
                let started = Instant::now();
                let heartbeat = last_heartbeat.elapsed() >= HEARTBEAT_EVERY;
                if heartbeat {
                    last_heartbeat = started;
                }
                let mut index = 0;
                let mut busy = false;
                loop {
                    let (done, read_full) = sweep_chunk(
                        &sinks,
                        &buf,
                        index,
                        clock,
                        heartbeat.then_some((&heartbeat_tcp[..], &heartbeat_ws[..])),
                    );
                    busy |= read_full;
                    index += SWEEP_CHUNK;
                    if done {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                // A sweep that filled the buffer somewhere means data is
                // arriving faster than the interval allows: go again at once.
                let pause = sweep.get().saturating_sub(started.elapsed());
                if busy || pause.is_zero() {
                    tokio::task::yield_now().await;
                } else {
                    tokio::time::sleep(pause).await;
                }
            }
        }));
    }

    /// Stops reading the `count` sinks connected last.
    pub(crate) fn pause_last(&self, count: usize) -> usize {
        let mut sinks = self.sinks.borrow_mut();
        let from = sinks.len().saturating_sub(count);
        for sink in &mut sinks[from..] {
            sink.paused = true;
        }
        sinks.len() - from
    }

    /// Sums every client's tally.
    pub(crate) fn totals(&self) -> Totals {
        let sinks = self.sinks.borrow();
        let probes = self.probes.borrow();
        let mut t = Totals {
            clients: (sinks.len() + probes.tallies.len()) as u64,
            ..Totals::default()
        };
        for sink in sinks.iter() {
            t.messages += sink.tally.messages;
            t.lost += sink.tally.lost;
            t.reordered += sink.tally.reordered;
            t.bytes += sink.tally.bytes;
            t.open += u64::from(sink.open);
            if sink.paused {
                t.paused += 1;
            } else {
                t.active_messages += sink.tally.messages;
                t.active_lost += sink.tally.lost;
                t.active_closed += u64::from(!sink.open);
            }
        }
        for tally in &probes.tallies {
            t.messages += tally.messages;
            t.lost += tally.lost;
            t.reordered += tally.reordered;
            t.bytes += tally.bytes;
            t.active_messages += tally.messages;
            t.active_lost += tally.lost;
        }
        t.open += probes.tallies.len() as u64 - probes.closed;
        t.active_closed += probes.closed;
        t
    }

    /// Takes the probes' latency histogram, leaving an empty one.
    pub(crate) fn take_latency(&self) -> Histogram<u64> {
        std::mem::replace(&mut self.probes.borrow_mut().latency, new_histogram())
    }

    /// Waits until `delivered` messages have arrived in total, or no new
    /// message arrived for `idle`; returns the total and when the last one
    /// was seen.
    pub(crate) async fn wait_delivered(&self, expected: u64, idle: Duration) -> (u64, Instant) {
        let mut last = self.totals().messages;
        let mut last_change = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = self.totals().messages;
            if now != last {
                last = now;
                last_change = Instant::now();
            }
            if now >= expected || last_change.elapsed() >= idle {
                return (now, last_change);
            }
        }
    }

    /// Closes every client (sockets are dropped; the server sees FIN).
    pub(crate) async fn close_all(&mut self) {
        if let Some(sweeper) = self.sweeper.take() {
            sweeper.abort();
            let _ = sweeper.await;
        }
        for task in self.probe_tasks.drain(..) {
            task.abort();
            let _ = task.await;
        }
        self.sinks.borrow_mut().clear();
        let mut probes = self.probes.borrow_mut();
        probes.tallies.clear();
        probes.closed = 0;
    }
}

/// Sweeps sinks `from..from + SWEEP_CHUNK`; returns (reached the end, some
/// read filled the whole buffer).
fn sweep_chunk(
    sinks: &RefCell<Vec<Sink>>,
    buf: &RefCell<Box<[u8]>>,
    from: usize,
    clock: Clock,
    heartbeat: Option<(&[u8], &[u8])>,
) -> (bool, bool) {
    let mut sinks = sinks.borrow_mut();
    let mut buf = buf.borrow_mut();
    let end = (from + SWEEP_CHUNK).min(sinks.len());
    let mut full = false;
    for sink in sinks.get_mut(from..end).into_iter().flatten() {
        if !sink.open || sink.paused {
            continue;
        }
        if let Some((tcp, ws)) = heartbeat {
            let frame = if sink.ws { ws } else { tcp };
            // A heartbeat that does not fit the send buffer now is simply
            // skipped: the server's idle timeout is far longer.
            let _ = (&sink.stream).write(frame);
        }
        loop {
            match (&sink.stream).read(&mut buf[..]) {
                Ok(0) => {
                    sink.open = false;
                    break;
                }
                Ok(n) => {
                    let now = clock.ns();
                    sink.scanner.feed(&buf[..n], &mut sink.tally, now, None);
                    if n < buf.len() {
                        break;
                    }
                    full = true;
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    sink.open = false;
                    break;
                }
            }
        }
    }
    (end >= sinks.len(), full)
}

/// A probe: reads as soon as the reactor says its socket is readable, and
/// sends its `heartbeat` frame every [`HEARTBEAT_EVERY`] as the sinks do,
/// so a run longer than the server's idle timeout (the soak) keeps it.
async fn probe(
    stream: TcpStream,
    mut scanner: Scanner,
    index: usize,
    probes: Rc<RefCell<Probes>>,
    buf: Rc<RefCell<Box<[u8]>>>,
    clock: Clock,
    heartbeat: Vec<u8>,
) {
    let mut beat = tokio::time::interval_at(
        tokio::time::Instant::now() + HEARTBEAT_EVERY,
        HEARTBEAT_EVERY,
    );
    loop {
        let readable = tokio::select! {
            readable = stream.readable() => readable,
            _ = beat.tick() => {
                // As for sinks: one that does not fit now is skipped.
                let _ = stream.try_write(&heartbeat);
                continue;
            }
        };
        if readable.is_err() {
            break;
        }
        let mut buf = buf.borrow_mut();
        match stream.try_read(&mut buf[..]) {
            Ok(0) => break,
            Ok(n) => {
                let now = clock.ns();
                let mut probes = probes.borrow_mut();
                let Probes {
                    tallies, latency, ..
                } = &mut *probes;
                if let Some(tally) = tallies.get_mut(index) {
                    scanner.feed(&buf[..n], tally, now, Some(latency));
                }
            }
            Err(err) if err.kind() == ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
    }
    probes.borrow_mut().closed += 1;
}

/// A histogram of nanoseconds, 3 significant digits, up to a minute.
pub(crate) fn new_histogram() -> Histogram<u64> {
    // Fixed bounds (recording clamps rather than resizes): 1 ns to 60 s at 3
    // significant figures is a valid configuration, so creation cannot fail.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}
