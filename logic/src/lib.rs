//! Logic: goim's HTTP push API and `goim.logic.Logic` gRPC, routing in Redis,
//! push records to Kafka (§6–§12).
//!
//! `§N` refers to docs/protocol.md.
//!
//! # Layout
//! Data-flow order, as in goim's `internal/logic/{http,grpc,dao}`:
//! - [`http`] (push/online/nodes API; [`http::client`] the client-facing
//!   reads on their own listener) and [`grpc`] (comet's calls) decode
//!   requests and call the one [`service::Service`];
//! - [`token`] parses the client's op-7 token (goim JSON or JWT);
//! - [`store`] keeps routes and room counts ([`store::redis`]), [`queue`]
//!   writes push records ([`queue::kafka`]) — both behind traits so
//!   `herald standalone` can swap in in-memory versions;
//! - [`nodes`] holds the comet node list (file or ConfigMap) and the
//!   balancer pick; [`metrics`] the Prometheus registry and probe routes.

use std::future::Future;
use std::sync::Arc;

use herald_runtime::{Shutdown, listen, nodes};
use tokio::net::TcpListener;
use tracing::Instrument;

mod config;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod queue;
pub mod service;
pub mod store;
pub mod token;

pub use config::{Args, ClientTokenArgs, Config, OptionalAddr};
pub use http::client::ClientAuth;
pub use token::TokenMode;

