//! The one way tests start `herald` processes.
//!
//! [`Herald`] describes a run of the binary in one role; [`Herald::start`]
//! (or the shortcut [`Herald::spawn`]) starts it as a [`HeraldProcess`]:
//!
//! - stdout and stderr go to `<dir>/<name>.out` and `<name>.err`, and
//!   `TMPDIR` points into `<dir>` too, so a killed process leaves nothing in
//!   the system temp dir;
//! - the test bed's `HERALD_*` variables are not passed on (they would
//!   switch backends on); `RUST_LOG` is `warn` unless set with [`Herald::env`];
//! - waits ([`HeraldProcess::wait_for_port`], [`HeraldProcess::wait_until`])
//!   fail at once, with the process's log, when it exits;
//! - [`HeraldProcess::stop`] sends SIGTERM and waits; dropping the handle
//!   sends SIGKILL. Both go to the child's own pid, never to a name.
//!
//! The binary comes from the caller: `env!("CARGO_BIN_EXE_herald")` exists
//! only inside the herald package's tests.

use std::ffi::OsString;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::net::{TcpStream, ToSocketAddrs};

/// How often waits look again.
const POLL: Duration = Duration::from_millis(50);

/// A run of the `herald` binary in one role, not started yet.
#[derive(Debug, Clone)]
pub struct Herald {
    binary: PathBuf,
    role: String,
    args: Vec<OsString>,
    name: String,
    dir: Option<PathBuf>,
    env: Vec<(OsString, OsString)>,
    keep_herald_env: bool,
    nofile: Option<u64>,
}

impl Herald {
    /// `binary role`, with no further arguments yet.
    pub fn new(binary: impl Into<PathBuf>, role: &str) -> Herald {
        Herald {
            binary: binary.into(),
            role: role.to_owned(),
            args: Vec::new(),
            name: role.to_owned(),
            dir: None,
            env: Vec::new(),
            keep_herald_env: false,
            nofile: None,
        }
    }

    /// Starts `binary role args...` with every default.
    ///
    /// # Errors
    /// As [`Herald::start`].
    pub fn spawn<I, S>(
        binary: impl Into<PathBuf>,
        role: &str,
        args: I,
    ) -> anyhow::Result<HeraldProcess>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        Herald::new(binary, role).args(args).start()
    }

    /// One more argument.
    #[must_use]
    pub fn arg(mut self, arg: impl Into<OsString>) -> Herald {
        self.args.push(arg.into());
        self
    }

    /// More arguments.
    #[must_use]
    pub fn args<I, S>(mut self, args: I) -> Herald
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The name in log file names and messages; the role by default.
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Herald {
        self.name = name.into();
        self
    }

    /// Where the logs go and `TMPDIR` points (created if missing); by
    /// default a fresh directory under the system temp dir.
    #[must_use]
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Herald {
        self.dir = Some(dir.into());
        self
    }

    /// Sets an environment variable (after the `HERALD_*` ones are removed).
    #[must_use]
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Herald {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Passes the test process's `HERALD_*` variables on.
    #[must_use]
    pub fn keep_herald_env(mut self) -> Herald {
        self.keep_herald_env = true;
        self
    }

    /// Runs the process under `ulimit -n limit`.
    #[must_use]
    pub fn nofile(mut self, limit: u64) -> Herald {
        self.nofile = Some(limit);
        self
    }

    fn command(&self) -> Command {
        let mut command = match self.nofile {
            None => Command::new(&self.binary),
            Some(limit) => {
                // `exec` keeps the pid: the handle's pid is herald's.
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                    .arg(&self.binary);
                sh
            }
        };
        command.arg(&self.role).args(&self.args);
        if !self.keep_herald_env {
            for (key, _) in std::env::vars_os() {
                if key.to_string_lossy().starts_with("HERALD_") {
                    command.env_remove(key);
                }
            }
        }
        command.env("RUST_LOG", "warn");
        for (key, value) in &self.env {
            command.env(key, value);
        }
        command.stdin(Stdio::null());
        command
    }

    fn log_dir(&self) -> anyhow::Result<PathBuf> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = match &self.dir {
            Some(dir) => dir.clone(),
            None => std::env::temp_dir().join("herald-testkit").join(format!(
                "{}-{}-{}",
                self.name,
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            )),
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(dir)
    }

    /// Starts the process.
    ///
    /// # Errors
    /// The log directory or files cannot be created, or the binary cannot be
    /// started.
    pub fn start(self) -> anyhow::Result<HeraldProcess> {
        let dir = self.log_dir()?;
        let stdout = dir.join(format!("{}.out", self.name));
        let stderr = dir.join(format!("{}.err", self.name));
        let mut command = self.command();
        command
            .env("TMPDIR", &dir)
            .stdout(std::fs::File::create(&stdout)?)
            .stderr(std::fs::File::create(&stderr)?);
        let child = command
            .spawn()
            .with_context(|| format!("start herald {} ({})", self.role, self.binary.display()))?;
        Ok(HeraldProcess {
            name: self.name,
            child,
            reaped: None,
            stdout,
            stderr,
        })
    }

    /// Runs the process to its end and returns what it printed (for
    /// one-shot roles such as `crdgen`).
    ///
    /// # Errors
    /// The binary cannot be started.
    pub fn output(self) -> anyhow::Result<Output> {
        let dir = self.log_dir()?;
        self.command()
            .env("TMPDIR", &dir)
            .output()
            .with_context(|| format!("run herald {}", self.role))
    }
}

