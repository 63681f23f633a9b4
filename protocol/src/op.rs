//! Operation codes carried in a frame's `op` field (§3).
//!
//! Codes 0–17 are goim's; 18–31 are reserved for Herald
//! (§15). Business pushes should use codes above 31.

/// Named in goim, no behaviour.
pub const HANDSHAKE: i32 = 0;
/// Named in goim, no behaviour.
pub const HANDSHAKE_REPLY: i32 = 1;
/// Client heartbeat; restarts the idle timeout.
pub const HEARTBEAT: i32 = 2;
/// Heartbeat reply; body is the room's online count as a big-endian i32.
pub const HEARTBEAT_REPLY: i32 = 3;
/// An ordinary upstream op, with no special meaning.
pub const SEND_MSG: i32 = 4;
/// Named in goim, never emitted.
pub const SEND_MSG_REPLY: i32 = 5;
/// Named in goim, never emitted.
pub const DISCONNECT_REPLY: i32 = 6;
/// Authenticate; body is the JSON token.
pub const AUTH: i32 = 7;
/// Authenticated; empty body.
pub const AUTH_REPLY: i32 = 8;
/// Raw container: the body is one or more complete frames.
pub const RAW: i32 = 9;
/// goim's internal sentinel; never on the wire.
pub const PROTO_READY: i32 = 10;
/// goim's internal sentinel; never on the wire.
pub const PROTO_FINISH: i32 = 11;
/// Change room; body is the new room id, empty = leave.
pub const CHANGE_ROOM: i32 = 12;
/// Change-room reply, echoing the request body.
pub const CHANGE_ROOM_REPLY: i32 = 13;
/// Add ops to the accepted set; body is a decimal list such as `1001,1002`.
pub const SUB: i32 = 14;
/// Subscribe reply, echoing the request body.
pub const SUB_REPLY: i32 = 15;
/// Remove ops from the accepted set.
pub const UNSUB: i32 = 16;
/// Unsubscribe reply, echoing the request body.
pub const UNSUB_REPLY: i32 = 17;
/// Herald: redirect before a drain closes the connection; JSON body.
pub const REDIRECT: i32 = 18;
/// Herald: reserved for delivery recovery (resume point, comet → client).
pub const RESUME_POINT: i32 = 19;
/// Herald: reserved for delivery recovery (resume, client → comet).
pub const RESUME: i32 = 20;

/// The codes reserved for Herald's extensions (§15): the comet emits them
/// itself, and only to connections that asked for the extension.
pub const HERALD_RESERVED: std::ops::RangeInclusive<i32> = 18..=31;

/// Whether `op` is goim's internal sentinel that must never be sent or accepted
/// as a business op.
pub fn is_internal(op: i32) -> bool {
    op == PROTO_READY || op == PROTO_FINISH
}

/// Whether `op` may be neither pushed nor sent by a client: goim's
/// sentinels never appear on the wire, and Herald's extension codes come
/// from the comet itself, so that a client which did not ask for them never
/// sees one (a push API that let them through would hand any caller a way
/// to send, say, a forged op-18 redirect).
pub fn is_reserved(op: i32) -> bool {
    is_internal(op) || HERALD_RESERVED.contains(&op)
}

/// Why an op list was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ListError {
    /// The body was not UTF-8.
    #[error("op list is not UTF-8")]
    NotUtf8,
    /// One element was not a decimal i32.
    #[error("op list element {element:?} is not a 32-bit integer")]
    BadElement {
        /// The offending element, as sent.
        element: String,
    },
}

/// Parses the body of subscribe (op 14) or unsubscribe (op 16), decimal
/// i32 values joined by `,`: `1001,1002` into `[1001, 1002]`. On any error
/// the caller changes nothing, so parsing is all-or-nothing.
///
/// An empty body is an empty list; whitespace around elements is not accepted
/// (goim's `strconv.ParseInt` refuses it too).
///
/// # Errors
/// [`ListError`] when the body is not UTF-8 or any element is not an i32.
pub fn parse_list(body: &[u8]) -> Result<Vec<i32>, ListError> {
    let text = std::str::from_utf8(body).map_err(|_| ListError::NotUtf8)?;
    if text.is_empty() {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(|element| {
            element.parse::<i32>().map_err(|_| ListError::BadElement {
                element: element.to_owned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_ops_are_the_sentinels_and_herald_range() {
        let reserved: Vec<i32> = (0..40).filter(|&op| is_reserved(op)).collect();
        let mut expected = vec![10, 11];
        expected.extend(18..=31);
        assert_eq!(reserved, expected);
        assert!(!is_reserved(1000) && !is_reserved(-1));
    }

    #[test]
    fn parses_t9_body() {
        assert_eq!(parse_list(b"1001,1002"), Ok(vec![1001, 1002]));
    }

    #[test]
    fn empty_is_empty_list() {
        assert_eq!(parse_list(b""), Ok(vec![]));
    }

    #[test]
    fn negative_values_are_i32() {
        assert_eq!(parse_list(b"-1,7"), Ok(vec![-1, 7]));
    }

    #[test]
    fn rejects_bad_elements_whole() {
        assert!(matches!(
            parse_list(b"1001,x"),
            Err(ListError::BadElement { .. })
        ));
        assert!(matches!(
            parse_list(b"1001,"),
            Err(ListError::BadElement { .. })
        ));
        assert!(matches!(
            parse_list(b" 1"),
            Err(ListError::BadElement { .. })
        ));
        assert!(matches!(
            parse_list(b"2147483648"),
            Err(ListError::BadElement { .. })
        ));
        assert_eq!(parse_list(&[0xff]), Err(ListError::NotUtf8));
    }
}