/// Why logic could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The Redis client could not be built.
    #[error("setting up the session store")]
    Store(#[from] store::Error),
    /// The Kafka producer could not be built.
    #[error("setting up the push queue")]
    Queue(#[from] queue::Error),
    /// The node list file could not be read at startup.
    #[error("loading the node list")]
    Nodes(#[from] nodes::Error),
    /// Binding a listener failed.
    #[error(transparent)]
    Bind(#[from] listen::BindError),
    /// The HTTP server failed.
    #[error("http server")]
    Http(#[source] std::io::Error),
    /// The gRPC server failed.
    #[error("grpc server")]
    Grpc(#[source] tonic::transport::Error),
    /// The gRPC token file cannot be read, or holds no usable token.
    #[error("gRPC token")]
    GrpcToken(#[from] herald_runtime::grpc_auth::Error),
}

/// Result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The bound sockets `run` serves on.
#[derive(Debug)]
pub struct Listeners {
    /// HTTP push API.
    pub http: TcpListener,
    /// gRPC.
    pub grpc: TcpListener,
    /// Client-facing reads ([`http::client`]); `None` = not served.
    pub client: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses of `config` (`client_addr` only when set).
    ///
    /// # Errors
    /// Any bind failing.
    pub async fn bind(config: &Config) -> Result<Self> {
        let client = match config.client_addr {
            Some(addr) => Some(listen::bind(addr).await?),
            None => None,
        };
        Ok(Listeners {
            http: listen::bind(config.http_addr).await?,
            grpc: listen::bind(config.grpc_addr).await?,
            client,
        })
    }
}

/// Serves the HTTP API and gRPC on Redis and Kafka until `shutdown`
/// resolves, then drains for at most `config.drain_timeout`.
///
/// Redis and Kafka are connected lazily: logic starts while they are down and
/// answers 503 / `Unavailable` until they are back.
///
/// # Errors
/// Invalid config, unreadable node list, or a server failing.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    config.validate()?;
    let store = Arc::new(store::redis::RedisStore::new(config.redis.clone())?);
    let queue = Arc::new(queue::kafka::KafkaQueue::new(config.kafka.clone())?);
    let upstream = match &config.receive_topic {
        Some(topic) => Some(
            Arc::new(queue::kafka::KafkaQueue::new(queue::kafka::KafkaConfig {
                topic: topic.clone(),
                ..config.kafka.clone()
            })?) as Arc<dyn queue::Upstream>,
        ),
        None => None,
    };
    serve(config, store, queue, upstream, listeners, shutdown).await
}

/// [`run`] on the given backends; `herald standalone` passes
/// [`store::memory::MemoryStore`] and [`queue::memory::MemoryQueue`].
/// `config.redis` and `config.kafka` are ignored except `redis.ttl`, which
/// the caller is expected to have used to build the store.
///
/// # Errors
/// Invalid config, unreadable node list, or a server failing.
pub async fn run_with(
    config: Config,
    store: Arc<dyn store::SessionStore>,
    queue: Arc<dyn queue::PushQueue>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    serve(config, store, queue, None, listeners, shutdown).await
}

async fn serve(
    config: Config,
    store: Arc<dyn store::SessionStore>,
    queue: Arc<dyn queue::PushQueue>,
    upstream: Option<Arc<dyn queue::Upstream>>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    config.validate()?;
    let Config {
        http_addr: _,
        grpc_addr: _,
        client_addr: _,
        client_auth,
        redis: _,
        kafka: _,
        node_list,
        receive_topic: _,
        http: http_config,
        token_mode,
        jwt_secret,
        jwt_public_key,
        jwt_checks,
        service: settings,
        online_interval,
        drain_timeout,
        grpc_token,
        http_limits,
        client_limits,
    } = config;
    let grpc_token = grpc_token.start()?;

    let nodes = match &node_list {
        Some(source) => nodes::Nodes::new(source.initial()?),
        None => nodes::Nodes::default(),
    };
    let verifier = match token_mode {
        TokenMode::Goim => token::Verifier::goim(),
        TokenMode::Jwt => match &jwt_public_key {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    Error::Config(format!("reading --jwt-public-key {}: {e}", path.display()))
                })?;
                token::Verifier::rs256(&pem, &jwt_checks).map_err(|e| {
                    Error::Config(format!("--jwt-public-key {}: {e}", path.display()))
                })?
            }
            None => token::Verifier::hs256(
                jwt_secret
                    .as_ref()
                    .map_or(&b""[..], |s| s.expose().as_bytes()),
                &jwt_checks,
            ),
        },
    };
    if http_config.api_key.is_none() {
        tracing::warn!(
            "HTTP push API has NO authentication: anyone who can reach it can push to every client; set --api-key"
        );
    }
    let mut service = service::Service::new(store, queue, nodes.clone(), verifier, settings);
    if let Some(upstream) = upstream {
        service = service.with_upstream(upstream);
    }
    let service = Arc::new(service);
    let initial = nodes.get();
    service
        .metrics()
        .node_list(initial.generation, initial.nodes.len());

    let shutdown = Shutdown::on(shutdown);
    let mut background = Vec::new();
    background.push(tokio::spawn(
        service::aggregate_online(service.clone(), online_interval, shutdown.clone())
            .instrument(tracing::info_span!("online_aggregation")),
    ));
    if let Some(source) = node_list {
        let service = service.clone();
        let apply = move |list: nodes::NodeList| {
            service
                .metrics()
                .node_list(list.generation, list.nodes.len());
            nodes.set(list);
        };
        background.push(tokio::spawn(
            source
                .watch(apply, shutdown.wait())
                .instrument(tracing::info_span!("node_list")),
        ));
    }

    let http_addr = listeners.http.local_addr().ok();
    let grpc_addr = listeners.grpc.local_addr().ok();
    let client_addr = listeners.client.as_ref().and_then(|l| l.local_addr().ok());
    tracing::info!(
        ?http_addr,
        ?grpc_addr,
        ?client_addr,
        ?client_auth,
        grpc_token = grpc_token.is_on(),
        "logic listening"
    );

    let serve_http = |listener: TcpListener,
                      app: axum::Router,
                      name: &'static str,
                      limits: herald_runtime::http::Limits| {
        let config = herald_runtime::http::Listener {
            refusals: Some(service.metrics().http_refusals()),
            // Without TCP_NODELAY a response split over two writes waits
            // for the client's delayed ACK; pushes are latency-bound.
            nodelay: true,
            ..herald_runtime::http::Listener::new(name, limits)
        };
        let server = herald_runtime::http::serve(listener, app, config, shutdown.wait());
        async move { server.await.map_err(Error::Http) }
            .instrument(tracing::info_span!("http", listener = name))
    };
    let client_server = listeners.client.map(|listener| {
        let app = http::client::router(service.clone(), http_config.clone(), client_auth);
        serve_http(listener, app, "client", client_limits)
    });
    let client_server = async move {
        match client_server {
            Some(server) => server.await,
            None => Ok(()),
        }
    };
    let app = http::router(service.clone(), http_config);
    let http_server = serve_http(listeners.http, app, "api", http_limits);
    let grpc_server = tonic::transport::Server::builder()
        .layer(grpc_token.server_layer(service.metrics().grpc_auth_refusals()))
        .add_service(grpc::LogicGrpc::server(service))
        .serve_with_incoming_shutdown(
            tokio_stream::StreamExt::map(
                tokio_stream::wrappers::TcpListenerStream::new(listeners.grpc),
                |stream| {
                    stream.inspect(|tcp| {
                        let _ = tcp.set_nodelay(true);
                    })
                },
            ),
            shutdown.wait(),
        );
    let grpc_server = async move { grpc_server.await.map_err(Error::Grpc) }
        .instrument(tracing::info_span!("grpc"));

    let servers = async { tokio::try_join!(http_server, client_server, grpc_server).map(|_| ()) };
    let deadline = async {
        shutdown.wait().await;
        tokio::time::sleep(drain_timeout).await;
    };
    let result = tokio::select! {
        res = servers => res,
        () = deadline => {
            tracing::warn!(?drain_timeout, "drain deadline passed; closing remaining connections");
            Ok(())
        }
    };
    // Also when a server failed without a shutdown: nothing outlives `run`
    // (triggering also ends the task that waits on the caller's signal).
    shutdown.trigger();
    for task in background {
        task.abort();
    }
    result
}
