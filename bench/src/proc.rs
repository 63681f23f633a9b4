//! What the kernel says about processes and the machine: CPU time and RSS
//! from `/proc`, CPU pinning through util-linux `taskset` (the workspace
//! forbids `unsafe`, so no direct `sched_setaffinity`), load average and the
//! machine description recorded with every run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Clock ticks per second of `/proc/<pid>/stat` times. Linux reports them in
/// `USER_HZ`, which is 100 on every architecture it supports.
const TICKS_PER_SEC: f64 = 100.0;

/// Why a reading failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `/proc` file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A `/proc` file did not have the expected shape.
    #[error("unexpected contents in {0}")]
    Parse(String),
    /// `taskset` failed or is missing.
    #[error("taskset failed to pin {what}: {detail}")]
    Pin {
        /// What was being pinned.
        what: String,
        /// Its exit status or the spawn error.
        detail: String,
    },
}

/// Result with this module's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn read(path: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

/// user + system CPU seconds from a `stat` file (`/proc/<pid>/stat` layout).
fn stat_cpu(path: &str) -> Result<(f64, f64)> {
    let text = read(path)?;
    // The command name may contain spaces and parentheses: fields are
    // counted after the last ')'. utime and stime are fields 14 and 15.
    let rest = text
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| Error::Parse(path.to_owned()))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .map(|ticks| ticks as f64 / TICKS_PER_SEC)
            .ok_or_else(|| Error::Parse(path.to_owned()))
    };
    // After ')' the first field is #3 (state), so #14 is index 11.
    Ok((field(11)?, field(12)?))
}

/// CPU seconds (user, system) of process `pid`.
pub(crate) fn cpu(pid: u32) -> Result<(f64, f64)> {
    stat_cpu(&format!("/proc/{pid}/stat"))
}

/// CPU seconds (user + system) of process `pid` to the nanosecond, from its
/// CPU-time clock: `/proc` counts in 10 ms ticks, too coarse for a few
/// thousand round trips of a few microseconds each. `None` when the process
/// is gone or its clock cannot be read.
pub fn precise_cpu_seconds(pid: u32) -> Option<f64> {
    use nix::time::{clock_getcpuclockid, clock_gettime};
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).ok()?);
    let now = clock_gettime(clock_getcpuclockid(pid).ok()?).ok()?;
    Some(now.tv_sec() as f64 + now.tv_nsec() as f64 * 1e-9)
}

/// CPU seconds (user + system) of the calling thread.
pub(crate) fn thread_cpu_seconds() -> Result<f64> {
    let (u, s) = stat_cpu("/proc/thread-self/stat")?;
    Ok(u + s)
}

/// Resident set size of `pid` in bytes (`VmRSS`).
pub(crate) fn rss(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = read(&path)?;
    text.lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or(Error::Parse(path))
}

/// Read-class and write-class system calls of `pid` so far (`syscr`,
/// `syscw` of `/proc/<pid>/io`). The kernel counts calls that go through its
/// VFS read/write paths (`read`, `readv`, `write`, `writev`, `pread`, …), not
/// `send`/`recv`/`sendmsg`/`recvmsg`, so socket I/O done with those is missing:
/// a lower bound, compared between runs of the same binary.
pub(crate) fn syscalls(pid: u32) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/io");
    let text = read(&path)?;
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    field("syscr:")
        .zip(field("syscw:"))
        .ok_or(Error::Parse(path))
}

/// Every system call of one process over an interval, counted by `perf
/// stat` on the `raw_syscalls:sys_enter` tracepoint (opt-in with
/// `--perf-syscalls`: it needs perf and tracepoint access, and counting adds
/// a little to each call's cost). Unlike [`syscalls`] it includes socket
/// `send`/`recv`.
#[derive(Debug)]
pub(crate) struct PerfCount {
    child: Child,
    out: PathBuf,
}

