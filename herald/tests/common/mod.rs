//! What more than one of herald's test binaries needs and herald-testkit
//! cannot hold (testkit depends on no component crate). Each binary uses
//! part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use herald_testkit::stub::StubLogic;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

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
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<herald_comet::Result<()>>,
}

impl LocalComet {
    pub(crate) async fn start(name: &str) -> anyhow::Result<LocalComet> {
        let logic = StubLogic::recording();
        let logic_addr = logic.serve().await?;
        let mut config = herald_comet::Config::new(name, logic_addr.to_string());
        config.renew_online_interval = Duration::from_secs(3600);
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
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(herald_comet::run(config, listeners, async {
            let _ = stopped.await;
        }));
        Ok(LocalComet {
            name: name.to_owned(),
            tcp,
            ws,
            grpc,
            logic,
            stop: Some(stop),
            task,
        })
    }
}

impl Drop for LocalComet {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}
