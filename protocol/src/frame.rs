//! The client frame: a fixed 16-byte header and a body (§2).
//!
//! ```text
//! 0..4 pack_len i32 | 4..6 header_len i16 = 16 | 6..8 ver i16 | 8..12 op i32 | 12..16 seq i32 | body
//! ```
//! All integers are signed big-endian. Bodies are [`Bytes`], so a decoded frame
//! shares the read buffer's allocation instead of copying, and an encoded push
//! can be shared by every connection it goes to.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes in every frame header.
pub const HEADER_LEN: usize = 16;
/// The largest frame a client may send (body ≤ 4096), as goim enforces.
pub const MAX_INBOUND_PACK_LEN: usize = 4112;
/// Default cap for frames a *server* sends: room batches and large HTTP bodies
/// go well past the inbound limit, so readers of server output need room.
pub const DEFAULT_MAX_OUTBOUND_PACK_LEN: usize = 1 << 20;

/// Why a frame was refused. Every variant means "close the connection".
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// `header_len` was not 16.
    #[error("header_len is {0}, expected 16")]
    BadHeaderLen(i16),
    /// `pack_len` is larger than this reader accepts.
    #[error("pack_len {pack_len} exceeds the limit of {max} bytes")]
    TooLarge {
        /// The declared length.
        pack_len: i32,
        /// The limit in force.
        max: usize,
    },
    /// `pack_len` is below 16: negative (always refused on WebSocket), or any
    /// short value in strict mode.
    #[error("pack_len {0} is shorter than the header")]
    ShortPackLen(i32),
    /// A whole message (WebSocket) holds fewer bytes than its header declares.
    /// goim sliced past the message here and leaked old buffer contents.
    #[error("message holds {len} bytes but declares pack_len {pack_len}")]
    Truncated {
        /// The declared length.
        pack_len: i32,
        /// Bytes actually present.
        len: usize,
    },
}

/// What a reader accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted `pack_len`.
    pub max_pack_len: usize,
    /// Refuse `pack_len < 16` instead of reading it as "no body" (goim's
    /// lenient behaviour, which sloppy clients rely on).
    pub strict: bool,
}

impl Limits {
    /// What a server accepts from clients: 4112 bytes, lenient.
    pub const INBOUND: Limits = Limits {
        max_pack_len: MAX_INBOUND_PACK_LEN,
        strict: false,
    };
    /// What a client accepts from a server: 1 MiB, lenient.
    pub const OUTBOUND: Limits = Limits {
        max_pack_len: DEFAULT_MAX_OUTBOUND_PACK_LEN,
        strict: false,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::INBOUND
    }
}

/// One goim frame.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Frame {
    /// Free-form version; servers echo it and use 1 for pushes.
    pub ver: i16,
    /// Operation code, see [`crate::op`].
    pub op: i32,
    /// Client-chosen sequence number; echoed in replies, 0 in pushes.
    pub seq: i32,
    /// The body, shared rather than copied.
    pub body: Bytes,
}

/// The decoded fixed header, before the body has arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Total bytes this frame occupies in the stream (≥ 16).
    pub frame_len: usize,
    /// Declared version.
    pub ver: i16,
    /// Declared op.
    pub op: i32,
    /// Declared seq.
    pub seq: i32,
}

impl Header {
    /// Parses and validates the first 16 bytes of `buf`.
    ///
    /// Returns `Ok(None)` when fewer than 16 bytes are present: that is
    /// "incomplete", not an error.
    ///
    /// # Errors
    /// [`Error`] when the header breaks `limits`.
    pub fn parse(buf: &[u8], limits: Limits) -> Result<Option<Header>, Error> {
        let Some(mut head) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let pack_len = head.get_i32();
        let header_len = head.get_i16();
        let ver = head.get_i16();
        let op = head.get_i32();
        let seq = head.get_i32();
        if usize::try_from(header_len) != Ok(HEADER_LEN) {
            return Err(Error::BadHeaderLen(header_len));
        }
        let frame_len = match usize::try_from(pack_len) {
            Ok(len) if len > limits.max_pack_len => {
                return Err(Error::TooLarge {
                    pack_len,
                    max: limits.max_pack_len,
                });
            }
            Ok(len) if len >= HEADER_LEN => len,
            // goim reads a short (even negative) pack_len on a stream as "no
            // body": 16 bytes consumed, empty body.
            _ if !limits.strict => HEADER_LEN,
            _ => return Err(Error::ShortPackLen(pack_len)),
        };
        Ok(Some(Header {
            frame_len,
            ver,
            op,
            seq,
        }))
    }
}

