//! The hex test vectors T1–T14 of docs/protocol.md §14 (T14 lives beside
//! CityHash32 in `src/cityhash.rs`). Each vector is checked both ways: what we
//! encode equals the bytes, and the bytes decode to what we expect.

use bytes::{Bytes, BytesMut};
use herald_protocol::frame::{self, Frame, Limits};
use herald_protocol::pb::{self, Proto, PushMsg, push_msg};
use herald_protocol::{op, ws};
use prost::Message;

/// Parses docs/protocol.md's space-separated hex.
fn hex(text: &str) -> Vec<u8> {
    text.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
        .collect()
}

fn decode_one(bytes: &[u8]) -> Frame {
    let mut buf = BytesMut::from(bytes);
    let frame = Frame::decode(&mut buf, Limits::OUTBOUND)
        .expect("valid frame")
        .expect("complete frame");
    assert!(buf.is_empty(), "decoder left {} bytes", buf.len());
    frame
}

/// Encodes `frame`, compares with `hex`, and decodes `hex` back to `frame`.
fn both_ways(frame: &Frame, hex_text: &str) {
    let bytes = hex(hex_text);
    assert_eq!(frame.to_bytes().as_ref(), bytes.as_slice(), "encode");
    assert_eq!(&decode_one(&bytes), frame, "decode");
}

const T1: &str = "00 00 00 5f 00 10 00 01 00 00 00 07 00 00 00 01
7b 22 6d 69 64 22 3a 31 32 33 2c 22 72 6f 6f 6d 5f 69 64 22 3a 22 6c 69 76 65 3a 2f 2f
31 30 30 30 22 2c 22 70 6c 61 74 66 6f 72 6d 22 3a 22 77 65 62 22 2c 22 61 63 63 65 70
74 73 22 3a 5b 31 30 30 30 2c 31 30 30 31 2c 31 30 30 32 5d 7d";
const T3: &str = "00 00 00 10 00 10 00 01 00 00 00 02 00 00 00 02";
const T4: &str = "00 00 00 14 00 10 00 01 00 00 00 03 00 00 00 02 00 00 00 03";
const T5: &str = "00 00 00 15 00 10 00 01 00 00 03 e8 00 00 00 00 68 65 6c 6c 6f";
const T6: &str = "00 00 00 25 00 10 00 01 00 00 00 09 00 00 00 00
00 00 00 15 00 10 00 01 00 00 03 e8 00 00 00 00 68 65 6c 6c 6f";
const T7_TCP: &str = "00 00 00 1a 00 10 00 01 00 00 03 e8 00 00 00 00 7b 22 74 65 73 74 22 3a 31 7d
00 00 00 1a 00 10 00 01 00 00 03 e8 00 00 00 00 7b 22 74 65 73 74 22 3a 32 7d";
const T7_WS_HEADER: &str = "00 00 00 44 00 10 00 01 00 00 00 09 00 00 00 00";

fn auth_frame() -> Frame {
    Frame {
        ver: 1,
        op: op::AUTH,
        seq: 1,
        body: Bytes::from_static(
            br#"{"mid":123,"room_id":"live://1000","platform":"web","accepts":[1000,1001,1002]}"#,
        ),
    }
}

#[test]
fn t1_auth_request() {
    let frame = auth_frame();
    assert_eq!(frame.body.len(), 79);
    assert_eq!(frame.encoded_len(), 95);
    both_ways(&frame, T1);
    // A client's auth frame must fit the inbound limit too.
    let mut buf = BytesMut::from(hex(T1).as_slice());
    assert_eq!(Frame::decode(&mut buf, Limits::INBOUND), Ok(Some(frame)));
}

#[test]
fn t2_auth_reply_copies_ver_and_seq() {
    let reply = auth_frame().reply(op::AUTH_REPLY, Bytes::new());
    both_ways(&reply, "00 00 00 10 00 10 00 01 00 00 00 08 00 00 00 01");
}

#[test]
fn t3_heartbeat() {
    let heartbeat = Frame {
        ver: 1,
        op: op::HEARTBEAT,
        seq: 2,
        body: Bytes::new(),
    };
    both_ways(&heartbeat, T3);
}

#[test]
fn t4_heartbeat_reply_carries_online_count() {
    let heartbeat = decode_one(&hex(T3));
    let reply = heartbeat.reply(op::HEARTBEAT_REPLY, 3i32.to_be_bytes().to_vec());
    both_ways(&reply, T4);
}

