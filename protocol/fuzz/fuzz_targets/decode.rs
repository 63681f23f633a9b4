//! Feeds arbitrary bytes to every decoder a peer can reach: the streaming
//! decoder (in chunks, as a socket delivers them), the WebSocket message
//! decoder, and batch iteration. None may panic, consume more than it was
//! given, or hand out a body that is not a slice of the input.
#![no_main]

use bytes::{Bytes, BytesMut};
use herald_protocol::frame::{Frame, HEADER_LEN, Limits};
use herald_protocol::ws;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, input)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk.max(1));
    for limits in [Limits::INBOUND, Limits { strict: true, ..Limits::INBOUND }, Limits::OUTBOUND] {
        let mut buf = BytesMut::new();
        let mut consumed = 0;
        'feed: for piece in input.chunks(chunk) {
            buf.extend_from_slice(piece);
            loop {
                let before = buf.len();
                match Frame::decode(&mut buf, limits) {
                    Ok(Some(frame)) => {
                        assert!(frame.body.len() + HEADER_LEN <= before);
                        assert_eq!(before - buf.len(), (HEADER_LEN + frame.body.len()).max(HEADER_LEN));
                        let start = consumed + HEADER_LEN;
                        assert_eq!(&frame.body[..], &input[start..start + frame.body.len()]);
                        consumed += before - buf.len();
                    }
                    Ok(None) => {
                        assert_eq!(buf.len(), before);
                        break;
                    }
                    Err(_) => break 'feed,
                }
            }
        }
        assert!(consumed <= input.len());

        if let Ok(frame) = Frame::from_message(Bytes::copy_from_slice(input), limits) {
            assert!(HEADER_LEN + frame.body.len() <= input.len());
        }
        let mut total = 0;
        for frame in ws::frames(Bytes::copy_from_slice(input), limits).flatten() {
            total += HEADER_LEN + frame.body.len();
        }
        assert!(total <= input.len());
    }
});
