//! The server under test: a real `herald comet` process started by the tool,
//! pinned to its own core, pointed at the stub logic, stopped by its pid.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::proc;
use herald_runtime::grpc_auth::{Token, TokenSource};

/// Why the server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No free loopback port could be reserved.
    #[error("cannot reserve a loopback port")]
    Port(#[source] std::io::Error),
    /// The log file could not be created.
    #[error("cannot create {path:?}")]
    Log {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The process could not be spawned.
    #[error("cannot start {binary:?}")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The process exited or never listened.
    #[error("comet did not come up within {0:?} (see {1:?})")]
    NotReady(Duration, PathBuf),
}

/// Result with this module's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A loopback address nothing listens on, for a server this tool starts:
/// [`herald_runtime::listen::try_free_port_on`], which keeps clear of the source ports
/// the generator's thousands of connections take.
pub(crate) fn free_port() -> Result<SocketAddr> {
    let ip = std::net::Ipv4Addr::LOCALHOST;
    herald_runtime::listen::try_free_port_on(ip.into())
        .map(|port| SocketAddr::from((ip, port)))
        .map_err(Error::Port)
}

/// A running comet.
#[derive(Debug)]
pub(crate) struct Comet {
    child: Child,
    pub(crate) pid: u32,
    pub(crate) tcp: SocketAddr,
    pub(crate) ws: SocketAddr,
    pub(crate) grpc: SocketAddr,
    /// The admin HTTP listener (`/metrics`).
    pub(crate) http: SocketAddr,
}

/// A command running `binary`, pinned to `core` with `taskset` when given,
/// and killed by the kernel when the tool dies: the tool stops its servers
/// in `Drop`, which a signal (Ctrl-C, a CI timeout) skips, and a comet left
/// behind would hold its ports and a core. `setpriv --pdeathsig` sets that
/// up in the child and `exec`s, so the pid stays the server's (no `unsafe`
/// `pre_exec` here: the workspace forbids it). util-linux, like `taskset`;
/// without it the servers start unguarded.
pub(crate) fn child_command(binary: &Path, core: Option<usize>) -> Command {
    let mut argv: Vec<std::ffi::OsString> = Vec::new();
    if has_setpriv() {
        argv.extend(["setpriv", "--pdeathsig", "KILL", "--"].map(Into::into));
    }
    if let Some(core) = core {
        argv.extend(["taskset".into(), "-c".into(), core.to_string().into()]);
    }
    argv.push(binary.into());
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    cmd
}

/// Whether `setpriv` is on `PATH` (looked up once).
fn has_setpriv() -> bool {
    static FOUND: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FOUND.get_or_init(|| {
        std::env::var_os("PATH").is_some_and(|path| {
            std::env::split_paths(&path).any(|dir| dir.join("setpriv").is_file())
        })
    })
}

/// `binary` (a herald binary; the role and flags are for the caller to add),
/// run by [`child_command`], stdin closed, stdout and stderr into `log`,
/// logging at `HERALD_BENCH_COMET_LOG` (default `warn`).
pub(crate) fn server_command(binary: &Path, core: Option<usize>, log: &Path) -> Result<Command> {
    let log_error = |source| Error::Log {
        path: log.to_owned(),
        source,
    };
    let file = std::fs::File::create(log).map_err(log_error)?;
    let err_file = file.try_clone().map_err(log_error)?;
    let mut cmd = child_command(binary, core);
    cmd.env(
        "RUST_LOG",
        std::env::var("HERALD_BENCH_COMET_LOG").unwrap_or_else(|_| "warn".to_owned()),
    )
    .stdin(Stdio::null())
    .stdout(file)
    .stderr(err_file);
    Ok(cmd)
}

impl Comet {
    /// Starts `binary comet` on loopback ports, pinned to `core` with
    /// `taskset` when given, logging to `log_dir/comet-<n>.log`.
    pub(crate) fn start(
        binary: &Path,
        core: Option<usize>,
        logic: SocketAddr,
        server_id: &str,
        log_dir: &Path,
        extra: &[String],
    ) -> Result<Comet> {
        let (tcp, ws, grpc, http) = (free_port()?, free_port()?, free_port()?, free_port()?);
        let log = log_dir.join(format!("comet-{}.log", tcp.port()));
        let mut cmd = server_command(binary, core, &log)?;
        cmd.arg("comet")
            .args(["--tcp-addr", &tcp.to_string()])
            .args(["--ws-addr", &ws.to_string()])
            .args(["--grpc-addr", &grpc.to_string()])
            .args(["--http-addr", &http.to_string()])
            .args(["--logic-addr", &format!("http://{logic}")])
            .args(["--server-id", server_id])
            .args(extra);
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            binary: binary.to_owned(),
            source,
        })?;
        // taskset execs the program, so the child's pid is comet's.
        let pid = child.id();
        let mut comet = Comet {
            child,
            pid,
            tcp,
            ws,
            grpc,
            http,
        };
        let deadline = Duration::from_secs(20);
        let start = Instant::now();
        loop {
            let up = [tcp, ws, grpc].iter().all(|addr| {
                std::net::TcpStream::connect_timeout(addr, Duration::from_millis(200)).is_ok()
            });
            if up {
                return Ok(comet);
            }
            if start.elapsed() > deadline || matches!(comet.child.try_wait(), Ok(Some(_))) {
                comet.stop();
                return Err(Error::NotReady(deadline, log));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// RSS in bytes.
    pub(crate) fn rss(&self) -> u64 {
        proc::rss(self.pid).unwrap_or(0)
    }

    /// A CPU sample to diff later.
    pub(crate) fn sample(&self) -> proc::Sample {
        proc::Sample::take(self.pid)
    }

    /// Kills the process (by its pid, through the child handle) and reaps it.
    pub(crate) fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Comet {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The shared gRPC token of the servers the benchmark starts: the flags
/// that hand it to each of them, and the token its own gRPC calls carry.
/// Off unless `--grpc-token-file` or `--grpc-token` is given.
#[derive(Debug, Clone, Default)]
pub(crate) struct GrpcToken {
    /// What the benchmark's own calls carry.
    pub(crate) token: Token,
    /// `--grpc-token-file PATH` or `--grpc-token TOKEN`, or nothing.
    pub(crate) flags: Vec<String>,
}

impl GrpcToken {
    /// The token `source` names, started (a file is read and watched).
    ///
    /// # Errors
    /// An unusable token file or token.
    pub(crate) fn start(
        source: &TokenSource,
    ) -> Result<GrpcToken, herald_runtime::grpc_auth::Error> {
        let flags = match source {
            TokenSource::Off => Vec::new(),
            TokenSource::Literal(token) => vec!["--grpc-token".to_owned(), token.clone()],
            TokenSource::File(path) => {
                vec!["--grpc-token-file".to_owned(), path.display().to_string()]
            }
        };
        Ok(GrpcToken {
            token: source.start()?,
            flags,
        })
    }
}