#[test]
fn t5_key_push_on_tcp() {
    both_ways(&Frame::push(1000, &b"hello"[..]), T5);
    // Job sends the op-9 wrapper; a TCP client receives its body verbatim.
    let proto = ws::raw_proto(Bytes::from(hex(T5)));
    assert_eq!(ws::push_for_tcp(&proto).as_ref(), hex(T5).as_slice());
    // A proto that is not op 9 is encoded as one frame.
    let plain = Proto::from(Frame::push(1000, &b"hello"[..]));
    assert_eq!(ws::push_for_tcp(&plain).as_ref(), hex(T5).as_slice());
}

#[test]
fn t6_key_push_on_websocket_is_wrapped_in_op_9() {
    let t5 = Bytes::from(hex(T5));
    assert_eq!(ws::wrap(&t5).as_ref(), hex(T6).as_slice());
    assert_eq!(
        ws::push_for_ws(&ws::raw_proto(t5)).as_ref(),
        hex(T6).as_slice()
    );
    let plain = Proto::from(Frame::push(1000, &b"hello"[..]));
    assert_eq!(ws::push_for_ws(&plain).as_ref(), hex(T6).as_slice());
    // A client unwraps it: one op-9 frame whose body is the inner frame.
    let outer = Frame::from_message(Bytes::from(hex(T6)), Limits::OUTBOUND).unwrap();
    assert_eq!(outer.op, op::RAW);
    let inner: Vec<Frame> = ws::frames(outer.body, Limits::OUTBOUND)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(inner, vec![Frame::push(1000, &b"hello"[..])]);
}

