//! The push queue between logic and job: one `goim.logic.PushMsg` per record
//! (§10).
//!
//! [`PushQueue`] is a trait because `herald standalone` hands records to an
//! in-process job instead of Kafka; [`kafka::KafkaQueue`] serves clusters, [`memory::MemoryQueue`] a single process.

use futures::future::BoxFuture;
use herald_protocol::pb::{PushMsg, push_msg};

pub mod kafka;
pub mod memory;

/// Why a record was not accepted by the queue (HTTP 503 to the pusher).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The producer could not be built from the configuration.
    #[error("kafka producer configuration rejected")]
    Config(#[source] rdkafka::error::KafkaError),
    /// The broker did not acknowledge the record (timeout, broker down, ...).
    #[error("kafka did not acknowledge the push record")]
    Produce(#[source] rdkafka::error::KafkaError),
    /// The brokers refused logic's SASL credentials (librdkafka's last
    /// authentication error; a metadata request only reports a transport
    /// failure).
    #[error("kafka refused the SASL credentials: {0}")]
    Auth(String),
    /// The in-process consumer has stopped.
    #[error("push queue consumer has stopped")]
    Closed,
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where an acknowledged record landed: the push's message id. With Kafka it
/// names the record exactly (`partition-offset`), so an operator can find a
/// push a client says it never got; the in-process queue numbers records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RecordId {
    /// Kafka partition (0 for the in-process queue).
    pub partition: i32,
    /// Offset in the partition (a sequence number in-process).
    pub offset: i64,
}

impl std::fmt::Display for RecordId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.partition, self.offset)
    }
}

/// Where push records go. `push` resolves only once the record is durable
/// (acknowledged by every in-sync replica for Kafka).
pub trait PushQueue: Send + Sync + std::fmt::Debug {
    /// Writes one record with the given partitioning key.
    fn push<'a>(&'a self, key: &'a str, msg: &'a PushMsg) -> BoxFuture<'a, Result<RecordId>>;

    /// Whether records can be written now (readiness); the in-process queue
    /// always can while its consumer lives.
    fn ready(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// Where client upstream messages (comet `Receive`) go when configured:
/// one record per message, keyed by mid, value = the `goim.logic.ReceiveReq`
/// protobuf comet sent (so consumers decode with goim's own proto).
pub trait Upstream: Send + Sync + std::fmt::Debug {
    /// Writes one record and waits for its acknowledgement.
    fn send<'a>(&'a self, key: &'a str, value: &'a [u8]) -> BoxFuture<'a, Result<RecordId>>;
}

/// The §10 record key: PUSH → first key, ROOM → room, BROADCAST → operation.
/// Keying by room keeps one room's pushes in order on one partition.
pub fn record_key(msg: &PushMsg) -> String {
    match msg.r#type() {
        push_msg::Type::Push => msg.keys.first().cloned().unwrap_or_default(),
        push_msg::Type::Room => msg.room.clone(),
        push_msg::Type::Broadcast => msg.operation.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn hex(bytes: &[u8]) -> String {
        bytes
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn t12_values_and_record_keys() {
        let room = PushMsg {
            r#type: push_msg::Type::Room as i32,
            operation: 1000,
            room: "live://1000".to_owned(),
            msg: b"hello".to_vec().into(),
            ..Default::default()
        };
        assert_eq!(
            hex(&room.encode_to_vec()),
            "08 01 10 e8 07 2a 0b 6c 69 76 65 3a 2f 2f 31 30 30 30 3a 05 68 65 6c 6c 6f"
        );
        assert_eq!(record_key(&room), "live://1000");
        let push = PushMsg {
            operation: 1000,
            server: "comet-01".to_owned(),
            keys: vec!["k1".to_owned(), "k2".to_owned()],
            msg: b"hi".to_vec().into(),
            ..Default::default()
        };
        assert_eq!(
            hex(&push.encode_to_vec()),
            "10 e8 07 22 08 63 6f 6d 65 74 2d 30 31 32 02 6b 31 32 02 6b 32 3a 02 68 69"
        );
        assert_eq!(record_key(&push), "k1");
        let all = PushMsg {
            r#type: push_msg::Type::Broadcast as i32,
            operation: 1000,
            speed: 100,
            msg: b"x".to_vec().into(),
            ..Default::default()
        };
        assert_eq!(hex(&all.encode_to_vec()), "08 02 10 e8 07 18 64 3a 01 78");
        assert_eq!(record_key(&all), "1000");
    }
}
