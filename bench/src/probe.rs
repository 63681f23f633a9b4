//! `herald probe`: one message through a deployed cluster, end to end. A goim
//! client connects to a comet (through its Service), authenticates with a
//! token logic accepts (goim JSON, or a JWT signed with the cluster's secret),
//! then pushes to itself through logic's HTTP API by member id (Redis route →
//! Kafka → job → comet) and to its room (job's room broadcast), and waits for
//! both. It is what the chart's `helm test` runs; exit status 0 means a real
//! client received real pushes.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use herald_client::{Client, Event, Token};
use herald_runtime::contract;
use tracing::info;

use crate::inject::LogicHttp;

/// `herald probe` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// A comet's client TCP address, `host:port` (a Service name resolves
    /// through the cluster's DNS).
    #[arg(long, env = "HERALD_PROBE_COMET")]
    pub comet: String,
    /// Logic's HTTP API, `host:port`.
    #[arg(long, env = "HERALD_PROBE_LOGIC")]
    pub logic: String,
    /// The push API's bearer key, as logic has it.
    #[arg(long, env = contract::API_KEY, hide_env_values = true)]
    pub api_key: Option<herald_runtime::Secret>,
    /// Sign the token as an HS256 JWT with this secret (logic in `jwt`
    /// mode); without it the token is goim's JSON.
    #[arg(long, env = contract::JWT_SECRET, hide_env_values = true)]
    pub jwt_secret: Option<herald_runtime::Secret>,
    /// The op the pushes carry (the token accepts it).
    #[arg(long, default_value_t = 1000)]
    pub operation: i32,
    /// How long the whole probe may take.
    #[arg(long, default_value_t = 60)]
    pub timeout_secs: u64,
}

/// Why the probe failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The comet could not be reached or refused the token.
    #[error("client at comet {addr}")]
    Client {
        /// The comet address.
        addr: String,
        /// What went wrong.
        #[source]
        source: herald_client::Error,
    },
    /// Logic refused or failed the push.
    #[error("push through logic {addr}: {reason}")]
    Push {
        /// Logic's address.
        addr: String,
        /// Logic's answer.
        reason: String,
    },
    /// The logic address is not `host:port`.
    #[error("logic address {0}: {1}")]
    Address(String, std::io::Error),
    /// Signing the JWT failed.
    #[error("signing the token")]
    Sign(#[source] jsonwebtoken::errors::Error),
    /// Nothing arrived in time.
    #[error("no {what} push arrived within {secs} s")]
    Timeout {
        /// Which push.
        what: &'static str,
        /// The bound.
        secs: u64,
    },
}

/// What a successful probe measured.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// From the push request to the client reading the member-id push.
    pub mid_push: Duration,
    /// From the push request to the client reading the room push.
    pub room_push: Duration,
}

