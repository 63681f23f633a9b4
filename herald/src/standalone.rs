//! `herald standalone`: comet, logic and job in one process.
//!
//! Logic hands push records to job through an in-process queue and keeps
//! routes in memory, so nothing else is needed; `--redis` and `--kafka`
//! switch either side to the real backend (then several processes can share
//! them, as in a cluster). The node list is this one comet: job gets it as a
//! static comet, logic as an in-memory node list.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use herald_logic::queue::PushQueue;
use herald_logic::store::SessionStore;
use herald_runtime::nodes::{Node, NodeList, Source};
use herald_runtime::{Shutdown, listen};
use tokio::net::TcpListener;
use tracing::info;

/// `herald standalone` flags; every port is goim's default.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Args {
    /// Raw TCP client listener.
    #[arg(long, env = "HERALD_COMET_TCP_ADDR", default_value = "0.0.0.0:3101")]
    tcp_addr: SocketAddr,
    /// WebSocket client listener (`/sub`).
    #[arg(long, env = "HERALD_COMET_WS_ADDR", default_value = "0.0.0.0:3102")]
    ws_addr: SocketAddr,
    /// Comet gRPC listener (`goim.comet.Comet`, called by job, and the admin
    /// `Drain`). Internal: whoever reaches it can push to any client or drain
    /// the comet, so it listens on loopback unless told otherwise.
    #[arg(long, env = "HERALD_COMET_GRPC_ADDR", default_value = "127.0.0.1:3109")]
    grpc_addr: SocketAddr,
    /// Logic's HTTP push API.
    #[arg(long, env = "HERALD_LOGIC_HTTP_ADDR", default_value = "0.0.0.0:3111")]
    http_addr: SocketAddr,
    /// Logic's gRPC listener (`goim.logic.Logic`, called by comet).
    /// Internal, like `--grpc-addr`: loopback unless told otherwise.
    #[arg(long, env = "HERALD_LOGIC_GRPC_ADDR", default_value = "127.0.0.1:3119")]
    logic_grpc_addr: SocketAddr,
    /// The comet's admin HTTP listener (`/metrics` with the comet's refusal
    /// counters, `/healthz`, `/readyz`), as `herald comet` serves it;
    /// `none`: not served. Logic's are on `--http-addr`.
    #[arg(long, env = "HERALD_COMET_HTTP_ADDR", default_value = "0.0.0.0:3190")]
    comet_http_addr: herald_logic::OptionalAddr,
    /// Logic's client-facing listener (node list and room counts, no API
    /// key, CORS), e.g. `0.0.0.0:3112`; `none`: not served.
    #[arg(long, env = "HERALD_LOGIC_CLIENT_ADDR", default_value = "none")]
    client_addr: herald_logic::OptionalAddr,
    /// Who may call the client listener: `none` or `token` (a client token).
    #[arg(
        long,
        env = "HERALD_LOGIC_CLIENT_AUTH",
        value_enum,
        default_value = "none"
    )]
    client_auth: herald_logic::ClientAuth,
    /// This comet's server id.
    #[arg(long, env = "HERALD_COMET_SERVER_ID", default_value = "standalone")]
    server_id: String,
    /// Host name / address clients are told to use (`/goim/nodes/weighted`).
    #[arg(long, env = "HERALD_PUBLIC_HOST", default_value = "127.0.0.1")]
    public_host: String,
    /// Keep routes in this Redis instead of memory.
    #[arg(long, env = "HERALD_REDIS_URL")]
    redis: Option<String>,
    /// Send push records through these Kafka brokers instead of memory.
    #[arg(long, env = "HERALD_KAFKA_BROKERS")]
    kafka: Option<String>,
    /// Kafka push topic (with `--kafka`).
    #[arg(long, env = "HERALD_KAFKA_TOPIC", default_value = "goim-push-topic")]
    kafka_topic: String,
    /// Kafka consumer group of the job side (with `--kafka`).
    #[arg(long, env = "HERALD_JOB_GROUP", default_value = "goim-push-group-job")]
    kafka_group: String,
    /// API key required as `Authorization: Bearer <key>` on the HTTP API.
    #[arg(long, env = "HERALD_LOGIC_API_KEY", hide_env_values = true)]
    api_key: Option<herald_runtime::Secret>,
    /// The shared token of the gRPC ports, off by default; given, comet
    /// and logic require it and the roles send it to each other.
    #[command(flatten)]
    grpc_token: herald_runtime::grpc_auth::TokenArgs,
    /// How client tokens are checked: `herald logic`'s flags (goim JSON, or
    /// a signed JWT).
    #[command(flatten)]
    tokens: herald_logic::ClientTokenArgs,
}

/// Records the in-process queue holds before the HTTP API waits.
const QUEUE_CAPACITY: usize = 1024;

