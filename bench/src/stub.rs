//! A stub `goim.logic.Logic` that accepts every token, so comet can be
//! measured without Redis, Kafka or a real logic (as comet's own tests do).
//!
//! It reads `mid`, `key` and `room_id` from goim's JSON token, hands back an
//! idle timeout of an hour (benchmark clients are idle on purpose), and counts
//! the calls it served. Job's and the binary's tests use it as their logic
//! too, writing the session they want into the token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use herald_protocol::pb::goim::logic::{
    DisconnectReply, DisconnectReq, HeartbeatReply, HeartbeatReq, NodesReply, NodesReq,
    OnlineReply, OnlineReq, ReceiveReply, ReceiveReq,
};
use herald_protocol::pb::{ConnectReply, ConnectReq, Logic, LogicServer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// Idle timeout handed to comet for every connection, in nanoseconds.
const IDLE_NS: i64 = 3_600 * 1_000_000_000;

/// Calls the stub served.
#[derive(Debug, Default)]
pub struct Calls {
    pub(crate) connects: AtomicU64,
    pub(crate) disconnects: AtomicU64,
}

#[derive(Debug, Clone, Default)]
struct Stub {
    calls: Arc<Calls>,
}

#[derive(serde::Deserialize)]
struct Token {
    #[serde(default)]
    mid: i64,
    #[serde(default)]
    key: String,
    #[serde(default)]
    room_id: String,
    #[serde(default)]
    accepts: Vec<i32>,
}

#[tonic::async_trait]
impl Logic for Stub {
    async fn connect(&self, req: Request<ConnectReq>) -> Result<Response<ConnectReply>, Status> {
        let token: Token = serde_json::from_slice(&req.into_inner().token)
            .map_err(|err| Status::invalid_argument(format!("token: {err}")))?;
        self.calls.connects.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(ConnectReply {
            mid: token.mid,
            key: token.key,
            room_id: token.room_id,
            accepts: token.accepts,
            heartbeat: IDLE_NS,
        }))
    }

    async fn disconnect(
        &self,
        _req: Request<DisconnectReq>,
    ) -> Result<Response<DisconnectReply>, Status> {
        self.calls.disconnects.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(DisconnectReply { has: true }))
    }

    async fn heartbeat(
        &self,
        _req: Request<HeartbeatReq>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        Ok(Response::new(HeartbeatReply {}))
    }

    async fn renew_online(
        &self,
        _req: Request<OnlineReq>,
    ) -> Result<Response<OnlineReply>, Status> {
        Ok(Response::new(OnlineReply::default()))
    }

    async fn receive(&self, _req: Request<ReceiveReq>) -> Result<Response<ReceiveReply>, Status> {
        Ok(Response::new(ReceiveReply {}))
    }

    async fn nodes(&self, _req: Request<NodesReq>) -> Result<Response<NodesReply>, Status> {
        Err(Status::unimplemented("not in the benchmark stub"))
    }
}

/// Serves the stub on a loopback port of its own; returns its address and
/// call counters. The server task lives as long as the runtime.
///
/// # Errors
/// No loopback port to bind.
pub async fn start() -> std::io::Result<(SocketAddr, Arc<Calls>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stub = Stub::default();
    let calls = stub.calls.clone();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(LogicServer::new(stub))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    Ok((addr, calls))
}