impl Frame {
    /// A server push: ver 1, seq 0.
    pub fn push(op: i32, body: impl Into<Bytes>) -> Frame {
        Frame {
            ver: 1,
            op,
            seq: 0,
            body: body.into(),
        }
    }

    /// A reply to `self`: same ver and seq, the given op and body.
    pub fn reply(&self, op: i32, body: impl Into<Bytes>) -> Frame {
        Frame {
            ver: self.ver,
            op,
            seq: self.seq,
            body: body.into(),
        }
    }

    /// Bytes this frame occupies when encoded.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.body.len()
    }

    /// Appends the encoded frame to `dst`.
    ///
    /// # Panics
    /// If the body is longer than `i32::MAX - 16` bytes, which no limit here allows.
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.reserve(self.encoded_len());
        put_header(dst, self.body.len(), self.ver, self.op, self.seq);
        dst.put_slice(&self.body);
    }

    /// The encoded frame as one buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut buf);
        buf.freeze()
    }

    /// Streaming decode: takes one frame off the front of `buf`.
    ///
    /// Returns `Ok(None)` while the frame is incomplete, leaving `buf`
    /// untouched; never consumes more than the declared frame.
    ///
    /// # Errors
    /// [`Error`] when the header breaks `limits`; the stream is then unusable.
    pub fn decode(buf: &mut BytesMut, limits: Limits) -> Result<Option<Frame>, Error> {
        let Some(header) = Header::parse(buf, limits)? else {
            return Ok(None);
        };
        if buf.len() < header.frame_len {
            // Ask for the rest in one allocation rather than growing piecemeal.
            buf.reserve(header.frame_len - buf.len());
            return Ok(None);
        }
        let mut frame = buf.split_to(header.frame_len);
        frame.advance(HEADER_LEN);
        Ok(Some(Frame {
            ver: header.ver,
            op: header.op,
            seq: header.seq,
            body: frame.freeze(),
        }))
    }

    /// Decodes one whole message, as a WebSocket data message carries exactly
    /// one frame. Bytes after `pack_len` are ignored, as goim does.
    ///
    /// # Errors
    /// [`Error::Truncated`] when the message is shorter than 16 bytes or than its
    /// `pack_len` (goim read past the message here); [`Error::ShortPackLen`] for
    /// a negative `pack_len`; otherwise as [`Header::parse`].
    pub fn from_message(msg: Bytes, limits: Limits) -> Result<Frame, Error> {
        let declared = msg.get(..4).map(|mut b| b.get_i32()).unwrap_or(0);
        let header = Header::parse(&msg, limits)?.ok_or(Error::Truncated {
            pack_len: declared,
            len: msg.len(),
        })?;
        if declared < 0 {
            return Err(Error::ShortPackLen(declared));
        }
        if msg.len() < header.frame_len {
            return Err(Error::Truncated {
                pack_len: declared,
                len: msg.len(),
            });
        }
        Ok(Frame {
            ver: header.ver,
            op: header.op,
            seq: header.seq,
            body: msg.slice(HEADER_LEN..header.frame_len),
        })
    }
}

/// Writes a frame header for a body of `body_len` bytes.
///
/// # Panics
/// If `body_len + 16` does not fit in an i32.
pub fn put_header(dst: &mut impl BufMut, body_len: usize, ver: i16, op: i32, seq: i32) {
    let pack_len = i32::try_from(HEADER_LEN + body_len).expect("frame longer than i32::MAX");
    dst.put_i32(pack_len);
    dst.put_i16(HEADER_LEN as i16);
    dst.put_i16(ver);
    dst.put_i32(op);
    dst.put_i32(seq);
}

/// Failure of [`FrameCodec`]: a refused frame, or the transport's I/O error.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The peer sent a frame that breaks the protocol.
    #[error(transparent)]
    Frame(#[from] Error),
    /// Reading or writing the transport failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A `tokio_util` codec for framed byte streams (TCP).
#[derive(Debug, Clone, Copy, Default)]
pub struct FrameCodec {
    /// What the decoder accepts.
    pub limits: Limits,
}

impl tokio_util::codec::Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        Ok(Frame::decode(src, self.limits)?)
    }
}

impl tokio_util::codec::Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        frame.encode(dst);
        Ok(())
    }
}
