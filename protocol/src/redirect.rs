//! The op-18 body (§15.2): where a client reconnects when a draining comet
//! is about to close its connection.
//!
//! Comet writes it, clients read it; one type for both sides. Every field may
//! be missing when read and defaults to zero/empty: a client must still
//! reconnect (asking the node API) when the comet tells it nothing.

use serde::{Deserialize, Serialize};

/// What op 18 carries, as UTF-8 JSON.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redirect {
    /// Why the connection closes: `"drain"`.
    #[serde(default)]
    pub reason: String,
    /// Where to reconnect, following the rules of `/goim/nodes/weighted`;
    /// never the draining comet. Empty: ask the node API.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Raw TCP client port on those nodes.
    #[serde(default)]
    pub tcp_port: i32,
    /// WebSocket client port on those nodes.
    #[serde(default)]
    pub ws_port: i32,
    /// Secure WebSocket client port on those nodes.
    #[serde(default)]
    pub wss_port: i32,
    /// The client reconnects at a random moment within this many
    /// milliseconds, which spreads the reconnects.
    #[serde(default)]
    pub reconnect_within_ms: u32,
}

impl Redirect {
    /// Reads an op-18 body.
    ///
    /// # Errors
    /// The body is not a JSON object of this shape.
    pub fn parse(body: &[u8]) -> Result<Redirect, serde_json::Error> {
        serde_json::from_slice(body)
    }

    /// The op-18 body.
    pub fn to_body(&self) -> Vec<u8> {
        // A struct of strings and integers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_documented_body() {
        let body = br#"{"reason": "drain", "nodes": ["comet-b.example.com", "comet-c.example.com"],
            "tcp_port": 3101, "ws_port": 3102, "wss_port": 3103, "reconnect_within_ms": 2000}"#;
        let redirect = Redirect::parse(body).expect("§15.2 example");
        assert_eq!(
            redirect,
            Redirect {
                reason: "drain".to_owned(),
                nodes: vec![
                    "comet-b.example.com".to_owned(),
                    "comet-c.example.com".to_owned()
                ],
                tcp_port: 3101,
                ws_port: 3102,
                wss_port: 3103,
                reconnect_within_ms: 2000,
            }
        );
        assert_eq!(Redirect::parse(&redirect.to_body()).ok(), Some(redirect));
        assert_eq!(Redirect::parse(b"{}").ok(), Some(Redirect::default()));
    }
}