/// A running `herald` process. Dropping it kills it (SIGKILL to its pid)
/// and reaps it; the logs are printed first when the test is panicking.
#[derive(Debug)]
pub struct HeraldProcess {
    name: String,
    child: Child,
    /// Set once the process has been waited for.
    reaped: Option<ExitStatus>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl HeraldProcess {
    /// The name given with [`Herald::name`] (the role by default).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where its stdout and stderr go.
    pub fn log_paths(&self) -> [&Path; 2] {
        [&self.stdout, &self.stderr]
    }

    /// What it wrote to stderr so far (the tracing log).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// What it wrote to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Both logs, each under a header naming its file.
    pub fn logs(&self) -> String {
        self.log_paths()
            .iter()
            .map(|path| {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                format!("----- {} -----\n{text}", path.display())
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Prints [`HeraldProcess::logs`] to stderr (the test's output).
    pub fn print_logs(&self) {
        eprintln!("{}", self.logs());
    }

    /// Its exit status, if it has exited.
    ///
    /// # Errors
    /// The status cannot be read.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.reaped.is_none() {
            self.reaped = self.child.try_wait()?;
        }
        Ok(self.reaped)
    }

    /// Fails, with its stderr, when the process has exited.
    ///
    /// # Errors
    /// It has exited (or its status cannot be read).
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        match self.try_wait()? {
            Some(status) => bail!(
                "herald {} exited early ({status}); its stderr:\n{}",
                self.name,
                self.stderr()
            ),
            None => Ok(()),
        }
    }

    /// Polls `probe` until it returns `Some`, checking in between that the
    /// process still runs; at most `within`.
    ///
    /// # Errors
    /// The process exits, `probe` fails, or `within` passes; named `what`.
    pub async fn wait_until<T, F, Fut>(
        &mut self,
        within: Duration,
        what: &str,
        mut probe: F,
    ) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = anyhow::Result<Option<T>>>,
    {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            self.check_running()
                .with_context(|| format!("waiting for {what}"))?;
            if let Some(value) = probe().await? {
                return Ok(value);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "herald {}: no {what} within {within:?}; its stderr:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until `addr` accepts a TCP connection.
    ///
    /// # Errors
    /// As [`HeraldProcess::wait_until`].
    pub async fn wait_for_port<A>(&mut self, addr: A, within: Duration) -> anyhow::Result<()>
    where
        A: ToSocketAddrs + Copy + Debug,
    {
        let what = format!("listener on {addr:?}");
        self.wait_until(within, &what, || async move {
            Ok(TcpStream::connect(addr).await.ok().map(drop))
        })
        .await
    }

    /// SIGKILL to its pid, then reaps it. Nothing of its shutdown runs.
    ///
    /// # Errors
    /// The signal cannot be sent or the process not reaped.
    pub fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        self.child.kill()?;
        let status = self.child.wait()?;
        self.reaped = Some(status);
        Ok(status)
    }

    /// SIGTERM to its pid, then waits up to `within` for it to exit; kills
    /// it if it does not.
    ///
    /// # Errors
    /// It does not exit in time, or the signal cannot be sent.
    pub async fn stop(&mut self, within: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        let pid = i32::try_from(self.pid()).context("pid out of range")?;
        kill(Pid::from_raw(pid), Signal::SIGTERM).context("send SIGTERM")?;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if tokio::time::Instant::now() >= deadline {
                self.kill()?;
                bail!(
                    "herald {} did not stop within {within:?} of SIGTERM; its stderr:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for HeraldProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        if self.reaped.is_none() {
            // The child is not reaped yet, so its pid is still its own.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
