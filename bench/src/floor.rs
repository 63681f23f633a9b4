//! The kernel floors: a fan-out server that does nothing but write pre-encoded
//! frames to N sockets, as fast as it can, on one pinned core (S0, for S2);
//! and a relay that copies each frame it is sent to one of N sockets (S3's
//! latency floor); a handshake server for S4's connection storms, and a
//! `Connect` caller for the part of S4's floor that asks logic.
//!
//! Whatever comet achieves at the same N and batch size is compared against
//! this figure, taken in the same run, so a busy or slow machine moves both
//! numbers and the ratio stays meaningful. It runs on its own thread in the
//! process of its own (`herald bench floor-server`), with blocking sockets: a
//! write that blocks means the reader (the generator) fell behind, which the
//! generator's CPU figure shows.
//!
//! The handshake floor is in `handshake`, the call floor in `call`; this
//! file holds the fan-out, relay and echo floors and the process handles.

mod call;
mod handshake;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub(crate) use self::call::{CallFloor, connect};
pub(crate) use self::handshake::handshake;
use crate::load::Clock;
use crate::proc;
use crate::wire;

/// Why the floor server failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Binding or accepting failed.
    #[error("floor server: {step}")]
    Io {
        /// What it was doing.
        step: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The floor process stopped before answering.
    #[error("floor server process stopped")]
    Gone,
    /// A command or answer line was malformed.
    #[error("floor server: bad line {0:?}")]
    Command(String),
}

/// Result with this module's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One saturation run's figures.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub(crate) struct FloorRun {
    pub(crate) connections: usize,
    pub(crate) frames_per_push: usize,
    pub(crate) pushes: u64,
    /// `write` calls (one per connection per push).
    pub(crate) writes: u64,
    pub(crate) messages: u64,
    pub(crate) seconds: f64,
    pub(crate) writes_per_sec: f64,
    pub(crate) messages_per_sec: f64,
    /// CPU the floor thread used, as a share of one core.
    pub(crate) cpu_share: f64,
    /// Next sequence number the clients expect after this run.
    pub(crate) next_seq: i32,
}

#[derive(Debug)]
struct Command {
    frames_per_push: usize,
    duration: Duration,
    first_seq: i32,
}

/// Serves the floor in this process (the `floor-server` target): accepts
/// `connections` clients on `listener`, then runs one saturation per command
/// line `<frames_per_push> <millis> <first_seq>` read from stdin and answers
/// each with one JSON line on stdout. A separate process, because the
/// benchmark process already holds the client end of every socket and the
/// per-process descriptor limit cannot hold both ends.
pub(crate) fn serve(connections: usize) -> Result<()> {
    use std::io::BufRead;
    let io = |step| move |source| Error::Io { step, source };
    let (_listener, mut socks) = accept_clients(connections)?;
    let mut out = std::io::stdout();
    let clock = Clock::new();
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(io("stdin"))?;
        let parts: Vec<u64> = line
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        let [frames_per_push, millis, first_seq] = parts[..] else {
            return Err(Error::Command(line));
        };
        let cmd = Command {
            frames_per_push: frames_per_push as usize,
            duration: Duration::from_millis(millis),
            first_seq: i32::try_from(first_seq).map_err(|_| Error::Command(line.clone()))?,
        };
        let run = saturate(&mut socks, &cmd, clock);
        let json = serde_json::to_string(&run).map_err(|e| Error::Command(e.to_string()))?;
        writeln!(out, "{json}").map_err(io("stdout"))?;
        out.flush().map_err(io("stdout"))?;
    }
    Ok(())
}

/// Serves S3's latency floor in this process (the `floor-relay` target):
/// accepts `connections` clients, then one injector connection, and copies
/// every `index: u32, length: u32, frame` record the injector sends to client
/// `index` with one blocking write, until the injector hangs up. A read
/// takes whatever records have arrived, so a burst costs one read, like an
/// HTTP/2 frame batch does for comet. What is left of the latency is the
/// kernel's loopback path and the scheduling of two processes on this
/// machine: the part of comet's latency that no server could remove.
pub(crate) fn relay(connections: usize) -> Result<()> {
    use std::io::{BufReader, ErrorKind, Read};
    let io = |step| move |source| Error::Io { step, source };
    let (listener, mut socks) = accept_clients(connections)?;
    let (injector, _) = listener.accept().map_err(io("accept injector"))?;
    injector.set_nodelay(true).map_err(io("nodelay"))?;
    let mut reader = BufReader::with_capacity(64 * 1024, injector);
    let mut head = [0u8; 8];
    let mut frame = Vec::new();
    loop {
        match reader.read_exact(&mut head) {
            Ok(()) => {}
            Err(err) if err.kind() == ErrorKind::UnexpectedEof => return Ok(()),
            Err(err) => return Err(io("read injector")(err)),
        }
        let [i0, i1, i2, i3, l0, l1, l2, l3] = head;
        let index = u32::from_be_bytes([i0, i1, i2, i3]) as usize;
        let len = u32::from_be_bytes([l0, l1, l2, l3]) as usize;
        frame.resize(len, 0);
        reader.read_exact(&mut frame).map_err(io("read injector"))?;
        if let Some(sock) = socks.get_mut(index) {
            // A client that went away only loses its own frames.
            let _ = sock.write_all(&frame);
        }
    }
}

