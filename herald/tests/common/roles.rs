//! Herald's roles as processes of this build, on free loopback ports: the
//! launch every multi-process test shares (which flags a comet, logic and
//! job need to find each other), so each test writes only what it varies.

use std::path::Path;
use std::time::Duration;

use herald_e2e::free_port;
use herald_testkit::{Herald, HeraldProcess};

/// `127.0.0.1:port`.
pub(crate) fn loopback(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// `herald <role>` of this build, named `name` in its logs' file names,
/// logging into `dir`.
pub(crate) fn herald(role: &str, name: &str, dir: &Path) -> Herald {
    Herald::new(env!("CARGO_BIN_EXE_herald"), role)
        .name(name)
        .dir(dir)
}

fn strings<const N: usize>(args: [&str; N]) -> Vec<String> {
    args.into_iter().map(str::to_owned).collect()
}

/// A logic process's ports.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LogicPorts {
    /// The push API (and `/metrics`).
    pub(crate) http: u16,
    /// `goim.logic.Logic`, which comets call.
    pub(crate) grpc: u16,
}

impl LogicPorts {
    pub(crate) fn free() -> LogicPorts {
        LogicPorts {
            http: free_port(),
            grpc: free_port(),
        }
    }

    /// Logic's flags: these ports, routes in `redis`, pushes to `topic`
    /// on `brokers`.
    pub(crate) fn args(&self, redis: &str, brokers: &str, topic: &str) -> Vec<String> {
        strings([
            "--http-addr",
            &loopback(self.http),
            "--grpc-addr",
            &loopback(self.grpc),
            "--redis-url",
            redis,
            "--kafka-brokers",
            brokers,
            "--kafka-topic",
            topic,
        ])
    }
}

/// A comet process's ports.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CometPorts {
    pub(crate) tcp: u16,
    pub(crate) ws: u16,
    /// Its gRPC services (goim's Comet, CometPush, CometAdmin).
    pub(crate) grpc: u16,
    /// Its admin listener (`/metrics`, `/readyz`).
    pub(crate) http: u16,
}

impl CometPorts {
    pub(crate) fn free() -> CometPorts {
        CometPorts {
            tcp: free_port(),
            ws: free_port(),
            grpc: free_port(),
            http: free_port(),
        }
    }

    /// Comet's flags: its server id, the logic gRPC port it calls, these
    /// ports.
    pub(crate) fn args(&self, server_id: &str, logic_grpc: u16) -> Vec<String> {
        strings([
            "--server-id",
            server_id,
            "--logic-addr",
            &loopback(logic_grpc),
            "--tcp-addr",
            &loopback(self.tcp),
            "--ws-addr",
            &loopback(self.ws),
            "--grpc-addr",
            &loopback(self.grpc),
            "--http-addr",
            &loopback(self.http),
        ])
    }

    /// Every port, for waiting until all accept.
    pub(crate) fn all(&self) -> [u16; 4] {
        [self.tcp, self.ws, self.grpc, self.http]
    }
}

/// Job's flags: consumer group `group` on `topic` at `brokers`, admin
/// listener on `http`. Where the comets are (`--node-list`, `--comet`) is
/// the caller's.
pub(crate) fn job_args(brokers: &str, topic: &str, group: &str, http: u16) -> Vec<String> {
    strings([
        "--kafka-brokers",
        brokers,
        "--kafka-topic",
        topic,
        "--kafka-group",
        group,
        "--http-addr",
        &loopback(http),
    ])
}

/// The processes of one test, each killed (by its pid) and reaped when the
/// set is dropped.
#[derive(Debug, Default)]
pub(crate) struct Procs(pub(crate) Vec<HeraldProcess>);

impl Procs {
    /// Starts `herald` and waits, up to `within` each, until every one of
    /// `ports` on loopback accepts; the process is kept even when the wait
    /// fails, so its logs can be printed.
    pub(crate) async fn start(
        &mut self,
        herald: Herald,
        ports: &[u16],
        within: Duration,
    ) -> anyhow::Result<&mut HeraldProcess> {
        self.0.push(herald.start()?);
        let process = self.0.last_mut().expect("just pushed");
        for &port in ports {
            process.wait_for_port(("127.0.0.1", port), within).await?;
        }
        Ok(process)
    }

    /// An error naming the first process that has exited.
    pub(crate) fn check_running(&mut self) -> anyhow::Result<()> {
        self.0.iter_mut().try_for_each(HeraldProcess::check_running)
    }

    /// Every process's output, for a failed test.
    pub(crate) fn print_logs(&self) {
        self.0.iter().for_each(HeraldProcess::print_logs);
    }
}

/// A `herald standalone`'s ports.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StandalonePorts {
    pub(crate) tcp: u16,
    pub(crate) ws: u16,
    /// The comet's gRPC services.
    pub(crate) grpc: u16,
    /// Logic's push API.
    pub(crate) http: u16,
    /// Logic's gRPC port (the comet calls it over loopback).
    pub(crate) logic_grpc: u16,
    /// The comet's admin listener (`/metrics`).
    pub(crate) comet_http: u16,
}

impl StandalonePorts {
    pub(crate) fn free() -> StandalonePorts {
        StandalonePorts {
            tcp: free_port(),
            ws: free_port(),
            grpc: free_port(),
            http: free_port(),
            logic_grpc: free_port(),
            comet_http: free_port(),
        }
    }

    /// Standalone's flags for these ports, every one named: two
    /// standalones at once would otherwise share a default.
    pub(crate) fn args(&self) -> Vec<String> {
        strings([
            "--tcp-addr",
            &loopback(self.tcp),
            "--ws-addr",
            &loopback(self.ws),
            "--grpc-addr",
            &loopback(self.grpc),
            "--http-addr",
            &loopback(self.http),
            "--logic-grpc-addr",
            &loopback(self.logic_grpc),
            "--comet-http-addr",
            &loopback(self.comet_http),
        ])
    }
}
