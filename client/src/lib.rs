//! A goim client: what a device does to a Herald (or goim) comet.
//!
//! `§N` refers to docs/protocol.md, the wire contract.
//!
//! A [`Client`] holds one connection, over raw TCP (§4.1) or WebSocket
//! (§4.2, binary messages, one frame each). It authenticates with a goim
//! token (§6), sends heartbeats (op 2 → op 3 with the room's online count),
//! changes rooms, subscribes to ops, and reads what the comet sends: replies
//! to its own requests, pushes (on WebSocket wrapped in op-9 batches, which
//! the client opens), and Herald's op-18 redirect (§15.2).
//!
//! ```no_run
//! # async fn demo() -> Result<(), herald_client::Error> {
//! use herald_client::{Client, Event, Token};
//!
//! let mut client = Client::connect_tcp("127.0.0.1:3101").await?;
//! client
//!     .auth(&Token::new(123, "k1").room("live://1000").accepts([1000]).redirect())
//!     .await?;
//! let online = client.heartbeat().await?;
//! println!("{online} in the room");
//! loop {
//!     match client.next_event().await? {
//!         Event::Push(push) => println!("op {}: {:?}", push.op, push.body),
//!         Event::Redirect(to) => break println!("reconnect to one of {:?}", to.nodes),
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Reading
//! Three levels, each built on the one before:
//! - [`Client::next_message`]: the next frame exactly as it came off the
//!   wire (on WebSocket an op-9 batch stays closed);
//! - [`Client::next_frame`]: every frame, op-9 batches opened;
//! - [`Client::next_event`] / [`Client::next_push`]: pushes and redirects,
//!   with replies nobody waits for (heartbeat replies above all) skipped.
//!
//! Request methods ([`Client::heartbeat`], [`Client::change_room`], ...) wait
//! for their own reply, matched by op and `seq`; whatever arrives before it
//! (pushes, typically) is kept, in order, for the readers above.
//!
//! No wait is bounded unless [`Client::set_timeout`] says so; a wait that
//! runs out returns [`Error::Timeout`] and leaves the client usable.

mod client;
mod error;

pub use client::{Client, Event, Io, Push, Transport};
pub use error::{Error, Result};
pub use herald_protocol::redirect::Redirect;
pub use herald_protocol::token::{Extensions, Token};
pub use herald_protocol::{Frame, Limits, op};