impl PerfCount {
    /// Starts counting `pid`'s system calls; `None` when perf cannot start.
    pub(crate) fn start(pid: u32, dir: &Path, label: &str) -> Option<PerfCount> {
        let out = dir.join(format!("perf-{label}-{pid}.csv"));
        let child = Command::new("perf")
            .args(["stat", "-e", "raw_syscalls:sys_enter", "-x,", "-o"])
            .arg(&out)
            .args(["-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        Some(PerfCount { child, out })
    }

    /// Stops perf (SIGINT to its pid, which makes it write its count) and
    /// returns the count; `None` when perf failed or counted nothing.
    pub(crate) fn stop(mut self) -> Option<u64> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).ok()?);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let text = std::fs::read_to_string(&self.out).ok()?;
        let _ = std::fs::remove_file(&self.out);
        text.lines()
            .find(|l| l.contains("raw_syscalls:sys_enter"))
            .and_then(|l| l.split(',').next())
            .and_then(|n| n.trim().parse().ok())
    }
}

impl Drop for PerfCount {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The kernel's count of connections dropped because an accept queue was
/// full (`TcpExt: ListenOverflows`), machine-wide.
pub(crate) fn listen_overflows() -> u64 {
    let Ok(text) = read("/proc/net/netstat") else {
        return 0;
    };
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let found = names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(name, _)| *name == "ListenOverflows")
            .and_then(|(_, v)| v.parse().ok());
        return found.unwrap_or(0);
    }
    0
}

/// The 1-minute load average.
pub(crate) fn loadavg() -> f64 {
    read("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|f| f.parse().ok()))
        .unwrap_or(f64::NAN)
}

fn taskset(args: &[&str], what: String) -> Result<()> {
    let status = Command::new("taskset")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|err| Error::Pin {
            what: what.clone(),
            detail: err.to_string(),
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Pin {
            what,
            detail: status.to_string(),
        })
    }
}

/// Pins every thread of this process to `core` (threads started later
/// inherit it).
pub(crate) fn pin_process(core: usize) -> Result<()> {
    let pid = std::process::id().to_string();
    taskset(
        &["-a", "-p", "-c", &core.to_string(), &pid],
        format!("process {pid}"),
    )
}

/// The machine a run took place on.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Machine {
    pub(crate) nproc: usize,
    pub(crate) cpu_model: String,
    pub(crate) kernel: String,
}

impl Machine {
    pub(crate) fn describe() -> Machine {
        let cpu_model = read("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let kernel = read("/proc/sys/kernel/osrelease")
            .map(|k| k.trim().to_owned())
            .unwrap_or_else(|_| "unknown".to_owned());
        Machine {
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            cpu_model,
            kernel,
        }
    }
}

/// CPU and RSS of a process over an interval.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    user: f64,
    system: f64,
    /// `syscr`, `syscw` where `/proc/<pid>/io` is readable.
    io: Option<(u64, u64)>,
    at: std::time::Instant,
}

/// How many descriptors process `pid` holds (`/proc/<pid>/fd`), or `None`
/// when it is gone or unreadable.
pub(crate) fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

impl Sample {
    pub(crate) fn take(pid: u32) -> Sample {
        let (user, system) = cpu(pid).unwrap_or((f64::NAN, f64::NAN));
        Sample {
            user,
            system,
            io: syscalls(pid).ok(),
            at: std::time::Instant::now(),
        }
    }

    /// CPU used since `self`: (user seconds, system seconds, share of one core).
    pub(crate) fn since(&self, later: &Sample) -> CpuUse {
        let wall = later.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let user = later.user - self.user;
        let system = later.system - self.system;
        let io = self.io.zip(later.io);
        CpuUse {
            user_s: user,
            system_s: system,
            wall_s: wall,
            share: (user + system) / wall,
            syscr: io.map(|((r0, _), (r1, _))| r1.saturating_sub(r0)),
            syscw: io.map(|((_, w0), (_, w1))| w1.saturating_sub(w0)),
        }
    }
}

