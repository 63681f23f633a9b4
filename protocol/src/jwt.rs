//! Checking the op-7 token (§6) as logic does: goim's unverified JSON, or a
//! signed JWT whose claims are the same members (§15.1) plus a mandatory
//! `exp`: HS256 with a shared secret, or RS256 with the issuer's public key
//! (so the service that mints tokens keeps the only signing key), optionally
//! with `aud` and `iss` checked.
//!
//! Behind the `jwt` feature (logic turns it on): it lives beside
//! [`Token`] so that the token's two forms are read in one place, and is
//! fuzzed (`protocol/fuzz`, target `token`) without building logic.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::token::Token;

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
    /// The configured verification key is unusable (startup only).
    #[error("JWT verification key rejected")]
    Key(#[source] jsonwebtoken::errors::Error),
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Optional registered claims a signed token must carry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JwtChecks {
    /// Required `aud`.
    pub audience: Option<String>,
    /// Required `iss`.
    pub issuer: Option<String>,
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
        Self::signed(
            DecodingKey::from_secret(secret),
            Algorithm::HS256,
            &JwtChecks::default(),
        )
    }

    /// RS256 JWTs verified with the PEM public key `pem`; `exp` is required,
    /// and `aud`/`iss` when `checks` names them.
    ///
    /// # Errors
    /// `pem` is not an RSA public key.
    pub fn rs256(pem: &[u8], checks: &JwtChecks) -> Result<Self> {
        let key = DecodingKey::from_rsa_pem(pem).map_err(Error::Key)?;
        Ok(Self::signed(key, Algorithm::RS256, checks))
    }

    /// HS256 like [`Verifier::jwt`], with `aud`/`iss` checks.
    pub fn hs256(secret: &[u8], checks: &JwtChecks) -> Self {
        Self::signed(DecodingKey::from_secret(secret), Algorithm::HS256, checks)
    }

    fn signed(key: DecodingKey, algorithm: Algorithm, checks: &JwtChecks) -> Self {
        // One algorithm only: a token may not pick a weaker one ("alg" confusion).
        let mut validation = Validation::new(algorithm);
        let mut required = vec!["exp"];
        match &checks.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &checks.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        validation.validate_exp = true;
        // A token not valid yet is refused like an expired one (same
        // leeway); without `nbf` it is valid from its issue.
        validation.validate_nbf = true;
        Verifier {
            mode: Verify::Jwt(Box::new((key, validation))),
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
        // Not valid before: an hour ahead is refused, a minute ago is fine.
        let not_yet = |nbf: u64| {
            encode(
                &Header::new(Algorithm::HS256),
                &serde_json::json!({"mid": 7, "exp": exp + 7200, "nbf": nbf}),
                &key,
            )
            .unwrap()
        };
        assert!(
            v.parse(not_yet(exp + 3600).as_bytes()).is_err(),
            "nbf next hour"
        );
        assert_eq!(v.parse(not_yet(exp - 120).as_bytes()).unwrap().mid, 7);
        // goim JSON is not accepted in JWT mode.
        assert!(v.parse(br#"{"mid":1}"#).is_err());
    }
}
