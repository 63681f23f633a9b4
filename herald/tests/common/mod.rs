//! What more than one of herald's test binaries needs and herald-testkit
//! cannot hold (testkit depends on no component crate). Each binary uses
//! part of it.
//!
//! Here: a role or the operator run in this process with a stop signal
//! ([`Stoppable`]), an in-process comet ([`LocalComet`]) and Kafka topics
//! ([`create_topic`]), logic's HTTP API ([`logic_call`]), a metric's value ([`metric_sample`]). By subject: [`job`] (job against the real Kafka),
//! [`goim`] (clients that follow op 18), [`k8s`] (the test bed's apiserver: namespaces, the loopback kubelet),
//! [`operator`] (the operator in this process, PushCluster status and
//! children), [`roles`] (comet, logic and job as processes of this build on
//! free loopback ports).
#![allow(dead_code)]

pub(crate) mod goim;
pub(crate) mod job;
pub(crate) mod k8s;
pub(crate) mod operator;
pub(crate) mod roles;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use anyhow::Context;

use herald_testkit::stub::StubLogic;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A task spawned with a stop signal (a role's `run`, the operator's
/// `lead`): [`Stoppable::stop`] tells it and waits for a clean end; dropped,
/// it is told and aborted.
pub(crate) struct Stoppable<E> {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), E>>,
}

/// The shutdown signal a [`Stoppable`] task gets.
pub(crate) type Stopped = Pin<Box<dyn Future<Output = ()> + Send>>;

impl<E: std::error::Error + Send + Sync + 'static> Stoppable<E> {
    /// Spawns what `run` returns, handing it the shutdown signal.
    pub(crate) fn spawn<F>(run: impl FnOnce(Stopped) -> F) -> Stoppable<E>
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(Box::pin(async move {
            let _ = stopped.await;
        })));
        Stoppable {
            stop: Some(stop),
            task,
        }
    }

    /// Tells the task to stop, without waiting.
    pub(crate) fn signal(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Tells the task to stop and waits, up to `within`, for it to end
    /// without an error.
    pub(crate) async fn stop(&mut self, within: Duration) -> anyhow::Result<()> {
        self.signal();
        tokio::time::timeout(within, &mut self.task)
            .await
            .with_context(|| format!("did not stop within {within:?}"))???;
        Ok(())
    }
}

impl<E> Drop for Stoppable<E> {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

/// A comet in this process (`herald_comet::run` on 127.0.0.1:0, no admin
/// HTTP, RenewOnline hourly) against its own recording stub logic; stopped
/// when dropped.
pub(crate) struct LocalComet {
    /// Its server id.
    pub(crate) name: String,
    /// Raw TCP clients.
    pub(crate) tcp: SocketAddr,
    /// WebSocket clients (`ws://{ws}/sub`).
    pub(crate) ws: SocketAddr,
    /// Its gRPC services (goim's Comet, Herald's CometPush and CometAdmin).
    pub(crate) grpc: SocketAddr,
    /// The logic it calls.
    pub(crate) logic: StubLogic,
    pub(crate) task: Stoppable<herald_comet::Error>,
}

impl LocalComet {
    pub(crate) async fn start(name: &str) -> anyhow::Result<LocalComet> {
        LocalComet::start_with(name, |_| {}).await
    }

    /// [`LocalComet::start`] with its settings changed by `configure`.
    pub(crate) async fn start_with(
        name: &str,
        configure: impl FnOnce(&mut herald_comet::Config),
    ) -> anyhow::Result<LocalComet> {
        let logic = StubLogic::recording();
        let logic_addr = logic.serve().await?;
        let mut config = herald_comet::Config::new(name, logic_addr.to_string());
        config.renew_online_interval = Duration::from_secs(3600);
        configure(&mut config);
        let listeners = herald_comet::Listeners {
            tcp: TcpListener::bind("127.0.0.1:0").await?,
            ws: TcpListener::bind("127.0.0.1:0").await?,
            wss: None,
            grpc: TcpListener::bind("127.0.0.1:0").await?,
            http: None,
        };
        let tcp = listeners.tcp.local_addr()?;
        let ws = listeners.ws.local_addr()?;
        let grpc = listeners.grpc.local_addr()?;
        let task = Stoppable::spawn(|stopped| herald_comet::run(config, listeners, stopped));
        Ok(LocalComet {
            name: name.to_owned(),
            tcp,
            ws,
            grpc,
            logic,
            task,
        })
    }
}

/// Creates `topic` with `partitions` (replication 1) on `brokers`; bounded
/// by 20 s.
pub(crate) async fn create_topic(
    brokers: &str,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let results = tokio::time::timeout(
        Duration::from_secs(20),
        admin.create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        ),
    )
    .await??;
    for result in results {
        result.map_err(|(name, code)| anyhow::anyhow!("create topic {name}: {code}"))?;
    }
    Ok(())
}

/// One request to logic's HTTP API, with `Authorization: Bearer {key}` when
/// there is a key: the JSON answer of a 200 with `"code":0`, else an error
/// naming the answer.
pub(crate) async fn logic_call(
    addr: impl tokio::net::ToSocketAddrs,
    key: Option<&str>,
    method: &str,
    path: &str,
    body: &[u8],
) -> anyhow::Result<serde_json::Value> {
    let bearer = key.map(|key| format!("Bearer {key}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|bearer| ("Authorization", bearer.as_str()))
        .collect();
    let response = herald_testkit::http::request_with(addr, method, path, &headers, body).await?;
    anyhow::ensure!(
        response.status == 200 && response.body.contains("\"code\":0"),
        "{method} {path}: {response:?}"
    );
    Ok(serde_json::from_str(&response.body)?)
}

/// The value of one sample line (`name{labels} value`, labels as the
/// server writes them) in a Prometheus metrics text.
pub(crate) fn metric_sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}
