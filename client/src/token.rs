//! The goim authentication token (§6), with Herald's extension member (§15.1).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The JSON object a client sends in op 7 (§6).
///
/// Logic reads it; unknown members are ignored, so a token for Herald works
/// unchanged with goim's logic. Build one with [`Token::new`] and the
/// chained setters, and hand it to [`crate::Client::auth`] (which takes
/// anything that turns into bytes: `&Token`, a `String` of JSON, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// User id; 0 = anonymous.
    #[serde(default)]
    pub mid: i64,
    /// Connection key; empty = logic makes one up (and never tells).
    #[serde(default)]
    pub key: String,
    /// Room to join at once (`type://id`); empty = none.
    #[serde(default)]
    pub room_id: String,
    /// Informational (`web`, `android`, ...).
    #[serde(default)]
    pub platform: String,
    /// Ops whose key, mid and broadcast pushes this connection accepts.
    #[serde(default)]
    pub accepts: Vec<i32>,
    /// Herald extensions asked for (§15.1); absent = none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub herald: Option<Extensions>,
}

/// Herald's optional extensions (§15.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extensions {
    /// Send op 18 before a drain closes this connection (§15.2).
    #[serde(default)]
    pub redirect: bool,
    /// Reserved for delivery recovery (§15.3).
    #[serde(default)]
    pub resume: bool,
}

impl Token {
    /// A token for user `mid` with connection key `key`, in no room,
    /// accepting nothing.
    pub fn new(mid: i64, key: impl Into<String>) -> Token {
        Token {
            mid,
            key: key.into(),
            ..Token::default()
        }
    }

    /// Joins `room` on authentication.
    #[must_use]
    pub fn room(mut self, room: impl Into<String>) -> Token {
        self.room_id = room.into();
        self
    }

    /// Sets the platform.
    #[must_use]
    pub fn platform(mut self, platform: impl Into<String>) -> Token {
        self.platform = platform.into();
        self
    }

    /// Accepts these ops.
    #[must_use]
    pub fn accepts(mut self, ops: impl IntoIterator<Item = i32>) -> Token {
        self.accepts = ops.into_iter().collect();
        self
    }

    /// Asks for op 18 before a drain closes the connection (§15.2).
    #[must_use]
    pub fn redirect(mut self) -> Token {
        self.herald.get_or_insert_with(Extensions::default).redirect = true;
        self
    }

    /// The op-7 body: this token as JSON.
    pub fn to_json(&self) -> String {
        // Strings, integers and booleans always serialize.
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl From<&Token> for Bytes {
    fn from(token: &Token) -> Bytes {
        Bytes::from(token.to_json())
    }
}

impl From<Token> for Bytes {
    fn from(token: Token) -> Bytes {
        Bytes::from(&token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_the_documented_members() {
        let token = Token::new(123, "k1")
            .room("live://1000")
            .platform("web")
            .accepts([1000])
            .redirect();
        let json: serde_json::Value = serde_json::from_str(&token.to_json()).expect("JSON");
        assert_eq!(
            json,
            serde_json::json!({"mid": 123, "key": "k1", "room_id": "live://1000",
                "platform": "web", "accepts": [1000],
                "herald": {"redirect": true, "resume": false}})
        );
        let plain: serde_json::Value =
            serde_json::from_str(&Token::new(1, "k").to_json()).expect("JSON");
        assert!(plain.get("herald").is_none(), "{plain}");
    }
}
