//! The bytes the generator sends and the streaming scanner that counts what
//! it receives, without allocating or decoding bodies.
//!
//! Every benchmark message is a goim frame with op [`BENCH_OP`], the room's
//! (or key's) sequence number in the header's `seq` field, and a 16-byte body
//! `{scheduled send time in ns since the run's epoch, seq}`. Sinks only walk
//! headers (length prefix, op, seq); probes also read the first 8 body bytes
//! to get a latency. The same scanner walks WebSocket streams: it strips the
//! server's (unmasked) WebSocket frame headers and descends into op-9 batches
//! instead of skipping them.

use bytes::{BufMut, BytesMut};
use hdrhistogram::Histogram;
use herald_protocol::frame::{HEADER_LEN, put_header};
use herald_protocol::op;

/// The business op of every benchmark message; tokens accept only it.
pub(crate) const BENCH_OP: i32 = 1000;
/// Body length of a benchmark message: send time and seq, big-endian u64s.
pub(crate) const BODY_LEN: usize = 16;
/// Encoded length of one benchmark message.
pub(crate) const MSG_LEN: usize = HEADER_LEN + BODY_LEN;

/// The goim JSON token of client `mid` (key `b<mid>`) in `room`.
pub(crate) fn token(mid: u64, room: &str) -> Vec<u8> {
    format!(r#"{{"mid":{mid},"key":"b{mid}","room_id":"{room}","accepts":[{BENCH_OP}]}}"#)
        .into_bytes()
}

/// The key a client with `mid` gets from [`token`].
pub(crate) fn key(mid: u64) -> String {
    format!("b{mid}")
}

/// The op-7 frame that authenticates with `token`.
pub(crate) fn auth_frame(token: &[u8]) -> Vec<u8> {
    let mut buf = BytesMut::with_capacity(HEADER_LEN + token.len());
    put_header(&mut buf, token.len(), 1, op::AUTH, 1);
    buf.put_slice(token);
    buf.to_vec()
}

/// The op-8 reply to an authentication, as S4's floor sends it.
pub(crate) fn auth_reply_frame() -> Vec<u8> {
    let mut buf = BytesMut::with_capacity(HEADER_LEN);
    put_header(&mut buf, 0, 1, op::AUTH_REPLY, 1);
    buf.to_vec()
}

/// The op-2 heartbeat frame, encoded once and sent by every client.
pub(crate) fn heartbeat_frame() -> Vec<u8> {
    let mut buf = BytesMut::with_capacity(HEADER_LEN);
    put_header(&mut buf, 0, 1, op::HEARTBEAT, 2);
    buf.to_vec()
}

/// The HTTP request that upgrades a connection to WebSocket on `/sub`.
pub(crate) fn ws_upgrade(host: &str) -> Vec<u8> {
    // The key is fixed: the server only echoes a digest of it, and nothing
    // in a benchmark relies on its unpredictability.
    format!(
        "GET /sub HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: aGVyYWxkLWJlbmNoLWtleQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// One masked binary WebSocket frame carrying `payload` (clients must mask).
pub(crate) fn ws_client_frame(payload: &[u8]) -> Vec<u8> {
    const MASK: [u8; 4] = [0x5a, 0x17, 0xc3, 0x81];
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x82);
    match payload.len() {
        len @ 0..=125 => out.push(0x80 | len as u8),
        len @ 126..=0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    out
}

/// Writes benchmark message `seq` scheduled at `send_ns` into `dst`.
pub(crate) fn put_message(dst: &mut Vec<u8>, seq: i32, send_ns: u64) {
    let mut header = [0u8; HEADER_LEN];
    put_header(&mut &mut header[..], BODY_LEN, 1, BENCH_OP, seq);
    dst.extend_from_slice(&header);
    dst.extend_from_slice(&send_ns.to_be_bytes());
    dst.extend_from_slice(&(seq as u64).to_be_bytes());
}

/// The body alone of message `seq` (for a non-batched push proto).
pub(crate) fn message_body(seq: i32, send_ns: u64) -> Vec<u8> {
    let mut body = Vec::with_capacity(BODY_LEN);
    body.extend_from_slice(&send_ns.to_be_bytes());
    body.extend_from_slice(&(seq as u64).to_be_bytes());
    body
}

/// What one client has seen so far.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Tally {
    /// Benchmark messages received.
    pub(crate) messages: u64,
    /// Messages skipped over in sequence (gaps).
    pub(crate) lost: u64,
    /// Messages that arrived with a sequence number already passed.
    pub(crate) reordered: u64,
    /// Authentication replies (op 8).
    pub(crate) auth_replies: u64,
    /// Bytes read.
    pub(crate) bytes: u64,
}

/// Streaming state of one connection's inbound bytes.
#[derive(Debug, Clone)]
pub(crate) struct Scanner {
    ws: bool,
    ws_hdr: [u8; 14],
    ws_hdr_len: u8,
    ws_payload_left: u64,
    ws_feed: bool,
    hdr: [u8; HEADER_LEN],
    hdr_len: u8,
    body_left: u32,
    cur_op: i32,
    /// The first body bytes of the current message: send time, then seq.
    body: [u8; BODY_LEN],
    body_len: u8,
    next_seq: i32,
    /// Take the sequence number from the body instead of the header: pushes
    /// through logic and job carry header seq 0 (as goim's do), so only the
    /// body still has the number the injector gave the message.
    body_seq: bool,
}

impl Scanner {
    /// A scanner for a raw TCP (`ws == false`) or WebSocket stream that
    /// checks sequence numbers in the header (`body_seq == false`) or body.
    pub(crate) fn new(ws: bool, body_seq: bool) -> Scanner {
        Scanner {
            ws,
            ws_hdr: [0; 14],
            ws_hdr_len: 0,
            ws_payload_left: 0,
            ws_feed: false,
            hdr: [0; HEADER_LEN],
            hdr_len: 0,
            body_left: 0,
            cur_op: 0,
            body: [0; BODY_LEN],
            body_len: 0,
            next_seq: 1,
            body_seq,
        }
    }

    /// Walks `data`, counting into `tally`; with `latency`, records
    /// `now_ns - send time` of each benchmark message into it.
    pub(crate) fn feed(
        &mut self,
        mut data: &[u8],
        tally: &mut Tally,
        now_ns: u64,
        mut latency: Option<&mut Histogram<u64>>,
    ) {
        tally.bytes += data.len() as u64;
        if !self.ws {
            self.goim(data, tally, now_ns, &mut latency);
            return;
        }
        while !data.is_empty() {
            if self.ws_payload_left > 0 {
                let take = usize::try_from(self.ws_payload_left)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                if self.ws_feed {
                    self.goim(&data[..take], tally, now_ns, &mut latency);
                }
                self.ws_payload_left -= take as u64;
                data = &data[take..];
                continue;
            }
            // Accumulate a WebSocket frame header: 2 bytes, then the extended
            // length (and a mask, which servers never send) they announce.
            self.ws_hdr[usize::from(self.ws_hdr_len)] = data[0];
            self.ws_hdr_len += 1;
            data = &data[1..];
            if self.ws_hdr_len < 2 {
                continue;
            }
            let len7 = self.ws_hdr[1] & 0x7f;
            let ext = match len7 {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            let mask = if self.ws_hdr[1] & 0x80 != 0 { 4 } else { 0 };
            if usize::from(self.ws_hdr_len) < 2 + ext + mask {
                continue;
            }
            let len = match ext {
                2 => u64::from(u16::from_be_bytes([self.ws_hdr[2], self.ws_hdr[3]])),
                8 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&self.ws_hdr[2..10]);
                    u64::from_be_bytes(b)
                }
                _ => u64::from(len7),
            };
            // Binary, text and continuation frames carry goim frames; control
            // frames (ping, pong, close) are skipped.
            self.ws_feed = self.ws_hdr[0] & 0x0f <= 2;
            self.ws_payload_left = len;
            self.ws_hdr_len = 0;
        }
    }

    fn goim(
        &mut self,
        mut data: &[u8],
        tally: &mut Tally,
        now_ns: u64,
        latency: &mut Option<&mut Histogram<u64>>,
    ) {
        while !data.is_empty() {
            if self.body_left > 0 {
                let take = (self.body_left as usize).min(data.len());
                // Probes need the send time (8 bytes), body-seq scanners
                // also the seq after it.
                let need = if self.body_seq {
                    BODY_LEN
                } else if latency.is_some() {
                    8
                } else {
                    0
                };
                if self.cur_op == BENCH_OP && usize::from(self.body_len) < need {
                    let want = (need - usize::from(self.body_len)).min(take);
                    let at = usize::from(self.body_len);
                    self.body[at..at + want].copy_from_slice(&data[..want]);
                    self.body_len += want as u8;
                }
                self.body_left -= take as u32;
                data = &data[take..];
                if self.body_left == 0 {
                    self.frame_done(now_ns, tally, latency);
                }
                continue;
            }
            // Fast path: a whole header in the input is read in place; only a
            // header split across reads is copied into `hdr`.
            let h: [u8; HEADER_LEN] = if self.hdr_len == 0 && data.len() >= HEADER_LEN {
                let mut h = [0u8; HEADER_LEN];
                h.copy_from_slice(&data[..HEADER_LEN]);
                data = &data[HEADER_LEN..];
                h
            } else {
                let want = (HEADER_LEN - usize::from(self.hdr_len)).min(data.len());
                let at = usize::from(self.hdr_len);
                self.hdr[at..at + want].copy_from_slice(&data[..want]);
                self.hdr_len += want as u8;
                data = &data[want..];
                if usize::from(self.hdr_len) < HEADER_LEN {
                    continue;
                }
                self.hdr_len = 0;
                self.hdr
            };
            let pack_len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
            self.cur_op = i32::from_be_bytes([h[8], h[9], h[10], h[11]]);
            let seq = i32::from_be_bytes([h[12], h[13], h[14], h[15]]);
            if self.cur_op == op::RAW {
                // An op-9 batch: its body is more frames; walk into them.
                continue;
            }
            if self.cur_op == BENCH_OP && !self.body_seq {
                self.check_seq(seq, tally);
            } else if self.cur_op == op::AUTH_REPLY {
                tally.auth_replies += 1;
            }
            self.body_len = 0;
            self.body_left = pack_len.saturating_sub(HEADER_LEN as u32);
            if self.body_left == 0 {
                self.frame_done(now_ns, tally, latency);
            }
        }
    }

    fn check_seq(&mut self, seq: i32, tally: &mut Tally) {
        tally.messages += 1;
        if seq == self.next_seq {
            self.next_seq += 1;
        } else if seq > self.next_seq {
            tally.lost += (seq - self.next_seq) as u64;
            self.next_seq = seq + 1;
        } else {
            tally.reordered += 1;
        }
    }

    fn frame_done(
        &mut self,
        now_ns: u64,
        tally: &mut Tally,
        latency: &mut Option<&mut Histogram<u64>>,
    ) {
        if self.cur_op == BENCH_OP && self.body_seq {
            // A body too short to carry a seq counts as a gap, not a crash.
            let seq = if usize::from(self.body_len) == BODY_LEN {
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.body[8..]);
                i32::try_from(u64::from_be_bytes(b)).unwrap_or(i32::MAX)
            } else {
                i32::MAX
            };
            self.check_seq(seq, tally);
        }
        if self.cur_op == BENCH_OP
            && self.body_len >= 8
            && let Some(hist) = latency.as_deref_mut()
        {
            let mut b = [0u8; 8];
            b.copy_from_slice(&self.body[..8]);
            let sent = u64::from_be_bytes(b);
            hist.saturating_record(now_ns.saturating_sub(sent).max(1));
        }
        self.cur_op = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist() -> Histogram<u64> {
        crate::load::new_histogram()
    }

    #[test]
    fn tcp_frames_split_anywhere_count_and_time() {
        let mut stream = Vec::new();
        for seq in 1..=5 {
            put_message(&mut stream, seq, 1_000);
        }
        // A reply frame between them must not count.
        stream.extend_from_slice(&heartbeat_frame());
        put_message(&mut stream, 7, 2_000); // seq 6 lost
        put_message(&mut stream, 3, 2_000); // reordered
        for chunk in [1, 3, 16, 31, 1000] {
            let mut scanner = Scanner::new(false, false);
            let mut tally = Tally::default();
            let mut h = hist();
            for piece in stream.chunks(chunk) {
                scanner.feed(piece, &mut tally, 5_000, Some(&mut h));
            }
            assert_eq!(tally.messages, 7, "chunk {chunk}");
            assert_eq!(tally.lost, 1);
            assert_eq!(tally.reordered, 1);
            assert_eq!(h.len(), 7);
            assert_eq!(h.max(), h.highest_equivalent(4_000));
        }
    }

    #[test]
    fn ws_batches_are_walked_into() {
        // Server frames: auth reply (unwrapped), then an op-9 batch of 3 messages.
        let auth = auth_reply_frame();
        let mut inner = Vec::new();
        for seq in 1..=3 {
            put_message(&mut inner, seq, 10);
        }
        let batch = herald_protocol::ws::wrap(&inner);
        let mut stream = vec![0x82, auth.len() as u8];
        stream.extend_from_slice(&auth);
        stream.extend_from_slice(&[0x82, 126]);
        stream.extend_from_slice(&(batch.len() as u16).to_be_bytes());
        stream.extend_from_slice(&batch);
        for chunk in [1, 2, 7, 500] {
            let mut scanner = Scanner::new(true, false);
            let mut tally = Tally::default();
            for piece in stream.chunks(chunk) {
                scanner.feed(piece, &mut tally, 50, None);
            }
            assert_eq!(tally.auth_replies, 1);
            assert_eq!(tally.messages, 3);
            assert_eq!(tally.lost, 0);
        }
    }

    /// Messages through logic and job: header seq 0, the seq in the body.
    #[test]
    fn body_seq_scanner_counts_gaps_and_reorders_from_the_body() {
        let mut stream = Vec::new();
        for seq in [1u64, 2, 4, 3] {
            let mut b = BytesMut::new();
            put_header(&mut b, BODY_LEN, 1, BENCH_OP, 0);
            stream.extend_from_slice(&b);
            stream.extend_from_slice(&500u64.to_be_bytes());
            stream.extend_from_slice(&seq.to_be_bytes());
        }
        for chunk in [1, 5, 17, 1000] {
            for probe in [false, true] {
                let mut scanner = Scanner::new(false, true);
                let mut tally = Tally::default();
                let mut h = hist();
                for piece in stream.chunks(chunk) {
                    let lat = probe.then_some(&mut h);
                    scanner.feed(piece, &mut tally, 2_500, lat);
                }
                assert_eq!(tally.messages, 4, "chunk {chunk}");
                assert_eq!(tally.lost, 1, "seq 3 skipped at first");
                assert_eq!(tally.reordered, 1, "seq 3 late");
                if probe {
                    assert_eq!(h.len(), 4);
                    assert_eq!(h.max(), h.highest_equivalent(2_000));
                }
            }
        }
    }

    #[test]
    fn client_ws_frame_is_masked_and_sized() {
        let frame = ws_client_frame(&[1u8; 200]);
        assert_eq!(frame[0], 0x82);
        assert_eq!(frame[1], 0x80 | 126);
        assert_eq!(u16::from_be_bytes([frame[2], frame[3]]), 200);
        assert_eq!(frame.len(), 4 + 4 + 200);
        assert_ne!(frame[8], 1);
    }
}
