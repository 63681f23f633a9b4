//! The auth token a client sends in op 7 and comet forwards in `Connect`
//! (§6, §15.1 for the JWT form).
//!
//! goim verifies nothing; Herald keeps accepting goim's JSON unchanged
//! ([`TokenMode::Goim`]) and can instead require a signed JWT carrying the
//! same members as claims plus a mandatory `exp` ([`TokenMode::Jwt`]):
//! HS256 with a shared secret, or RS256 with the issuer's public key (so the
//! service that mints tokens keeps the only signing key), optionally with
//! `aud` and `iss` checked.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};

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

/// How tokens are checked.
#[derive(Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TokenMode {
    /// goim's unverified JSON (anyone can claim any mid/key).
    Goim,
    /// Signed JWT (HS256 or RS256) with the same members as claims and a required `exp`.
    Jwt,
}

/// The token's members (§6). Logic uses `mid`, `key`, `room_id` and
/// `accepts`; unknown members are ignored, as goim does, and Herald's
/// `herald` member (§15.1) is read leniently and left to comet.
pub use herald_protocol::token::Token;

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

    #[test]
    fn rs256_verifies_with_the_public_key_and_checks_aud_and_iss() {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");
        let read = |name: &str| std::fs::read(format!("{fixtures}{name}")).unwrap();
        let signer = EncodingKey::from_rsa_pem(&read("jwt-test-rs256.key")).unwrap();
        let other = EncodingKey::from_rsa_pem(&read("jwt-other-rs256.key")).unwrap();
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 60;
        let claims = serde_json::json!({"mid": 9, "key": "rk", "room_id": "live://1",
            "accepts": [1000], "exp": exp, "aud": "chat", "iss": "auth.example"});
        let sign = |claims: &serde_json::Value, key: &EncodingKey| {
            encode(&Header::new(Algorithm::RS256), claims, key).unwrap()
        };
        let checks = JwtChecks {
            audience: Some("chat".to_owned()),
            issuer: Some("auth.example".to_owned()),
        };
        let v = Verifier::rs256(&read("jwt-test-rs256.pub"), &checks).unwrap();
        let t = v.parse(sign(&claims, &signer).as_bytes()).unwrap();
        assert_eq!((t.mid, t.key.as_str(), t.accepts), (9, "rk", vec![1000]));
        // Another key's signature, a wrong audience, a missing issuer: refused.
        assert!(v.parse(sign(&claims, &other).as_bytes()).is_err());
        let mut wrong_aud = claims.clone();
        wrong_aud["aud"] = "other".into();
        assert!(v.parse(sign(&wrong_aud, &signer).as_bytes()).is_err());
        let mut no_iss = claims.clone();
        no_iss.as_object_mut().unwrap().remove("iss");
        assert!(v.parse(sign(&no_iss, &signer).as_bytes()).is_err());
        // An HS256 token "signed" with the public key bytes is refused.
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&read("jwt-test-rs256.pub")),
        )
        .unwrap();
        assert!(v.parse(forged.as_bytes()).is_err());
        // Without aud/iss checks the same good token passes.
        let plain = Verifier::rs256(&read("jwt-test-rs256.pub"), &JwtChecks::default()).unwrap();
        assert!(plain.parse(sign(&no_iss, &signer).as_bytes()).is_ok());
        assert!(matches!(
            Verifier::rs256(b"not a key", &checks),
            Err(Error::Key(_))
        ));
    }
}