/// Runs the three roles until `shutdown`; the first to fail stops the rest.
pub(crate) async fn run(args: Args, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // Destructured so a new flag cannot be silently ignored.
    let Args {
        tcp_addr,
        ws_addr,
        grpc_addr,
        http_addr,
        logic_grpc_addr,
        comet_http_addr,
        client_addr,
        client_auth,
        server_id,
        public_host,
        redis,
        kafka,
        kafka_topic,
        kafka_group,
        api_key,
        grpc_token,
        tokens,
    } = args;
    let grpc_token = grpc_token.source();
    let bind = listen::bind;
    // Client listeners get the comet's deeper accept backlog.
    let bind_client = |addr: SocketAddr| {
        herald_comet::bind_client_listener(addr).with_context(|| format!("binding {addr}"))
    };
    let comet_listeners = herald_comet::Listeners {
        tcp: bind_client(tcp_addr)?,
        ws: bind_client(ws_addr)?,
        wss: None,
        grpc: bind(grpc_addr).await?,
        http: match comet_http_addr.0 {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        },
    };
    let logic_listeners = herald_logic::Listeners {
        http: bind(http_addr).await?,
        grpc: bind(logic_grpc_addr).await?,
        client: match client_addr.0 {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        },
    };
    // The roles reach each other over loopback even when bound to 0.0.0.0.
    let local = |listener: &TcpListener| -> anyhow::Result<SocketAddr> {
        let addr = listener.local_addr()?;
        let ip = if addr.ip().is_unspecified() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            addr.ip()
        };
        Ok(SocketAddr::new(ip, addr.port()))
    };
    let comet_grpc = local(&comet_listeners.grpc)?;
    let logic_grpc = local(&logic_listeners.grpc)?;

    let nodes = NodeList {
        generation: 1,
        updated: String::new(),
        nodes: vec![Node {
            name: server_id.clone(),
            grpc: comet_grpc.to_string(),
            hosts: vec![public_host.clone()],
            addrs: vec![public_host],
            tcp_port: i32::from(comet_listeners.tcp.local_addr()?.port()),
            ws_port: i32::from(comet_listeners.ws.local_addr()?.port()),
            weight: 1,
            ..Node::default()
        }],
        drain: None,
    };

    let mut logic_config = herald_logic::Config::new(
        redis.as_deref().unwrap_or_default(),
        kafka.as_deref().unwrap_or_default(),
        &kafka_topic,
    );
    logic_config.node_list = Some(Source::Memory(nodes));
    logic_config.http.api_key = api_key.filter(|k| !k.is_empty());
    logic_config.client_auth = client_auth;
    logic_config.grpc_token = grpc_token.clone();
    tokens.apply(&mut logic_config);
    logic_config.validate().context("logic settings")?;
    let store: Arc<dyn SessionStore> = match &redis {
        Some(_) => Arc::new(herald_logic::store::redis::RedisStore::new(
            logic_config.redis.clone(),
        )?),
        None => Arc::new(herald_logic::store::memory::MemoryStore::new(
            logic_config.redis.ttl,
        )),
    };
    let mut job_config = herald_job::Config::new(
        kafka.as_deref().unwrap_or_default(),
        &kafka_topic,
        &kafka_group,
    );
    job_config.grpc_token = grpc_token.clone();
    job_config.comets = vec![herald_job::StaticComet {
        name: server_id.clone(),
        grpc: comet_grpc.to_string(),
    }];
    let (queue, records): (Arc<dyn PushQueue>, _) = match &kafka {
        Some(_) => (
            Arc::new(herald_logic::queue::kafka::KafkaQueue::new(
                logic_config.kafka.clone(),
            )?),
            None,
        ),
        None => {
            let (queue, records) = herald_logic::queue::memory::MemoryQueue::new(QUEUE_CAPACITY);
            (Arc::new(queue), Some(records))
        }
    };
    let mut comet_config = herald_comet::Config::new(server_id, logic_grpc.to_string());
    comet_config.grpc_token = grpc_token;
    crate::budget::Budget::of_process(client_addr.0.is_some())
        .context("reading the descriptor limit")?
        .apply(&mut logic_config, &mut comet_config);

    info!(
        tcp = %tcp_addr, ws = %ws_addr, http = %http_addr, client = ?client_addr.0,
        comet_http = ?comet_http_addr.0,
        routes = if redis.is_some() { "redis" } else { "memory" },
        queue = if kafka.is_some() { "kafka" } else { "memory" },
        "standalone starting"
    );

    // Shutdown in two steps: comet first, so its sessions can still tell
    // logic `Disconnect`, then logic and job. If any role fails, `try_join!`
    // drops the others and the process exits.
    let (comet_stop, rest_stop) = (Shutdown::new(), Shutdown::new());
    let logic = async {
        herald_logic::run_with(
            logic_config,
            store,
            queue,
            logic_listeners,
            rest_stop.wait(),
        )
        .await
        .context("logic")
    };
    let comet = async {
        let result = herald_comet::run(comet_config, comet_listeners, comet_stop.wait()).await;
        rest_stop.trigger();
        result.context("comet")
    };
    let job = async {
        match records {
            Some(records) => herald_job::run_channel(job_config, records, rest_stop.wait()).await,
            None => {
                herald_job::run(job_config, herald_job::Listeners::none(), rest_stop.wait()).await
            }
        }
        .context("job")
    };
    let signal = async {
        // Also ends when comet stopped by itself, so nothing waits forever.
        tokio::select! {
            () = shutdown => {}
            () = rest_stop.wait() => {}
        }
        comet_stop.trigger();
        anyhow::Ok(())
    };
    tokio::try_join!(signal, logic, comet, job).map(|_| ())
}
