//! Property tests for the codec: round trips, arbitrary chunking of a stream,
//! and that decoding never consumes more than the declared frame or the bytes
//! received.

use bytes::{Bytes, BytesMut};
use herald_protocol::frame::{Frame, HEADER_LEN, Limits};
use herald_protocol::ws;
use proptest::prelude::*;

fn frame_strategy(max_body: usize) -> impl Strategy<Value = Frame> {
    (
        any::<i16>(),
        any::<i32>(),
        any::<i32>(),
        proptest::collection::vec(any::<u8>(), 0..=max_body),
    )
        .prop_map(|(ver, op, seq, body)| Frame {
            ver,
            op,
            seq,
            body: Bytes::from(body),
        })
}

proptest! {
    #[test]
    fn encode_then_decode_is_identity(frame in frame_strategy(4096)) {
        let mut buf = BytesMut::from(frame.to_bytes().as_ref());
        prop_assert_eq!(Frame::decode(&mut buf, Limits::INBOUND), Ok(Some(frame.clone())));
        prop_assert!(buf.is_empty());
        prop_assert_eq!(Frame::from_message(frame.to_bytes(), Limits::INBOUND), Ok(frame));
    }

    #[test]
    fn a_stream_chopped_anywhere_decodes_the_same(
        frames in proptest::collection::vec(frame_strategy(300), 1..8),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let mut stream = BytesMut::new();
        for frame in &frames {
            frame.encode(&mut stream);
        }
        let stream = stream.freeze();
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        points.push(0);
        points.push(stream.len());
        points.sort_unstable();
        points.dedup();

        let mut buf = BytesMut::new();
        let mut decoded = Vec::new();
        for pair in points.windows(2) {
            buf.extend_from_slice(&stream[pair[0]..pair[1]]);
            while let Some(frame) = Frame::decode(&mut buf, Limits::INBOUND).unwrap() {
                decoded.push(frame);
            }
        }
        prop_assert_eq!(decoded, frames);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn decode_never_consumes_past_the_frame(
        frame in frame_strategy(512),
        trailing in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut bytes = frame.to_bytes().to_vec();
        bytes.extend_from_slice(&trailing);
        let mut buf = BytesMut::from(bytes.as_slice());
        prop_assert_eq!(Frame::decode(&mut buf, Limits::INBOUND), Ok(Some(frame)));
        prop_assert_eq!(buf.as_ref(), trailing.as_slice());
    }

    #[test]
    fn arbitrary_bytes_never_panic_or_overread(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut buf = BytesMut::from(bytes.as_slice());
        match Frame::decode(&mut buf, Limits::INBOUND) {
            Ok(Some(frame)) => {
                let consumed = bytes.len() - buf.len();
                prop_assert_eq!(consumed, HEADER_LEN + frame.body.len());
                prop_assert_eq!(frame.body.as_ref(), &bytes[HEADER_LEN..consumed]);
                prop_assert_eq!(buf.as_ref(), &bytes[consumed..]);
            }
            // Incomplete or refused: nothing consumed.
            Ok(None) | Err(_) => prop_assert_eq!(buf.as_ref(), bytes.as_slice()),
        }
        if let Ok(frame) = Frame::from_message(Bytes::from(bytes.clone()), Limits::INBOUND) {
            prop_assert!(HEADER_LEN + frame.body.len() <= bytes.len());
            prop_assert_eq!(frame.body.as_ref(), &bytes[HEADER_LEN..HEADER_LEN + frame.body.len()]);
        }
        let mut total = 0;
        for frame in ws::frames(Bytes::from(bytes.clone()), Limits::OUTBOUND).flatten() {
            total += HEADER_LEN + frame.body.len();
        }
        prop_assert!(total <= bytes.len());
    }

    #[test]
    fn batches_round_trip(frames in proptest::collection::vec(frame_strategy(200), 0..20)) {
        let mut body = BytesMut::new();
        for frame in &frames {
            frame.encode(&mut body);
        }
        let message = ws::push_for_ws(&ws::raw_proto(body.freeze()));
        let outer = Frame::from_message(message, Limits::OUTBOUND).unwrap();
        let inner: Vec<Frame> = ws::frames(outer.body, Limits::OUTBOUND).collect::<Result<_, _>>().unwrap();
        prop_assert_eq!(inner, frames);
    }
}
