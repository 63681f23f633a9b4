//! WebSocket push wrapping and batched frames (§4, §8.3).
//!
//! Job sends comets a pre-encoded proto `{ver 1, op 9, body = client frame(s)}`.
//! A TCP client gets the body bytes as they are (several frames back to back);
//! a WebSocket client gets them inside one op-9 frame per message. Replies to
//! client requests are never wrapped.

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::{self, Frame, HEADER_LEN, Limits};
use crate::op;
use crate::pb::Proto;

/// The op-9 header that precedes `inner_len` bytes of frames on WebSocket.
pub fn raw_header(inner_len: usize) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    frame::put_header(&mut &mut header[..], inner_len, 1, op::RAW, 0);
    header
}

/// One WebSocket message carrying `inner` (complete frames) in an op-9 frame.
pub fn wrap(inner: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(HEADER_LEN + inner.len());
    buf.put_slice(&raw_header(inner.len()));
    buf.put_slice(inner);
    buf.freeze()
}

/// The bytes a TCP client receives for a push proto: an op-9 proto's body
/// verbatim (shared, not copied), any other proto encoded as one frame.
pub fn push_for_tcp(proto: &Proto) -> Bytes {
    if proto.op == op::RAW {
        proto.body.clone()
    } else {
        proto_frame(proto).to_bytes()
    }
}

/// The WebSocket message for a push proto: always one op-9 frame.
pub fn push_for_ws(proto: &Proto) -> Bytes {
    if proto.op == op::RAW {
        wrap(&proto.body)
    } else {
        wrap(&proto_frame(proto).to_bytes())
    }
}

/// The op-9 proto job sends for `frames` already encoded back to back.
pub fn raw_proto(frames: Bytes) -> Proto {
    Proto {
        ver: 1,
        op: op::RAW,
        seq: 0,
        body: frames,
    }
}

fn proto_frame(proto: &Proto) -> Frame {
    Frame {
        // goim's proto ver is an int32 carried into an int16 header field;
        // truncation matches what goim puts on the wire.
        ver: proto.ver as i16,
        op: proto.op,
        seq: proto.seq,
        body: proto.body.clone(),
    }
}

/// Why a push proto may not be written to clients.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// It would put a reserved op ([`op::is_reserved`]) on the wire.
    #[error("op {0} is reserved: never pushed")]
    ReservedOp(i32),
    /// An op-9 body that is not whole frames: written verbatim, it would
    /// leave TCP clients' streams unreadable, and could hide a reserved op
    /// from this check behind a header other decoders read differently.
    #[error("op-9 body is not whole frames")]
    NotFrames(#[source] frame::Error),
}

/// Checks a push proto before any client gets it: its own op, or for an
/// op-9 proto every frame in its body, must be a pushable op.
///
/// # Errors
/// [`PushError`] says which rule the proto breaks.
pub fn check_push(proto: &Proto) -> Result<(), PushError> {
    if proto.op != op::RAW {
        return match proto.op {
            reserved if op::is_reserved(reserved) => Err(PushError::ReservedOp(reserved)),
            _ => Ok(()),
        };
    }
    let any_size = Limits {
        max_pack_len: usize::MAX,
        strict: false,
    };
    for frame in frames(proto.body.clone(), any_size) {
        let frame = frame.map_err(PushError::NotFrames)?;
        if op::is_reserved(frame.op) {
            return Err(PushError::ReservedOp(frame.op));
        }
    }
    Ok(())
}

/// Iterates the frames packed back to back in a batch body (op 9's body).
///
/// Yields an error, then stops, when the remainder is not a whole frame.
#[derive(Debug, Clone)]
pub struct Frames {
    rest: Bytes,
    limits: Limits,
}

/// Iterates the frames in `body` with the given limits.
pub fn frames(body: Bytes, limits: Limits) -> Frames {
    Frames { rest: body, limits }
}

impl Iterator for Frames {
    type Item = Result<Frame, frame::Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let header = match frame::Header::parse(&self.rest, self.limits) {
            Ok(Some(header)) if header.frame_len <= self.rest.len() => header,
            other => {
                let err = match other {
                    Err(err) => err,
                    Ok(_) => frame::Error::Truncated {
                        pack_len: declared_len(&self.rest),
                        len: self.rest.len(),
                    },
                };
                self.rest.clear();
                return Some(Err(err));
            }
        };
        let whole = self.rest.split_to(header.frame_len);
        Some(Ok(Frame {
            ver: header.ver,
            op: header.op,
            seq: header.seq,
            body: whole.slice(HEADER_LEN..),
        }))
    }
}

fn declared_len(buf: &[u8]) -> i32 {
    buf.get(..4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, i32::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(ops: &[i32]) -> Proto {
        let mut body = BytesMut::new();
        for &op in ops {
            body.put_slice(&Frame::push(op, &b"x"[..]).to_bytes());
        }
        raw_proto(body.freeze())
    }

    #[test]
    fn pushes_of_reserved_ops_are_refused_wrapped_or_not() {
        assert!(check_push(&batch(&[1000, 1001])).is_ok());
        for reserved in [10, 11, 18, 19, 20, 31] {
            assert!(matches!(
                check_push(&batch(&[1000, reserved])),
                Err(PushError::ReservedOp(op)) if op == reserved
            ));
            let bare = Proto {
                ver: 1,
                op: reserved,
                seq: 0,
                body: Bytes::new(),
            };
            assert!(matches!(check_push(&bare), Err(PushError::ReservedOp(_))));
        }
    }

    #[test]
    fn a_batch_that_is_not_whole_frames_is_refused() {
        let mut body = Frame::push(1000, &b"x"[..]).to_bytes().to_vec();
        body.extend_from_slice(&[0, 0, 0, 40, 0, 16]);
        assert!(matches!(
            check_push(&raw_proto(body.into())),
            Err(PushError::NotFrames(_))
        ));
    }
}
