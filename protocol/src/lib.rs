//! goim's wire format, with no sockets in it.
//!
//! Herald speaks goim 2.0's protocol to unmodified goim clients and services;
//! this crate is the single place that knows the bytes (docs/protocol.md).
//!
//! `§N` refers to docs/protocol.md.
//!
//! # Layout
//! - [`frame`]: the 16-byte-header client frame, its encoder and a streaming
//!   decoder that enforces the inbound limits (§2).
//! - [`op`]: operation codes (§3), plus Herald's reserved ops 18–20, and the
//!   decimal op lists of subscribe / unsubscribe bodies (§5.2).
//! - [`limits`]: per-connection state limits (room id length, accepted
//!   ops) that comet and logic both enforce.
//! - [`ws`]: the op-9 wrapping that WebSocket clients expect for pushes (§4.2)
//!   and iteration over batched frames.
//! - [`upgrade`]: the WebSocket upgrade request head on `/sub` (§4.2),
//!   under its size and header-count limits.
//! - [`query`]: the query parameters of logic's HTTP API (§7).
//! - [`record`]: a Kafka push record (`PushMsg`, §10) as job reads it, and
//!   why one is poison.
//! - [`nodes`]: the node-list document the operator writes and logic and
//!   job read (§15.4), with goim's balancer pick (§11).
//! - [`token`]: the op-7 authentication token (§6) with Herald's
//!   extension member (§15.1).
//! - `jwt` (feature `jwt`): the token checked as logic does, goim's JSON or
//!   a signed JWT.
//! - [`redirect`]: the op-18 body a draining comet sends (§15.2).
//! - [`cityhash`]: CityHash32 v1.1, which picks `ol_` shards in Redis (§9).
//! - [`pb`]: prost/tonic types for `goim.protocol`, `goim.comet`, `goim.logic`
//!   (including the Kafka `PushMsg`) and Herald's `herald.admin.v1`.

pub mod cityhash;
pub mod frame;
#[cfg(feature = "jwt")]
pub mod jwt;
pub mod limits;
pub mod nodes;
pub mod op;
pub mod pb;
pub mod query;
pub mod record;
pub mod redirect;
pub mod token;
pub mod upgrade;
pub mod ws;

pub use frame::{Frame, FrameCodec, Limits};
