//! A stub `goim.logic.Logic` for tests that run a real comet (in process or
//! as a child) without a real logic: every token is JSON and says who the
//! client is, so a test writes the session it wants into the token instead
//! of provisioning Redis.

use std::time::Duration;

use herald_protocol::pb::goim::logic::{
    DisconnectReply, DisconnectReq, HeartbeatReply, HeartbeatReq, NodesReply, NodesReq,
    OnlineReply, OnlineReq, ReceiveReply, ReceiveReq,
};
use herald_protocol::pb::{ConnectReply, ConnectReq, Logic, LogicServer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// The idle timeout the stub hands out: longer than any test, so no session
/// times out under a test that does not send heartbeats.
const HEARTBEAT: Duration = Duration::from_secs(600);

/// Accepts every JSON token `{"key", "mid", "room_id", "accepts"}`; a
/// missing `mid` is 1, a missing room none, missing `accepts` `[1000]` (the
/// operation the tests push). Anything else is answered as a real logic
/// without sessions would: `Disconnect` found the session, the rest succeed
/// with empty answers, and `Nodes` is not served.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenLogic;

/// Serves [`TokenLogic`] on `listener` until the runtime ends.
pub fn serve(listener: TcpListener) {
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(LogicServer::new(TokenLogic))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
}

#[tonic::async_trait]
impl Logic for TokenLogic {
    async fn connect(&self, req: Request<ConnectReq>) -> Result<Response<ConnectReply>, Status> {
        let v: serde_json::Value = serde_json::from_slice(&req.into_inner().token)
            .map_err(|_| Status::invalid_argument("token is not JSON"))?;
        let accepts = match v["accepts"].as_array() {
            Some(list) => list
                .iter()
                .filter_map(serde_json::Value::as_i64)
                .filter_map(|op| i32::try_from(op).ok())
                .collect(),
            None => vec![1000],
        };
        Ok(Response::new(ConnectReply {
            mid: v["mid"].as_i64().unwrap_or(1),
            key: v["key"].as_str().unwrap_or("").to_owned(),
            room_id: v["room_id"].as_str().unwrap_or("").to_owned(),
            accepts,
            heartbeat: i64::try_from(HEARTBEAT.as_nanos()).unwrap_or(i64::MAX),
        }))
    }

    async fn disconnect(
        &self,
        _req: Request<DisconnectReq>,
    ) -> Result<Response<DisconnectReply>, Status> {
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
        Err(Status::unimplemented("not in the stub"))
    }
}