/// Serves S5's round-trip floor in this process (the `floor-echo` target):
/// accepts one client and answers each read with one write of the same
/// bytes, with blocking calls, until the client hangs up. At a rate slow
/// enough that every message finds the process asleep, its CPU per message
/// is what one request and its answer cost the kernel on this machine: the
/// wake-up, the read, the loopback send and going back to sleep, with no
/// event loop, parsing or thread hand-off of any kind.
pub(crate) fn echo() -> Result<()> {
    use std::io::{ErrorKind, Read};
    let io = |step| move |source| Error::Io { step, source };
    let (_listener, mut socks) = accept_clients(1)?;
    let mut sock = socks.pop().ok_or(Error::Gone)?;
    let mut buf = [0u8; 4096];
    loop {
        let n = match sock.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(err) if err.kind() == ErrorKind::Interrupted => continue,
            Err(err) => return Err(io("read client")(err)),
        };
        sock.write_all(&buf[..n]).map_err(io("write client"))?;
    }
}

/// A loopback listener (see [`listen`]) whose address is announced on
/// stdout, where the benchmark reads it.
fn announced_listener() -> Result<TcpListener> {
    let io = |step| move |source| Error::Io { step, source };
    let listener = listen().map_err(io("listen"))?;
    let addr = listener.local_addr().map_err(io("local address"))?;
    let mut out = std::io::stdout();
    writeln!(out, "listening {addr}").map_err(io("stdout"))?;
    out.flush().map_err(io("stdout"))?;
    Ok(listener)
}

/// Listens on loopback, announces the address on stdout (the benchmark
/// reads it), and accepts `connections` clients.
fn accept_clients(connections: usize) -> Result<(TcpListener, Vec<TcpStream>)> {
    let io = |step| move |source| Error::Io { step, source };
    let listener = announced_listener()?;
    let mut socks = Vec::with_capacity(connections);
    while socks.len() < connections {
        let (sock, _) = listener.accept().map_err(io("accept"))?;
        sock.set_nodelay(true).map_err(io("nodelay"))?;
        socks.push(sock);
    }
    Ok((listener, socks))
}

/// A loopback listener with a deep accept queue: std's default backlog
/// (128) overflows when a thousand clients connect at once, and every
/// overflow costs that client a one-second SYN-ACK retransmission.
fn listen() -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// A floor process, seen from the benchmark: commands go to its stdin, and
/// a reader thread turns its stdout lines into messages the event loop can
/// poll without blocking. Killed when dropped.
#[derive(Debug)]
struct FloorChild {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl FloorChild {
    /// Starts `binary bench <target> --clients N`, pinned to `core`, and
    /// returns it with the first line it printed (its greeting).
    fn spawn(
        binary: &Path,
        target: &str,
        connections: usize,
        core: Option<usize>,
    ) -> Result<(FloorChild, String)> {
        let io = |step| move |source| Error::Io { step, source };
        let mut child = crate::server::child_command(binary, core)
            .args(["bench", target, "--clients", &connections.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(io("spawn floor process"))?;
        let stdin = child.stdin.take().ok_or(Error::Gone)?;
        let stdout = child.stdout.take().ok_or(Error::Gone)?;
        let (tx, lines) = mpsc::channel();
        let floor = FloorChild {
            child,
            stdin,
            lines,
        };
        std::thread::Builder::new()
            .name("floor-stdout".to_owned())
            .spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })
            .map_err(io("spawn reader thread"))?;
        let first = floor
            .lines
            .recv_timeout(Duration::from_secs(20))
            .map_err(|_| Error::Gone)?;
        Ok((floor, first))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one command line.
    fn send(&mut self, line: &str) -> Result<()> {
        writeln!(self.stdin, "{line}")
            .and_then(|()| self.stdin.flush())
            .map_err(|source| Error::Io {
                step: "send command",
                source,
            })
    }

    /// The next answer line, parsed, once there is one.
    fn try_answer<T: serde::de::DeserializeOwned>(&self) -> Option<Result<T>> {
        match self.lines.try_recv() {
            Ok(line) => Some(serde_json::from_str(&line).map_err(|_| Error::Command(line))),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => Some(Err(Error::Gone)),
        }
    }
}

impl Drop for FloorChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The floor server process, seen from the benchmark.
#[derive(Debug)]
pub(crate) struct FloorProc {
    proc: FloorChild,
    addr: SocketAddr,
}

impl FloorProc {
    /// Starts `binary bench floor-server --clients N`, pinned to `core`.
    pub(crate) fn start(
        binary: &Path,
        connections: usize,
        core: Option<usize>,
    ) -> Result<FloorProc> {
        FloorProc::spawn(binary, "floor-server", connections, core)
    }

