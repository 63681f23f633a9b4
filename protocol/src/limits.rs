//! Limits on what one connection can make the comet hold, shared by the
//! comet (client ops 12 and 14, the Connect reply) and logic (the token,
//! the HTTP push API), so that a room or an op list one side accepts is
//! never refused by the other: a room the comet will not join cannot be
//! pushed to, and a room that can be pushed to can be joined.
//!
//! goim has no such limits; each is far above what a client needs (goim's
//! example clients accept three ops and name rooms like `live://1000`).

/// Longest room id, in bytes of its full `type://id` form. The HTTP API
/// checks `type` and `room` joined this way.
pub const MAX_ROOM_ID_BYTES: usize = 256;

/// Most ops in one connection's accepted set (token `accepts` plus op-14
/// subscriptions). Pushes scan the set, so it also bounds their cost per
/// connection.
pub const MAX_ACCEPTED_OPS: usize = 256;

/// Whether `room` (the full `type://id`) is short enough to be joined and
/// pushed to.
pub fn room_fits(room: &str) -> bool {
    room.len() <= MAX_ROOM_ID_BYTES
}
