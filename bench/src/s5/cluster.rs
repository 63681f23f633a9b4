//! S5's setup: the logic and job processes ([`Server`]), the Kafka topics,
//! and the three servers started on one fresh topic ([`Cluster`]), job
//! finding comet through a node-list file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use serde_json::json;

use super::{Error, PARTITIONS, Result, Services, WAIT};
use crate::inject::LogicHttp;
use crate::proc::Sample;
use crate::server::Comet;

fn free_port() -> Result<SocketAddr> {
    crate::server::free_port()
        .map_err(|err| Error::Process(format!("cannot reserve a loopback port: {err}")))
}

/// A logic or job process, pinned like comet, killed by its pid on drop.
#[derive(Debug)]
struct Server {
    name: &'static str,
    child: Child,
    pid: u32,
    log: PathBuf,
}

impl Server {
    fn start(
        binary: &Path,
        core: Option<usize>,
        name: &'static str,
        args: &[String],
        log_dir: &Path,
    ) -> Result<Server> {
        let log = log_dir.join(format!("s5-{name}.log"));
        let mut cmd = crate::server::server_command(binary, core, &log)?;
        cmd.arg(name).args(args);
        // Only the flags configure it: the caller's HERALD_* variables (the
        // test bed's, say) must not add settings behind the benchmark's back.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("HERALD_") {
                cmd.env_remove(key);
            }
        }
        let child = cmd
            .spawn()
            .map_err(|err| Error::Process(format!("cannot start {binary:?} {name}: {err}")))?;
        // taskset execs the program, so the child's pid is the server's.
        let pid = child.id();
        Ok(Server {
            name,
            child,
            pid,
            log,
        })
    }

    /// Waits until every address accepts, failing early if the process exits.
    async fn wait_accepts(&mut self, addrs: &[SocketAddr]) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        for addr in addrs {
            loop {
                if let Ok(Some(status)) = self.child.try_wait() {
                    return Err(Error::Process(format!(
                        "herald {} exited ({status}); see {:?}",
                        self.name, self.log
                    )));
                }
                if tokio::net::TcpStream::connect(addr).await.is_ok() {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(Error::Process(format!(
                        "herald {} does not accept on {addr}; see {:?}",
                        self.name, self.log
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn admin(brokers: &str) -> Result<AdminClient<DefaultClientContext>> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(|e| Error::Kafka(format!("admin client: {e}")))
}

pub(crate) async fn create_topics(brokers: &str, topics: &[&str]) -> Result<()> {
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, PARTITIONS, TopicReplication::Fixed(1)))
        .collect();
    let results = admin(brokers)?
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .map_err(|e| Error::Kafka(format!("create topics: {e}")))?;
    for result in results {
        result.map_err(|(name, code)| Error::Kafka(format!("create topic {name}: {code}")))?;
    }
    Ok(())
}

pub(crate) async fn delete_topics(brokers: &str, topics: &[&str]) {
    if let Ok(admin) = admin(brokers) {
        let _ = admin.delete_topics(topics, &AdminOptions::new()).await;
    }
}

/// Logic, job and comet on one fresh topic.
#[derive(Debug)]
pub(crate) struct Cluster {
    logic: Server,
    job: Server,
    pub(crate) comet: Comet,
    pub(crate) http: LogicHttp,
}

impl Cluster {
    /// Starts the three on `topic`; comet also gets `comet_flags` (the
    /// soak's small queues), every role the gRPC token's flags.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn start(
        binary: &Path,
        core: Option<usize>,
        services: &Services,
        topic: &str,
        run_id: &str,
        out: &Path,
        grpc_flags: &[String],
        comet_flags: &[String],
    ) -> Result<Cluster> {
        let (logic_http, logic_grpc, job_http) = (free_port()?, free_port()?, free_port()?);
        let server_id = format!("bench-{run_id}");
        // Every role gets the gRPC token flags, if any.
        let arg = |list: &[&str]| {
            let list = list.iter().map(|s| (*s).to_owned());
            list.chain(grpc_flags.iter().cloned()).collect::<Vec<_>>()
        };
        let mut logic = Server::start(
            binary,
            core,
            "logic",
            &arg(&[
                "--http-addr",
                &logic_http.to_string(),
                "--grpc-addr",
                &logic_grpc.to_string(),
                "--redis-url",
                &services.redis,
                "--kafka-brokers",
                &services.kafka,
                "--kafka-topic",
                topic,
            ]),
            out,
        )?;
        logic.wait_accepts(&[logic_http, logic_grpc]).await?;
        let comet_args: Vec<String> = comet_flags.iter().chain(grpc_flags).cloned().collect();
        let comet = Comet::start(binary, core, logic_grpc, &server_id, out, &comet_args)?;
        // Job finds comet through a node list file, as in a deployment
        // without the operator.
        let nodes = out.join(format!("s5-nodes-{run_id}.json"));
        let list = json!({
            "generation": 1,
            "updated": crate::report::now_utc(),
            "nodes": [{
                "name": server_id,
                "grpc": comet.grpc.to_string(),
                "hosts": ["127.0.0.1"],
                "addrs": ["127.0.0.1"],
                "tcp_port": comet.tcp.port(),
                "ws_port": comet.ws.port(),
                "wss_port": 0,
                "weight": 10,
                "connections": 0,
                "client_ips": 0,
                "draining": false
            }]
        });
        std::fs::write(&nodes, list.to_string()).map_err(|source| Error::Write {
            path: nodes.clone(),
            source,
        })?;
        let mut job = Server::start(
            binary,
            core,
            "job",
            &arg(&[
                "--kafka-brokers",
                &services.kafka,
                "--kafka-topic",
                topic,
                "--kafka-group",
                &format!("herald-bench-job-{run_id}"),
                "--node-list",
                &nodes.display().to_string(),
                "--http-addr",
                &job_http.to_string(),
            ]),
            out,
        )?;
        job.wait_accepts(&[job_http]).await?;
        // Ready = partitions assigned: pushes before that would wait for the
        // group to form and show up as latency.
        let admin_http = LogicHttp::new(job_http);
        let deadline = Instant::now() + WAIT;
        while admin_http.get_status("/readyz").await != Ok(200) {
            if Instant::now() > deadline {
                return Err(Error::Process(format!(
                    "herald job not ready within {WAIT:?}; see {:?}",
                    job.log
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Cluster {
            logic,
            job,
            comet,
            http: LogicHttp::new(logic_http),
        })
    }

    pub(crate) fn pids(&self) -> [u32; 3] {
        [self.logic.pid, self.job.pid, self.comet.pid]
    }

    pub(super) fn samples(&self) -> [Sample; 3] {
        [
            Sample::take(self.logic.pid),
            Sample::take(self.job.pid),
            self.comet.sample(),
        ]
    }
}
