//! Generated protobuf and gRPC types. Modules mirror the protobuf packages so
//! cross-package references (`goim.protocol.Proto`) resolve.

/// Packages of goim's own protos.
pub mod goim {
    /// `goim.protocol`: the frame message shared by comet and logic.
    pub mod protocol {
        #![allow(missing_docs, unreachable_pub, clippy::all)]
        tonic::include_proto!("goim.protocol");
    }
    /// `goim.comet`: the service job calls on every comet.
    pub mod comet {
        #![allow(missing_docs, unreachable_pub, clippy::all)]
        tonic::include_proto!("goim.comet");
    }
    /// `goim.logic`: the service comet calls, and the Kafka `PushMsg` record.
    pub mod logic {
        #![allow(missing_docs, unreachable_pub, clippy::all)]
        tonic::include_proto!("goim.logic");
    }
}

/// Herald's own packages.
pub mod herald {
    /// `herald.admin.v1`: comet load reports and drain, used by the operator.
    pub mod admin {
        /// Version 1 of the admin API.
        pub mod v1 {
            #![allow(missing_docs, unreachable_pub, clippy::all)]
            tonic::include_proto!("herald.admin.v1");
        }
    }
    /// `herald.push.v1`: batched pushes from job to Herald's comet.
    pub mod push {
        /// Version 1 of the push batch API.
        pub mod v1 {
            #![allow(missing_docs, unreachable_pub, clippy::all)]
            tonic::include_proto!("herald.push.v1");
        }
    }
}

pub use goim::comet::{
    BroadcastReq, BroadcastRoomReq, PushMsgReq, RoomsReply,
    comet_client::CometClient,
    comet_server::{Comet, CometServer},
};
pub use goim::logic::{
    ConnectReply, ConnectReq, PushMsg,
    logic_client::LogicClient,
    logic_server::{Logic, LogicServer},
    push_msg,
};
pub use goim::protocol::Proto;
pub use herald::admin::v1 as admin;
pub use herald::push::v1 as push;

impl From<crate::Frame> for Proto {
    fn from(frame: crate::Frame) -> Self {
        Proto {
            ver: i32::from(frame.ver),
            op: frame.op,
            seq: frame.seq,
            body: frame.body,
        }
    }
}

impl push_msg::Type {
    /// The kind's lower-case name (`push`, `room`, `broadcast`): the label
    /// logic and job both count records under.
    pub fn label(self) -> &'static str {
        match self {
            push_msg::Type::Push => "push",
            push_msg::Type::Room => "room",
            push_msg::Type::Broadcast => "broadcast",
        }
    }
}
