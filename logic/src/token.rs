//! The auth token a client sends in op 7 and comet forwards in `Connect`
//! (goim-protocol.md §6, herald-extensions.md for the JWT form).
//!
//! goim verifies nothing; Herald keeps accepting goim's JSON unchanged
//! ([`TokenMode::Goim`]) and can instead require an HS256 JWT carrying the
//! same members as claims plus a mandatory `exp` ([`TokenMode::Jwt`]).

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Why a token was refused; every variant maps to gRPC `InvalidArgument`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The body is not a JSON object of the §6 shape.
    #[error("token is not goim token JSON")]
    Json(#[source] serde_json::Error),
    /// The JWT failed to decode, verify, or has expired.
    #[error("token is not a valid JWT")]
    Jwt(#[source] jsonwebtoken::errors::Error),
    /// The token bytes are not UTF-8 (a JWT is ASCII text).
    #[error("token is not UTF-8")]
    Utf8(#[source] std::str::Utf8Error),
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How tokens are checked.
#[derive(Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TokenMode {
    /// goim's unverified JSON (anyone can claim any mid/key).
    Goim,
    /// HS256-signed JWT with the same members as claims and a required `exp`.
    Jwt,
}

/// The members of a token that logic uses. Unknown members (e.g. `herald`)
/// are ignored, as goim does.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Token {
    /// User id; 0 means anonymous (no `mid_` routing entry).
    #[serde(default)]
    pub mid: i64,
    /// Connection key; empty means "invent one".
    #[serde(default)]
    pub key: String,
    /// Initial room `type://id`, empty for none.
    #[serde(default)]
    pub room_id: String,
    /// Informational only.
    #[serde(default)]
    pub platform: String,
    /// Ops accepted for key/mid/broadcast pushes.
    #[serde(default)]
    pub accepts: Vec<i32>,
}

/// Parses tokens according to the configured mode. Built once at startup.
#[derive(Clone)]
pub struct Verifier {
    mode: Verify,
}

#[derive(Clone)]
enum Verify {
    Goim,
    // Boxed: built once, and keeps the Goim variant small.
    Jwt(Box<(DecodingKey, Validation)>),
}

impl std::fmt::Debug for Verifier {
    // The decoding key is a secret; never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match self.mode {
            Verify::Goim => "goim",
            Verify::Jwt(..) => "jwt",
        };
        f.debug_struct("Verifier").field("mode", &mode).finish()
    }
}

impl Verifier {
    /// goim's unverified JSON tokens.
    pub fn goim() -> Self {
        Verifier { mode: Verify::Goim }
    }

    /// HS256 JWTs signed with `secret`; `exp` is required and checked.
    pub fn jwt(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_exp = true;
        Verifier {
            mode: Verify::Jwt(Box::new((DecodingKey::from_secret(secret), validation))),
        }
    }

    /// Parses and (in JWT mode) verifies a token, inventing a UUID v4 key when
    /// the token has none (§6: the client is not told).
    ///
    /// # Errors
    /// Non-JSON bodies, bad signatures and expired JWTs.
    pub fn parse(&self, body: &[u8]) -> Result<Token> {
        let mut token: Token = match &self.mode {
            Verify::Goim => serde_json::from_slice(body).map_err(Error::Json)?,
            Verify::Jwt(jwt) => {
                let (key, validation) = &**jwt;
                let text = std::str::from_utf8(body).map_err(Error::Utf8)?;
                jsonwebtoken::decode::<Token>(text.trim(), key, validation)
                    .map_err(Error::Jwt)?
                    .claims
            }
        };
        if token.key.is_empty() {
            token.key = uuid::Uuid::new_v4().to_string();
        }
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goim_token_parses_t1_and_ignores_unknown_members() {
        let t = Verifier::goim()
            .parse(br#"{"mid":123,"key":"k1","room_id":"live://1000","platform":"web","accepts":[1000,1001,1002],"herald":{"redirect":true}}"#)
            .unwrap();
        assert_eq!(t.mid, 123);
        assert_eq!(t.key, "k1");
        assert_eq!(t.room_id, "live://1000");
        assert_eq!(t.accepts, vec![1000, 1001, 1002]);
    }

    #[test]
    fn missing_or_empty_key_becomes_uuid_v4() {
        for body in [&br#"{"mid":1}"#[..], br#"{"mid":1,"key":""}"#] {
            let t = Verifier::goim().parse(body).unwrap();
            let uuid = uuid::Uuid::parse_str(&t.key).unwrap();
            assert_eq!(uuid.get_version_num(), 4);
        }
    }

    #[test]
    fn non_json_is_rejected() {
        assert!(matches!(
            Verifier::goim().parse(b"not json"),
            Err(Error::Json(_))
        ));
        assert!(Verifier::goim().parse(b"[1,2]").is_err());
    }

    #[test]
    fn jwt_requires_signature_and_exp() {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let key = EncodingKey::from_secret(b"s3cret");
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 60;
        let good = encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"mid": 7, "key": "k", "exp": exp}),
            &key,
        )
        .unwrap();
        let v = Verifier::jwt(b"s3cret");
        assert_eq!(v.parse(good.as_bytes()).unwrap().mid, 7);
        let no_exp = encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"mid": 7}),
            &key,
        )
        .unwrap();
        assert!(v.parse(no_exp.as_bytes()).is_err());
        assert!(Verifier::jwt(b"other").parse(good.as_bytes()).is_err());
        let expired = encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"mid": 7, "exp": 1000}),
            &key,
        )
        .unwrap();
        assert!(v.parse(expired.as_bytes()).is_err());
        // goim JSON is not accepted in JWT mode.
        assert!(v.parse(br#"{"mid":1}"#).is_err());
    }
}
