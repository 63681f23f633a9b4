//! The authentication token (§6), with Herald's extension member (§15.1).
//!
//! The JSON object a client sends as the op-7 body (or, with
//! `--token-mode jwt`, the claims of a signed JWT). Clients write it, logic
//! reads it; one type for both sides. Reading is as lenient as goim's logic:
//! every member may be missing, unknown members are ignored, and a `herald`
//! member of the wrong shape means "no extensions" rather than a refused
//! token.

use serde::{Deserialize, Deserializer, Serialize};

/// The op-7 token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// User id; 0 = anonymous (no per-user routing entry).
    #[serde(default)]
    pub mid: i64,
    /// Connection key; empty = logic makes one up, which the client is never
    /// told.
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
    /// Herald extensions asked for (§15.1); `None` when absent or not an
    /// object.
    #[serde(
        default,
        deserialize_with = "lenient_extensions",
        skip_serializing_if = "Option::is_none"
    )]
    pub herald: Option<Extensions>,
}

/// Herald's optional extensions (§15.1). A member that is missing or not a
/// boolean means "no".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extensions {
    /// Send op 18 before a drain closes this connection (§15.2).
    #[serde(default)]
    pub redirect: bool,
    /// Reserved for delivery recovery (§15.3).
    #[serde(default)]
    pub resume: bool,
}

fn lenient_extensions<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Extensions>, D::Error> {
    let value = serde_json::Value::deserialize(d)?;
    let flag = |name: &str| value.get(name).and_then(serde_json::Value::as_bool) == Some(true);
    Ok(value.is_object().then(|| Extensions {
        redirect: flag("redirect"),
        resume: flag("resume"),
    }))
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

    /// Whether the token asks for op-18 redirects.
    pub fn wants_redirect(&self) -> bool {
        self.herald.is_some_and(|h| h.redirect)
    }

    /// Reads an op-7 body (goim's JSON form).
    ///
    /// # Errors
    /// The body is not a JSON object of §6's shape.
    pub fn parse(body: &[u8]) -> Result<Token, serde_json::Error> {
        serde_json::from_slice(body)
    }

    /// The op-7 body: this token as JSON.
    pub fn to_json(&self) -> String {
        // Strings, integers and booleans always serialize.
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl From<&Token> for bytes::Bytes {
    fn from(token: &Token) -> bytes::Bytes {
        bytes::Bytes::from(token.to_json())
    }
}

impl From<Token> for bytes::Bytes {
    fn from(token: Token) -> bytes::Bytes {
        bytes::Bytes::from(&token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_documented_members() {
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
        assert_eq!(Token::parse(token.to_json().as_bytes()).ok(), Some(token));
        let plain: serde_json::Value =
            serde_json::from_str(&Token::new(1, "k").to_json()).expect("JSON");
        assert!(plain.get("herald").is_none(), "{plain}");
    }

    #[test]
    fn reads_the_herald_member_leniently() {
        let read = |body: &str| Token::parse(body.as_bytes()).expect(body).wants_redirect();
        assert!(read(r#"{"mid":1,"herald":{"redirect":true}}"#));
        assert!(!read(r#"{"mid":1,"herald":{"redirect":"yes"}}"#));
        assert!(!read(r#"{"mid":1,"herald":[true]}"#));
        assert!(!read(r#"{"mid":1,"herald":null}"#));
        assert!(!read(r#"{"mid":1}"#));
        let t1 = r#"{"mid":123,"room_id":"live://1000","platform":"web","accepts":[1000,1001,1002],"other":1}"#;
        let token = Token::parse(t1.as_bytes()).expect("T1");
        assert_eq!((token.mid, token.accepts.len()), (123, 3));
    }
}
