//! A Kafka push record (`goim.logic.PushMsg`, §10) as job reads it: what it
//! asks for, or why it is poison (it can never be delivered).
//!
//! Logic writes these records and job reads them; the reading rules live
//! here, with no Kafka client in sight, so they are fuzzed
//! (`protocol/fuzz`, target `record`) without building librdkafka. Job
//! checks a value's size ([`Poison::Oversized`]) and decodes it with prost
//! ([`Poison::Undecodable`]) before [`Record::try_from`].

use bytes::Bytes;

use crate::pb::{PushMsg, push_msg};

/// Why a record is poison. Job counts each under its [`Poison::reason`]
/// and names it in the dead-letter copy's `herald-poison-reason` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Poison {
    /// Not a protobuf `PushMsg`.
    Undecodable,
    /// A `type` outside PUSH / ROOM / BROADCAST.
    UnknownType,
    /// PUSH with no keys, or ROOM with no room.
    EmptyKeys,
    /// Larger than the configured maximum.
    Oversized,
    /// An operation no client may be sent (goim's 10 and 11, Herald's
    /// 18–31): comets refuse it, and in a batch would refuse the rest too.
    ReservedOp,
}

impl Poison {
    /// Every reason, for summing the counters.
    pub const ALL: [Poison; 5] = [
        Poison::Undecodable,
        Poison::UnknownType,
        Poison::EmptyKeys,
        Poison::Oversized,
        Poison::ReservedOp,
    ];

    /// The metric label and dead-letter header value.
    pub fn reason(self) -> &'static str {
        match self {
            Poison::Undecodable => "undecodable",
            Poison::UnknownType => "unknown_type",
            Poison::EmptyKeys => "empty_keys",
            Poison::Oversized => "oversized",
            Poison::ReservedOp => "reserved_op",
        }
    }
}

/// Who a record's message goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// PUSH: these connection keys on comet `server` (at least one key is
    /// non-empty; `server` may name a comet job does not know).
    Keys {
        /// The comet holding the keys.
        server: String,
        /// The connection keys, as written.
        keys: Vec<String>,
    },
    /// ROOM: every comet with members in this room (non-empty).
    Room(String),
    /// BROADCAST: every connection on every comet, at `speed` connections
    /// per second over the whole cluster.
    All {
        /// goim's broadcast speed, before job divides it among the comets.
        speed: i32,
    },
}

/// A deliverable record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The business op of the pushed frame (never a reserved op).
    pub op: i32,
    /// The pushed frame's body.
    pub msg: Bytes,
    /// Who gets it.
    pub target: Target,
}

impl TryFrom<PushMsg> for Record {
    type Error = Poison;

    /// # Errors
    /// [`Poison::UnknownType`], [`Poison::ReservedOp`], then
    /// [`Poison::EmptyKeys`], in that order.
    fn try_from(msg: PushMsg) -> Result<Record, Poison> {
        let kind = push_msg::Type::try_from(msg.r#type).map_err(|_| Poison::UnknownType)?;
        if crate::op::is_reserved(msg.operation) {
            return Err(Poison::ReservedOp);
        }
        let target = match kind {
            push_msg::Type::Push => {
                if msg.keys.iter().all(String::is_empty) {
                    return Err(Poison::EmptyKeys);
                }
                Target::Keys {
                    server: msg.server,
                    keys: msg.keys,
                }
            }
            push_msg::Type::Room if msg.room.is_empty() => return Err(Poison::EmptyKeys),
            push_msg::Type::Room => Target::Room(msg.room),
            push_msg::Type::Broadcast => Target::All { speed: msg.speed },
        };
        Ok(Record {
            op: msg.operation,
            msg: msg.msg,
            target,
        })
    }
}

impl From<Record> for PushMsg {
    /// The record logic writes for `record`: fields a type does not use stay
    /// empty.
    fn from(record: Record) -> PushMsg {
        let mut msg = PushMsg {
            operation: record.op,
            msg: record.msg,
            ..PushMsg::default()
        };
        match record.target {
            Target::Keys { server, keys } => {
                msg.r#type = push_msg::Type::Push.into();
                msg.server = server;
                msg.keys = keys;
            }
            Target::Room(room) => {
                msg.r#type = push_msg::Type::Room.into();
                msg.room = room;
            }
            Target::All { speed } => {
                msg.r#type = push_msg::Type::Broadcast.into();
                msg.speed = speed;
            }
        }
        msg
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn push(keys: &[&str]) -> PushMsg {
        PushMsg {
            r#type: push_msg::Type::Push.into(),
            operation: 1000,
            server: "c1".to_owned(),
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            msg: Bytes::from_static(b"hi"),
            ..PushMsg::default()
        }
    }

    #[test]
    fn each_poison_and_a_round_trip() {
        let good = push(&["", "k"]);
        let record = Record::try_from(good.clone()).unwrap();
        assert_eq!(
            record.target,
            Target::Keys {
                server: "c1".to_owned(),
                keys: vec![String::new(), "k".to_owned()]
            }
        );
        assert_eq!(PushMsg::from(record.clone()), good);
        let bytes = good.encode_to_vec();
        assert_eq!(
            PushMsg::decode(&bytes[..]).map(Record::try_from),
            Ok(Ok(record))
        );
        assert_eq!(Record::try_from(push(&[""])), Err(Poison::EmptyKeys));
        assert_eq!(Record::try_from(push(&[])), Err(Poison::EmptyKeys));
        let room = PushMsg {
            r#type: push_msg::Type::Room.into(),
            ..push(&[])
        };
        assert_eq!(Record::try_from(room), Err(Poison::EmptyKeys));
        let unknown = PushMsg {
            r#type: 3,
            ..push(&["k"])
        };
        assert_eq!(Record::try_from(unknown), Err(Poison::UnknownType));
        let reserved = PushMsg {
            operation: 18,
            ..push(&["k"])
        };
        assert_eq!(Record::try_from(reserved), Err(Poison::ReservedOp));
    }
}
