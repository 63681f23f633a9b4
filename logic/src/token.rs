//! The auth token a client sends in op 7 and comet forwards in `Connect`
//! (§6, §15.1 for the JWT form).
//!
//! goim verifies nothing; Herald keeps accepting goim's JSON unchanged
//! ([`TokenMode::Goim`]) and can instead require a signed JWT carrying the
//! same members as claims plus a mandatory `exp` ([`TokenMode::Jwt`]). The
//! checking itself is [`herald_protocol::jwt`]'s [`Verifier`], built here
//! from the flags.

pub use herald_protocol::jwt::{Error, JwtChecks, Result, Verifier};
/// The token's members (§6). Logic uses `mid`, `key`, `room_id` and
/// `accepts`; unknown members are ignored, as goim does, and Herald's
/// `herald` member (§15.1) is read leniently and left to comet.
pub use herald_protocol::token::Token;

/// How tokens are checked.
#[derive(Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TokenMode {
    /// goim's unverified JSON (anyone can claim any mid/key).
    Goim,
    /// Signed JWT (HS256 or RS256) with the same members as claims and a required `exp`.
    Jwt,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rs256_verifies_with_the_public_key_and_checks_aud_and_iss() {
        use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
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
