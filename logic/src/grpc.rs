//! `goim.logic.Logic` over tonic: decodes requests, calls [`Service`], maps
//! errors to gRPC statuses (bad token → `InvalidArgument`, Redis/Kafka →
//! `Unavailable`, so comet can tell "reject the client" from "retry later").

use std::sync::Arc;

use herald_protocol::pb::goim::logic::{
    DisconnectReply, DisconnectReq, HeartbeatReply, HeartbeatReq, NodesReply, NodesReq,
    OnlineReply, OnlineReq, ReceiveReply, ReceiveReq,
};
use herald_protocol::pb::{ConnectReply, ConnectReq, Logic, LogicServer};
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};

use crate::service::{Error, Service};

/// goim comets allow 16 MiB messages; accept at least that (§8).
pub const MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// The tonic service wrapper.
#[derive(Debug, Clone)]
pub struct LogicGrpc {
    service: Arc<Service>,
}

impl LogicGrpc {
    /// Wraps `service` as a `LogicServer` that accepts gzip (goim comets
    /// compress RenewOnline) and 16 MiB messages.
    pub fn server(service: Arc<Service>) -> LogicServer<LogicGrpc> {
        LogicServer::new(LogicGrpc { service })
            .accept_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE)
    }
}

impl LogicGrpc {
    /// Counts the call's outcome and turns it into a tonic answer.
    fn done<T>(&self, method: &'static str, res: Result<T, Error>) -> Result<Response<T>, Status> {
        self.service.metrics().grpc(method, res.is_ok());
        res.map(Response::new).map_err(status)
    }
}

fn status(err: Error) -> Status {
    match &err {
        Error::Token(e) => Status::invalid_argument(format!("{err}: {e}")),
        Error::BadRequest(_) => Status::invalid_argument(err.to_string()),
        Error::Store(e) => {
            tracing::warn!(cause = %e, source = ?std::error::Error::source(e), "grpc: session store failed");
            Status::unavailable(err.to_string())
        }
        Error::Queue(e) => {
            tracing::warn!(cause = %e, source = ?std::error::Error::source(e), "grpc: push queue failed");
            Status::unavailable(err.to_string())
        }
    }
}

#[tonic::async_trait]
impl Logic for LogicGrpc {
    async fn connect(&self, req: Request<ConnectReq>) -> Result<Response<ConnectReply>, Status> {
        let ConnectReq {
            server,
            cookie: _,
            token,
        } = req.into_inner();
        let res = self.service.connect(&server, &token).await;
        self.done("connect", res)
    }

    async fn disconnect(
        &self,
        req: Request<DisconnectReq>,
    ) -> Result<Response<DisconnectReply>, Status> {
        let DisconnectReq { mid, key, server } = req.into_inner();
        let res = self.service.disconnect(mid, &key, &server).await;
        self.done("disconnect", res.map(|has| DisconnectReply { has }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatReq>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let HeartbeatReq { mid, key, server } = req.into_inner();
        let res = self.service.heartbeat(mid, &key, &server).await;
        self.done("heartbeat", res.map(|()| HeartbeatReply {}))
    }

    async fn renew_online(&self, req: Request<OnlineReq>) -> Result<Response<OnlineReply>, Status> {
        let OnlineReq { server, room_count } = req.into_inner();
        let res = if server.is_empty() {
            Err(Error::BadRequest("server is empty".to_owned()))
        } else {
            self.service.renew_online(&server, room_count).await
        };
        self.done(
            "renew_online",
            res.map(|all_room_count| OnlineReply { all_room_count }),
        )
    }

    async fn receive(&self, req: Request<ReceiveReq>) -> Result<Response<ReceiveReply>, Status> {
        let ReceiveReq { mid, proto } = req.into_inner();
        let res = self.service.receive(mid, proto.as_ref()).await;
        self.done("receive", res.map(|_| ReceiveReply {}))
    }

    async fn nodes(&self, req: Request<NodesReq>) -> Result<Response<NodesReply>, Status> {
        let NodesReq {
            platform,
            client_ip: _,
        } = req.into_inner();
        self.done("nodes", Ok(self.service.nodes_reply(&platform)))
    }
}
