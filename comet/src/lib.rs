//! Comet: holds client connections (TCP, WebSocket, WSS) and delivers pushes.
//!
//! Not built yet: the connection server, session state machine, goim's
//! `goim.comet.Comet` gRPC service and Herald's admin service land with the
//! comet issue. The wire format it will speak lives in `herald-protocol`.
