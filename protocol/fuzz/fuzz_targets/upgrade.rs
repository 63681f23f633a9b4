//! The WebSocket upgrade head (`herald_protocol::upgrade`), read as comet
//! reads it: into a buffer of at most `MAX_UPGRADE_HEAD` bytes, in chunks
//! of the fuzzer's choosing. The verdict does not depend on the chunking;
//! an accepted head is `GET /sub` without a query, a prefix of the input
//! within the limits, answered 101; a head not whole within the limit is
//! always refused.
#![no_main]

use herald_protocol::upgrade::{MAX_UPGRADE_HEAD, MAX_UPGRADE_HEADERS, Refusal, parse_head};
use libfuzzer_sys::fuzz_target;

/// What comet concludes: the head's length and path, a refusal, or
/// `Ok(None)` when the client stopped sending before either (end of input).
type Verdict = Result<Option<(usize, String)>, Refusal>;

/// comet's read loop (comet/src/server/upgrade.rs) over `input` delivered
/// `chunk` bytes per read.
fn drive(input: &[u8], chunk: usize) -> Verdict {
    let mut buf: Vec<u8> = Vec::new();
    let mut rest = input;
    loop {
        match parse_head(&buf)? {
            Some(up) => {
                assert!(up.len <= buf.len());
                return Ok(Some((up.len, up.request.uri().to_string())));
            }
            None => assert!(buf.len() < MAX_UPGRADE_HEAD),
        }
        let space = MAX_UPGRADE_HEAD - buf.len();
        let n = chunk.min(space).min(rest.len());
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, input)) = data.split_first() else {
        return;
    };
    let whole = drive(input, MAX_UPGRADE_HEAD);
    assert_eq!(drive(input, usize::from(chunk.max(1))), whole);
    match &whole {
        Ok(Some((len, uri))) => {
            assert!(*len <= MAX_UPGRADE_HEAD);
            assert_eq!(uri, "/sub");
            let up = parse_head(&input[..*len]).expect("same head").expect("whole");
            assert_eq!(up.response.status(), 101);
            assert!(up.request.headers().len() <= MAX_UPGRADE_HEADERS);
            assert_eq!(up.request.method(), "GET");
        }
        // Stopped early: only possible before the limit.
        Ok(None) => assert!(input.len() < MAX_UPGRADE_HEAD),
        Err(_) => {}
    }
    // Anything that reaches the limit without a whole head is refused.
    if input.len() >= MAX_UPGRADE_HEAD {
        assert!(!matches!(whole, Ok(None)));
    }
});
