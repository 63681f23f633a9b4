//! What every Herald role shares, so each exists once: the roles (comet,
//! logic, job, operator) depend on this crate and on `herald-protocol`, never
//! on each other; they meet over gRPC, Kafka and the node-list document.
//!
//! `§N` refers to docs/protocol.md.
//!
//! # Layout
//! - [`shutdown`]: one stop signal, fanned out to every task of a role, and
//!   the process signals (SIGTERM, Ctrl-C) that fire it.
//! - [`listen`]: binding a role's listeners with an error that names the address.
//! - [`http`]: the one HTTP server (header, body and idle deadlines, a
//!   connection cap) behind every HTTP listener.
//! - [`admin`]: the `/metrics`, `/healthz`, `/readyz` server every role runs.
//! - [`nodes`]: where logic and job get the node list (file, ConfigMap watch
//!   behind the `kube` feature, or in memory for `herald standalone`).
//! - [`contract`]: the environment variable names the operator sets and the
//!   roles read, compiled into both sides.
//! - [`grpc_auth`]: the shared token the internal gRPC ports require, the
//!   client and server interceptors and the refusal counter.
//! - [`kafka_security`]: the TLS/SASL flags logic and job share and the
//!   librdkafka settings they become, in one place.
//! - [`args`]: flag defaults taken from the clap definitions themselves, so a
//!   default is written once, on its flag.
//! - [`error_chain`]: an error and its causes on one line, for logs and
//!   answers a human reads.
//! - [`bearer`]: the token of an `Authorization: Bearer` value, read as
//!   HTTP says (the scheme in any case).
//! - [`Secret`]: a setting whose `Debug` shows its length, never its value.

pub mod admin;
pub mod args;
pub mod contract;
pub mod grpc_auth;
pub mod http;
pub mod kafka_security;
pub mod listen;
pub mod nodes;
pub mod shutdown;

pub use shutdown::Shutdown;

/// `err` and every `source()` below it, joined by `": "`: what a log line,
/// an exit message or a `/readyz` answer shows, where the top-level message
/// alone ("push queue unavailable") hides the cause.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

/// The token of an `Authorization` value with the `Bearer` scheme. HTTP
/// schemes are case-insensitive (RFC 9110 §11.1), so `bearer` and `BEARER`
/// are the same; spaces around the token are no part of it. `None` for
/// another scheme or an empty token.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Whether `given` is the secret `expected` (an API key, a token), compared
/// without an early exit, so response timing does not reveal how much of a
/// guess was right (only its length). The one comparison every role uses.
pub fn secret_eq(given: &[u8], expected: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    given.ct_eq(expected).into()
}

/// A secret setting (an API key, a JWT secret) that must not be shown:
/// its `Debug` gives only its length, so `--check-config` and any log of a
/// configuration prove the value arrived without printing it. Clap parses
/// it from a flag or variable like a `String`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the value is empty (an unset Secret key often is).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `given` is this secret, compared in constant time
    /// ([`secret_eq`]).
    pub fn matches(&self, given: &[u8]) -> bool {
        secret_eq(given, self.0.as_bytes())
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Secret {
        Secret(value.to_owned())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<redacted: {} bytes>", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_secret_shows_its_length_only() {
        let secret = super::Secret::from("hunter2");
        assert_eq!(format!("{secret:?}"), "<redacted: 7 bytes>");
        assert_eq!(
            format!("{:#?}", Some(&secret)).matches("hunter2").count(),
            0
        );
        assert!(secret.matches(b"hunter2") && !secret.matches(b"hunter3"));
    }

    #[test]
    fn secret_eq_matches_eq() {
        assert!(super::secret_eq(b"abc", b"abc"));
        assert!(!super::secret_eq(b"abc", b"abd"));
        assert!(!super::secret_eq(b"abc", b"ab"));
        assert!(!super::secret_eq(b"", b"ab"));
    }

    #[test]
    fn bearer_scheme_in_any_case() {
        for value in ["Bearer k1", "bearer k1", "BEARER  k1 ", " Bearer k1"] {
            assert_eq!(super::bearer(value), Some("k1"), "{value:?}");
        }
        for value in ["Basic k1", "Bearer ", "Bearer", "Bearerk1", ""] {
            assert_eq!(super::bearer(value), None, "{value:?}");
        }
    }

    #[test]
    fn error_chain_joins_every_cause() {
        let io = std::io::Error::other("refused");
        let outer = crate::listen::BindError {
            addr: "127.0.0.1:1".parse().unwrap(),
            source: io,
        };
        assert_eq!(super::error_chain(&outer), format!("{outer}: refused"),);
    }
}
