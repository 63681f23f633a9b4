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
        self.service
            .connect(&server, &token)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn disconnect(
        &self,
        req: Request<DisconnectReq>,
    ) -> Result<Response<DisconnectReply>, Status> {
        let DisconnectReq { mid, key, server } = req.into_inner();
        let has = self
            .service
            .disconnect(mid, &key, &server)
            .await
            .map_err(status)?;
        Ok(Response::new(DisconnectReply { has }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatReq>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let HeartbeatReq { mid, key, server } = req.into_inner();
        self.service
            .heartbeat(mid, &key, &server)
            .await
            .map_err(status)?;
        Ok(Response::new(HeartbeatReply {}))
    }

    async fn renew_online(&self, req: Request<OnlineReq>) -> Result<Response<OnlineReply>, Status> {
        let OnlineReq { server, room_count } = req.into_inner();
        if server.is_empty() {
            return Err(Status::invalid_argument("server is empty"));
        }
        let all_room_count = self
            .service
            .renew_online(&server, room_count)
            .await
            .map_err(status)?;
        Ok(Response::new(OnlineReply { all_room_count }))
    }

    async fn receive(&self, req: Request<ReceiveReq>) -> Result<Response<ReceiveReply>, Status> {
        let ReceiveReq { mid, proto } = req.into_inner();
        self.service.receive(mid, proto.as_ref());
        Ok(Response::new(ReceiveReply {}))
    }

    async fn nodes(&self, req: Request<NodesReq>) -> Result<Response<NodesReply>, Status> {
        let NodesReq {
            platform,
            client_ip: _,
        } = req.into_inner();
        Ok(Response::new(self.service.nodes_reply(&platform)))
    }
}