/// CPU used over an interval.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub(crate) struct CpuUse {
    pub(crate) user_s: f64,
    pub(crate) system_s: f64,
    pub(crate) wall_s: f64,
    /// (user + system) / wall: 1.0 is one core fully busy.
    pub(crate) share: f64,
    /// Read-class system calls over the interval (see [`syscalls`]).
    pub(crate) syscr: Option<u64>,
    /// Write-class system calls over the interval.
    pub(crate) syscw: Option<u64>,
}

impl CpuUse {
    /// syscr + syscw, where available.
    pub(crate) fn syscalls(&self) -> Option<u64> {
        self.syscr.zip(self.syscw).map(|(r, w)| r + w)
    }

    /// System calls per `n` things (messages, pushes); `None` without a count.
    pub(crate) fn syscalls_per(&self, n: u64) -> Option<f64> {
        self.syscalls()
            .filter(|_| n > 0)
            .map(|c| c as f64 / n as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_cpu_and_rss() {
        let pid = std::process::id();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert_ne!(x, 1);
        let (u, s) = cpu(pid).unwrap();
        assert!(u + s >= 0.0);
        assert!(rss(pid).unwrap() > 1024 * 1024);
        assert!(thread_cpu_seconds().unwrap() >= 0.0);
        let before = Sample::take(pid);
        std::fs::read_to_string("/proc/self/stat").unwrap();
        let used = before.since(&Sample::take(pid));
        assert!(used.syscr.unwrap() >= 1, "the read above counts: {used:?}");
        assert!(Machine::describe().nproc >= 1);
    }
}

/// Steps of [`speed_probe`]'s walk.
const PROBE_STEPS: usize = 4_000_000;
/// Entries of its table: 8 MiB of `u32`, more than this VM's caches hold
/// per core, so a neighbour's cache pressure shows along with a busy core.
const PROBE_ENTRIES: usize = 2 * 1024 * 1024;

/// Nanoseconds per step of a fixed workload run on `core` (the calling
/// thread's cores when `None`): a dependent random walk over 8 MiB mixed
/// with integer arithmetic, the median of three rounds. The same code on
/// the same machine gives the same figure unless the host takes the core,
/// its sibling hyperthread or its caches away, which no guest counter
/// shows; recorded at a run's start and end, it says whether two runs can
/// be compared at all.
pub(crate) fn speed_probe(core: Option<usize>) -> Option<f64> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                if let Some(core) = core {
                    let mut set = nix::sched::CpuSet::new();
                    set.set(core).ok()?;
                    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).ok()?;
                }
                // Sattolo's shuffle: one cycle through every entry, so the
                // walk never settles into a short loop that fits a cache.
                let mut table: Vec<u32> = (0..PROBE_ENTRIES as u32).collect();
                let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
                let mut next = || {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x
                };
                for i in (1..table.len()).rev() {
                    let j = (next() % i as u64) as usize;
                    table.swap(i, j);
                }
                let mut rounds: Vec<f64> = (0..3)
                    .map(|_| {
                        let start = std::time::Instant::now();
                        let (mut at, mut mix) = (0u32, 0u64);
                        for _ in 0..PROBE_STEPS {
                            at = table[at as usize];
                            mix = mix.rotate_left(5) ^ u64::from(at).wrapping_mul(0x9E37_79B9);
                        }
                        std::hint::black_box(mix);
                        start.elapsed().as_nanos() as f64 / PROBE_STEPS as f64
                    })
                    .collect();
                rounds.sort_by(f64::total_cmp);
                rounds.get(1).copied()
            })
            .join()
            .ok()
            .flatten()
    })
}

/// [`speed_probe`] on the server's and the generator's cores.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub(crate) struct Speed {
    pub(crate) server_ns: Option<f64>,
    pub(crate) generator_ns: Option<f64>,
}

impl Speed {
    /// On the `(server, generator)` cores when pinned, else twice on the
    /// cores this process may use.
    pub(crate) fn probe(pinned: Option<(usize, usize)>) -> Speed {
        Speed {
            server_ns: speed_probe(pinned.map(|(s, _)| s)),
            generator_ns: speed_probe(pinned.map(|(_, g)| g)),
        }
    }
}