    /// Starts `binary bench floor-relay --clients N` (S3's floor), pinned to
    /// `core`; it serves until the injector connection closes.
    pub(crate) fn start_relay(
        binary: &Path,
        connections: usize,
        core: Option<usize>,
    ) -> Result<FloorProc> {
        FloorProc::spawn(binary, "floor-relay", connections, core)
    }

    /// Starts `binary bench floor-echo` (S5's round-trip floor), pinned to
    /// `core`; it serves one client until it hangs up.
    pub(crate) fn start_echo(binary: &Path, core: Option<usize>) -> Result<FloorProc> {
        FloorProc::spawn(binary, "floor-echo", 1, core)
    }

    /// Starts `binary bench floor-handshake` (S4's floor), pinned to
    /// `core`; it serves until stopped.
    pub(crate) fn start_handshake(binary: &Path, core: Option<usize>) -> Result<FloorProc> {
        FloorProc::spawn(binary, "floor-handshake", 1, core)
    }

    /// The floor process's id, for its CPU figures.
    pub(crate) fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Starts `target`, which greets with the address it listens on.
    fn spawn(
        binary: &Path,
        target: &str,
        connections: usize,
        core: Option<usize>,
    ) -> Result<FloorProc> {
        let (proc, first) = FloorChild::spawn(binary, target, connections, core)?;
        let addr = first
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| Error::Command(first.clone()))?;
        Ok(FloorProc { proc, addr })
    }

    /// Where clients connect.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts a saturation run; poll [`FloorProc::try_result`] for its figures.
    pub(crate) fn run(
        &mut self,
        frames_per_push: usize,
        duration: Duration,
        first_seq: i32,
    ) -> Result<()> {
        self.proc.send(&format!(
            "{frames_per_push} {} {first_seq}",
            duration.as_millis()
        ))
    }

    /// The figures of the last run, once it finished.
    pub(crate) fn try_result(&self) -> Option<Result<FloorRun>> {
        self.proc.try_answer()
    }
}

fn saturate(socks: &mut [TcpStream], cmd: &Command, clock: Clock) -> FloorRun {
    let cpu_before = proc::thread_cpu_seconds().unwrap_or(0.0);
    let start = Instant::now();
    let mut batch = Vec::with_capacity(cmd.frames_per_push * wire::MSG_LEN);
    let mut seq = cmd.first_seq;
    let (mut pushes, mut writes) = (0u64, 0u64);
    let mut alive = vec![true; socks.len()];
    while start.elapsed() < cmd.duration {
        batch.clear();
        let now = clock.ns();
        for _ in 0..cmd.frames_per_push {
            wire::put_message(&mut batch, seq, now);
            seq += 1;
        }
        for (sock, alive) in socks.iter_mut().zip(alive.iter_mut()) {
            if *alive {
                if sock.write_all(&batch).is_ok() {
                    writes += 1;
                } else {
                    *alive = false;
                }
            }
        }
        pushes += 1;
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu = proc::thread_cpu_seconds().unwrap_or(0.0) - cpu_before;
    let messages = writes * cmd.frames_per_push as u64;
    FloorRun {
        connections: socks.len(),
        frames_per_push: cmd.frames_per_push,
        pushes,
        writes,
        messages,
        seconds,
        writes_per_sec: writes as f64 / seconds,
        messages_per_sec: messages as f64 / seconds,
        cpu_share: cpu / seconds,
        next_seq: seq,
    }
}
