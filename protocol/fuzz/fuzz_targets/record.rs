//! A Kafka push record as job reads it (`herald_protocol::record`): any
//! bytes that decode as a `PushMsg` are either poison or a deliverable
//! record; a deliverable record never carries a reserved op, a PUSH has a
//! non-empty key and a ROOM a room, the op and message are the record's,
//! and it writes back (as logic writes it) to a value that reads as the
//! same record.
#![no_main]

use herald_protocol::op;
use herald_protocol::pb::{PushMsg, push_msg};
use herald_protocol::record::{Poison, Record, Target};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = PushMsg::decode(data) else {
        return;
    };
    let record = match Record::try_from(msg.clone()) {
        Ok(record) => record,
        Err(poison) => {
            let expected = if push_msg::Type::try_from(msg.r#type).is_err() {
                Poison::UnknownType
            } else if op::is_reserved(msg.operation) {
                Poison::ReservedOp
            } else {
                Poison::EmptyKeys
            };
            assert_eq!(poison, expected, "{msg:?}");
            return;
        }
    };
    assert!(!op::is_reserved(record.op));
    assert_eq!((record.op, &record.msg), (msg.operation, &msg.msg));
    match &record.target {
        Target::Keys { keys, server } => {
            assert!(keys.iter().any(|k| !k.is_empty()));
            assert_eq!((keys, server), (&msg.keys, &msg.server));
        }
        Target::Room(room) => assert!(!room.is_empty() && *room == msg.room),
        Target::All { speed } => assert_eq!(*speed, msg.speed),
    }
    let written = PushMsg::from(record.clone()).encode_to_vec();
    let read = PushMsg::decode(&written[..]).expect("a written record decodes");
    assert_eq!(Record::try_from(read), Ok(record));
});