#[test]
fn t7_room_batch() {
    let first = Frame::push(1000, &br#"{"test":1}"#[..]);
    let second = Frame::push(1000, &br#"{"test":2}"#[..]);
    let mut stream = BytesMut::new();
    first.encode(&mut stream);
    second.encode(&mut stream);
    assert_eq!(stream.len(), 52);
    assert_eq!(stream.as_ref(), hex(T7_TCP).as_slice());

    let batch = ws::raw_proto(stream.freeze());
    assert_eq!(ws::push_for_tcp(&batch).as_ref(), hex(T7_TCP).as_slice());
    let message = ws::push_for_ws(&batch);
    assert_eq!(&message[..16], hex(T7_WS_HEADER).as_slice());
    assert_eq!(&message[16..], hex(T7_TCP).as_slice());

    let frames: Vec<Frame> = ws::frames(batch.body, Limits::OUTBOUND)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(frames, vec![first.clone(), second.clone()]);

    // A TCP client decoding the stream sees two ordinary frames, no op 9.
    let mut tcp = BytesMut::from(hex(T7_TCP).as_slice());
    assert_eq!(Frame::decode(&mut tcp, Limits::OUTBOUND), Ok(Some(first)));
    assert_eq!(Frame::decode(&mut tcp, Limits::OUTBOUND), Ok(Some(second)));
    assert_eq!(Frame::decode(&mut tcp, Limits::OUTBOUND), Ok(None));
}

#[test]
fn t8_change_room_and_reply() {
    let request = Frame {
        ver: 1,
        op: op::CHANGE_ROOM,
        seq: 3,
        body: Bytes::from_static(b"live://1001"),
    };
    both_ways(
        &request,
        "00 00 00 1b 00 10 00 01 00 00 00 0c 00 00 00 03 6c 69 76 65 3a 2f 2f 31 30 30 31",
    );
    let reply = request.reply(op::CHANGE_ROOM_REPLY, request.body.clone());
    both_ways(
        &reply,
        "00 00 00 1b 00 10 00 01 00 00 00 0d 00 00 00 03 6c 69 76 65 3a 2f 2f 31 30 30 31",
    );
}

#[test]
fn t9_subscribe() {
    let frame = decode_one(&hex(
        "00 00 00 19 00 10 00 01 00 00 00 0e 00 00 00 04 31 30 30 31 2c 31 30 30 32",
    ));
    assert_eq!((frame.op, frame.seq), (op::SUB, 4));
    assert_eq!(
        herald_protocol::op::parse_list(&frame.body),
        Ok(vec![1001, 1002])
    );
}

#[test]
fn t10_upstream_op_and_echo() {
    let request = Frame {
        ver: 1,
        op: op::SEND_MSG,
        seq: 5,
        body: Bytes::from_static(b"hi"),
    };
    both_ways(
        &request,
        "00 00 00 12 00 10 00 01 00 00 00 04 00 00 00 05 68 69",
    );
    both_ways(
        &request.reply(op::SEND_MSG, Bytes::new()),
        "00 00 00 10 00 10 00 01 00 00 00 04 00 00 00 05",
    );
}

#[test]
fn t11_websocket_envelopes() {
    use tungstenite::protocol::frame::{Frame as WsFrame, FrameHeader, coding::OpCode};

    // Server heartbeat reply: one binary message, FIN, unmasked.
    let reply = WsFrame::message(
        hex(T4),
        OpCode::Data(tungstenite::protocol::frame::coding::Data::Binary),
        true,
    );
    let mut wire = Vec::new();
    reply.format(&mut wire).unwrap();
    let mut expected = vec![0x82, 0x14];
    expected.extend(hex(T4));
    assert_eq!(wire, expected);

    // Client heartbeat, masked with 37 fa 21 3d, unmasks to T3.
    let masked = hex("82 90 37 fa 21 3d 37 fa 21 2d 37 ea 21 3c 37 fa 21 3f 37 fa 21 3f");
    let mut cursor = std::io::Cursor::new(masked.as_slice());
    let (header, payload_len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
    assert!(header.is_final);
    assert_eq!(header.mask, Some([0x37, 0xfa, 0x21, 0x3d]));
    let start = cursor.position() as usize;
    let payload = &masked[start..start + payload_len as usize];
    let mask = header.mask.unwrap();
    let unmasked: Vec<u8> = payload
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ mask[i % 4])
        .collect();
    assert_eq!(unmasked, hex(T3));
    assert_eq!(
        Frame::from_message(Bytes::from(unmasked), Limits::INBOUND)
            .unwrap()
            .op,
        op::HEARTBEAT
    );

    assert_eq!(
        tungstenite::handshake::derive_accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
}

/// Encodes `message`, compares with `hex`, and decodes `hex` back.
fn proto_both_ways<M: Message + Default + PartialEq + std::fmt::Debug>(
    message: &M,
    hex_text: &str,
) {
    let bytes = hex(hex_text);
    assert_eq!(message.encode_to_vec(), bytes, "encode");
    assert_eq!(
        &M::decode(bytes.as_slice()).expect("decodes"),
        message,
        "decode"
    );
}

#[test]
fn t12_kafka_push_records() {
    proto_both_ways(
        &PushMsg {
            r#type: push_msg::Type::Room.into(),
            operation: 1000,
            room: "live://1000".into(),
            msg: Bytes::from_static(b"hello"),
            ..Default::default()
        },
        "08 01 10 e8 07 2a 0b 6c 69 76 65 3a 2f 2f 31 30 30 30 3a 05 68 65 6c 6c 6f",
    );
    proto_both_ways(
        &PushMsg {
            r#type: push_msg::Type::Push.into(),
            operation: 1000,
            server: "comet-01".into(),
            keys: vec!["k1".into(), "k2".into()],
            msg: Bytes::from_static(b"hi"),
            ..Default::default()
        },
        "10 e8 07 22 08 63 6f 6d 65 74 2d 30 31 32 02 6b 31 32 02 6b 32 3a 02 68 69",
    );
    proto_both_ways(
        &PushMsg {
            r#type: push_msg::Type::Broadcast.into(),
            operation: 1000,
            speed: 100,
            msg: Bytes::from_static(b"x"),
            ..Default::default()
        },
        "08 02 10 e8 07 18 64 3a 01 78",
    );
}

#[test]
fn t13_grpc_payloads() {
    proto_both_ways(
        &pb::ConnectReply {
            mid: 123,
            key: "k1".into(),
            room_id: "live://1000".into(),
            accepts: vec![1000, 1001, 1002],
            heartbeat: 480_000_000_000,
            // Herald's field 16 is absent from goim's bytes: false.
            herald_redirect: false,
        },
        "08 7b 12 02 6b 31 1a 0b 6c 69 76 65 3a 2f 2f 31 30 30 30 22 06 e8 07 e9 07 ea 07 28 80 80 eb 91 fc 0d",
    );
    proto_both_ways(
        &pb::goim::logic::OnlineReq {
            server: "comet-01".into(),
            room_count: [("live://1000".to_owned(), 3)].into_iter().collect(),
        },
        "0a 08 63 6f 6d 65 74 2d 30 31 12 0f 0a 0b 6c 69 76 65 3a 2f 2f 31 30 30 30 10 03",
    );
    let t5 = hex(T5);
    let mut expected = hex("0a 02 6b 31 12 1b 08 01 10 09 22 15");
    expected.extend(&t5);
    expected.extend(hex("18 e8 07"));
    let request = pb::PushMsgReq {
        keys: vec!["k1".into()],
        proto: Some(ws::raw_proto(Bytes::from(t5))),
        proto_op: 1000,
    };
    assert_eq!(request.encode_to_vec(), expected);
    assert_eq!(
        pb::PushMsgReq::decode(expected.as_slice()).unwrap(),
        request
    );
}

#[test]
fn inbound_limits_and_rejections() {
    // 4112 is the largest accepted inbound frame; one byte more closes.
    let largest = Frame::push(1000, vec![0u8; 4096]);
    let mut buf = BytesMut::from(largest.to_bytes().as_ref());
    assert_eq!(Frame::decode(&mut buf, Limits::INBOUND), Ok(Some(largest)));
    let too_big = Frame::push(1000, vec![0u8; 4097]).to_bytes();
    let mut buf = BytesMut::from(too_big.as_ref());
    assert_eq!(
        Frame::decode(&mut buf, Limits::INBOUND),
        Err(frame::Error::TooLarge {
            pack_len: 4113,
            max: 4112
        })
    );
    // The refusal comes from the header alone: no need to wait for the body.
    let mut header_only = BytesMut::from(&too_big[..16]);
    assert!(Frame::decode(&mut header_only, Limits::INBOUND).is_err());

    // header_len other than 16.
    let mut bad = hex(T3);
    bad[5] = 0x11;
    assert_eq!(
        Frame::decode(&mut BytesMut::from(bad.as_slice()), Limits::INBOUND),
        Err(frame::Error::BadHeaderLen(17))
    );
}

#[test]
fn short_pack_len_is_an_empty_body_unless_strict() {
    // pack_len 5 (< 16) followed by the next frame: goim reads 16 bytes, no body.
    let mut stream = hex("00 00 00 05 00 10 00 01 00 00 00 02 00 00 00 09");
    stream.extend(hex(T3));
    let mut buf = BytesMut::from(stream.as_slice());
    let first = Frame::decode(&mut buf, Limits::INBOUND).unwrap().unwrap();
    assert_eq!(
        (first.op, first.seq, first.body.len()),
        (op::HEARTBEAT, 9, 0)
    );
    assert_eq!(
        Frame::decode(&mut buf, Limits::INBOUND).unwrap().unwrap(),
        decode_one(&hex(T3))
    );

    let strict = Limits {
        strict: true,
        ..Limits::INBOUND
    };
    let mut buf = BytesMut::from(stream.as_slice());
    assert_eq!(
        Frame::decode(&mut buf, strict),
        Err(frame::Error::ShortPackLen(5))
    );
}

#[test]
fn websocket_message_rules() {
    // Shorter than its pack_len: refused, never read past the message.
    let t5 = hex(T5);
    let cut = Bytes::copy_from_slice(&t5[..t5.len() - 1]);
    assert_eq!(
        Frame::from_message(cut, Limits::INBOUND),
        Err(frame::Error::Truncated {
            pack_len: 21,
            len: 20
        })
    );
    // Shorter than a header.
    assert!(matches!(
        Frame::from_message(Bytes::from_static(&[0, 0, 0, 16]), Limits::INBOUND),
        Err(frame::Error::Truncated { .. })
    ));
    // Negative pack_len is refused on WebSocket even in lenient mode.
    let negative = hex("ff ff ff ff 00 10 00 01 00 00 00 02 00 00 00 01");
    assert_eq!(
        Frame::from_message(Bytes::from(negative), Limits::INBOUND),
        Err(frame::Error::ShortPackLen(-1))
    );
    // Bytes after pack_len are ignored, as goim does.
    let mut long = t5;
    long.extend_from_slice(b"trailing");
    let frame = Frame::from_message(Bytes::from(long), Limits::OUTBOUND).unwrap();
    assert_eq!(frame.body.as_ref(), b"hello");
}

#[test]
fn batch_with_a_partial_tail_is_an_error() {
    let mut body = hex(T7_TCP);
    body.truncate(40);
    let results: Vec<_> = ws::frames(Bytes::from(body), Limits::OUTBOUND).collect();
    assert_eq!(results.len(), 2);
    assert!(results[0].is_ok());
    assert!(matches!(results[1], Err(frame::Error::Truncated { .. })));
}