/// Runs the probe once.
///
/// # Errors
/// See [`Error`]; the first step that failed.
pub async fn run(args: Args) -> Result<Report, Error> {
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let mid = i64::try_from(nonce % 1_000_000_000_000).unwrap_or(1) + 1;
    let key = format!("herald-probe-{nonce:x}");
    let room = format!("herald://probe-{nonce:x}");
    let token = Token::new(mid, key)
        .room(room.clone())
        .platform("probe")
        .accepts([args.operation]);
    let token = match &args.jwt_secret {
        Some(secret) => sign(&token, secret.expose())?,
        None => token.to_json(),
    };
    let mut client = connect(&args.comet, token, deadline).await?;
    info!(comet = %args.comet, mid, "probe client authenticated");

    let logic = tokio::net::lookup_host(&args.logic)
        .await
        .map_err(|e| Error::Address(args.logic.clone(), e))?
        .next()
        .ok_or_else(|| {
            Error::Address(
                args.logic.clone(),
                std::io::Error::other("resolves to nothing"),
            )
        })?;
    let http =
        LogicHttp::new(logic).with_api_key(args.api_key.as_ref().map(|k| k.expose().to_owned()));
    // `room` is a goim room id, `type://id`; the room API takes both halves.
    let (room_type, room_id) = room.split_once("://").unwrap_or(("herald", &room));
    let mut measured = [Duration::ZERO; 2];
    for (i, (what, path)) in [
        (
            "member-id",
            format!("/goim/push/mids?operation={}&mids={mid}", args.operation),
        ),
        (
            "room",
            format!(
                "/goim/push/room?operation={}&type={room_type}&room={room_id}",
                args.operation
            ),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let body = Bytes::from(format!("herald probe {what} {nonce:x}"));
        let sent = Instant::now();
        http.post(&path, body.clone())
            .await
            .map_err(|reason| Error::Push {
                addr: args.logic.clone(),
                reason,
            })?;
        await_push(&mut client, &args, &body, deadline, what).await?;
        measured[i] = sent.elapsed();
        info!(what, elapsed = ?measured[i], "probe push received");
    }
    let _ = client.close().await;
    Ok(Report {
        mid_push: measured[0],
        room_push: measured[1],
    })
}

/// Connects and authenticates, retrying a failed connect until `deadline`:
/// a comet Service has no endpoint until a comet is Ready. A refused token
/// is final.
async fn connect(addr: &str, token: String, deadline: Instant) -> Result<Client, Error> {
    let failed = |source| Error::Client {
        addr: addr.to_owned(),
        source,
    };
    let mut client = loop {
        match Client::connect_tcp(addr).await {
            Ok(client) => break client,
            Err(err) if Instant::now() + Duration::from_secs(1) < deadline => {
                info!(%addr, cause = %err, "comet not reachable yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(err) => return Err(failed(err)),
        }
    };
    client.set_timeout(Some(deadline.saturating_duration_since(Instant::now())));
    client.auth(token).await.map_err(failed)?;
    Ok(client)
}

async fn await_push(
    client: &mut Client,
    args: &Args,
    body: &Bytes,
    deadline: Instant,
    what: &'static str,
) -> Result<(), Error> {
    let timeout = Error::Timeout {
        what,
        secs: args.timeout_secs,
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        client.set_timeout(Some(left));
        match client.next_event().await {
            Ok(Event::Push(push)) if push.op == args.operation && push.body == *body => {
                return Ok(());
            }
            Ok(_) => {}
            Err(_) if Instant::now() >= deadline => return Err(timeout),
            Err(source) => {
                return Err(Error::Client {
                    addr: args.comet.clone(),
                    source,
                });
            }
        }
    }
}

/// The token's members as HS256 JWT claims, valid for five minutes, as
/// logic in `jwt` mode verifies them (§15.1).
///
/// # Errors
/// Only [`Error::Sign`].
pub fn sign(token: &Token, secret: &str) -> Result<String, Error> {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let mut claims = serde_json::to_value(token).unwrap_or_default();
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        + 300;
    if let Some(map) = claims.as_object_mut() {
        map.insert("exp".to_owned(), exp.into());
    }
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(Error::Sign)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_token_carries_the_members_and_an_expiry() {
        use jsonwebtoken::{DecodingKey, Validation, decode};
        let token = Token::new(7, "k").room("live://1").accepts([1000]);
        let jwt = sign(&token, "s3cret").unwrap();
        let claims = decode::<serde_json::Value>(
            &jwt,
            &DecodingKey::from_secret(b"s3cret"),
            &Validation::default(),
        )
        .unwrap()
        .claims;
        assert_eq!(claims["mid"], 7);
        assert_eq!(claims["room_id"], "live://1");
        assert!(claims["exp"].as_u64().unwrap() > 0);
        assert!(
            decode::<serde_json::Value>(
                &jwt,
                &DecodingKey::from_secret(b"other"),
                &Validation::default()
            )
            .is_err()
        );
    }
}
