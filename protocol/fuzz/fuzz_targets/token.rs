//! The op-7 token, both forms (`herald_protocol::token`, `herald_protocol::jwt`).
//!
//! goim JSON: any bytes; what parses re-encodes and parses to the same token,
//! and the verifier (goim mode) reads the same members, a missing key made up.
//! JWT: the input's claims are signed with the verifier's HS256 secret, so
//! the fuzzer reaches claim parsing past the signature: a signed token is
//! accepted exactly when its claims are a token with a future `exp` and no
//! future `nbf`, and then reads as the same members. The raw input as a JWT
//! (never signed with the secret) is always refused.
#![no_main]

use herald_protocol::jwt::Verifier;
use herald_protocol::token::Token;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use libfuzzer_sys::fuzz_target;

const SECRET: &[u8] = b"fuzz-secret";

fuzz_target!(|data: &[u8]| {
    // goim JSON.
    let parsed = Token::parse(data);
    if let Ok(token) = &parsed {
        assert_eq!(Token::parse(token.to_json().as_bytes()).ok().as_ref(), Some(token));
        let verified = Verifier::goim().parse(data).expect("goim verifier refused a token");
        let mut expected = token.clone();
        if expected.key.is_empty() {
            assert!(!verified.key.is_empty(), "no key made up");
            expected.key.clone_from(&verified.key);
        }
        assert_eq!(verified, expected);
    } else {
        assert!(Verifier::goim().parse(data).is_err());
    }

    // The raw bytes as a JWT: no valid signature, never accepted.
    let jwt = Verifier::jwt(SECRET);
    assert!(jwt.parse(data).is_err(), "unsigned input accepted");

    // The input as the claims of a properly signed JWT.
    let Ok(claims) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let Ok(signed) = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET),
    ) else {
        return;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // jsonwebtoken's default leeway; within a few seconds of a bound the
    // outcome depends on the clock, so no verdict is expected there.
    let leeway = 60;
    let (earliest, latest) = (now - leeway, now + leeway);
    let near = |t: u64, bound: u64| t.abs_diff(bound) <= 2;
    let (exp, nbf) = (numeric(claims.get("exp")), numeric(claims.get("nbf")));
    if matches!(exp, Some(Some(t)) if near(t, earliest)) || matches!(nbf, Some(Some(t)) if near(t, latest)) {
        return;
    }
    let exp_ok = matches!(exp, Some(Some(t)) if t >= earliest);
    let nbf_ok = match nbf {
        None => true,
        Some(Some(t)) => t <= latest,
        Some(None) => false,
    };
    let shaped = serde_json::from_value::<Token>(claims.clone()).ok();
    match jwt.parse(signed.as_bytes()) {
        Ok(token) => {
            assert!(exp_ok && nbf_ok, "accepted outside its time: {claims}");
            let mut expected = shaped.expect("accepted claims that are no token");
            if expected.key.is_empty() {
                expected.key.clone_from(&token.key);
            }
            assert_eq!(token, expected);
        }
        Err(_) => assert!(
            !(exp_ok && nbf_ok && shaped.is_some()),
            "refused a good token: {claims}"
        ),
    }
});

/// A NumericDate claim as jsonwebtoken reads it: absent, a time (a
/// non-negative integer, or a float rounded), or malformed (`Some(None)`).
fn numeric(value: Option<&serde_json::Value>) -> Option<Option<u64>> {
    let value = value?;
    Some(value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f.round() as u64)
    }))
}
