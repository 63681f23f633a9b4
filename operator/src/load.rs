//! Comet load: the `herald.admin.v1.CometAdmin` calls (`Load`, `Drain`) the
//! operator makes to each comet pod at `<podIP>:<grpc port>`, and the node-list
//! document (§15.4) built from their answers.

use std::time::Duration;

use herald_runtime::grpc_auth::{AuthChannel, Token};

pub use herald_protocol::nodes::{DrainSettings, Node, NodeList};
use herald_protocol::pb::admin::{
    DrainRequest, LoadReply, LoadRequest, comet_admin_client::CometAdminClient,
};

/// A failed admin call to one comet.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The address does not make a valid gRPC endpoint.
    #[error("bad comet address {addr}")]
    Address {
        /// What was tried.
        addr: String,
        /// Why tonic refused it.
        #[source]
        source: tonic::transport::Error,
    },
    /// Connecting failed or timed out.
    #[error("cannot reach comet at {addr}")]
    Connect {
        /// What was dialled.
        addr: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// The call itself failed.
    #[error("comet at {addr} answered {status}")]
    Call {
        /// What was called.
        addr: String,
        /// The gRPC status.
        status: tonic::Status,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

async fn client(
    addr: &str,
    timeout: Duration,
    token: &Token,
) -> Result<CometAdminClient<AuthChannel>> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|source| Error::Address {
            addr: addr.to_owned(),
            source,
        })?
        .connect_timeout(timeout)
        .timeout(timeout);
    let channel = endpoint.connect().await.map_err(|source| Error::Connect {
        addr: addr.to_owned(),
        source,
    })?;
    Ok(CometAdminClient::new(token.channel(channel)))
}

/// Asks one comet for its load; `addr` is `ip:port`; `token`: its
/// cluster's gRPC token (off for a cluster without one).
///
/// # Errors
/// When the comet cannot be reached within `timeout` or answers an error.
pub async fn load(addr: &str, timeout: Duration, token: &Token) -> Result<LoadReply> {
    let mut client = client(addr, timeout, token).await?;
    client
        .load(LoadRequest {})
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| Error::Call {
            addr: addr.to_owned(),
            status,
        })
}

/// Tells one comet to drain; returns whether this call started it.
///
/// # Errors
/// When the comet cannot be reached within `timeout` or answers an error.
pub async fn drain(
    addr: &str,
    request: DrainRequest,
    timeout: Duration,
    token: &Token,
) -> Result<bool> {
    let mut client = client(addr, timeout, token).await?;
    client
        .drain(request)
        .await
        .map(|reply| reply.into_inner().started)
        .map_err(|status| Error::Call {
            addr: addr.to_owned(),
            status,
        })
}

/// Weight of a comet handed out to clients: full for an idle comet, falling
/// as it fills towards `target` connections, never 0 for a comet not draining.
pub fn weight(connections: u64, target: i64, draining: bool) -> u32 {
    if draining {
        return 0;
    }
    let target = u64::try_from(target.max(1)).unwrap_or(1);
    let free_tenths = 10u64.saturating_sub(connections.saturating_mul(10) / target);
    u32::try_from(free_tenths.max(1)).unwrap_or(1)
}

/// The next node list: the same generation when neither `nodes` nor the
/// comets' `drain` settings changed (so nothing is written), else the next
/// one stamped with `now`.
pub fn next(
    previous: Option<&NodeList>,
    mut nodes: Vec<Node>,
    drain: Option<DrainSettings>,
    now: &str,
) -> NodeList {
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    match previous {
        Some(previous) if previous.nodes == nodes && previous.drain == drain => previous.clone(),
        previous => NodeList {
            generation: previous.map_or(0, |p| p.generation) + 1,
            updated: now.to_owned(),
            nodes,
            drain,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, connections: u64) -> Node {
        Node {
            name: name.to_owned(),
            connections,
            ..Node::default()
        }
    }

    #[test]
    fn generation_moves_only_on_change() {
        let first = next(None, vec![node("b", 1), node("a", 2)], None, "t1");
        assert_eq!(first.generation, 1);
        assert_eq!(
            first.nodes[0].name, "a",
            "sorted, so order cannot fake a change"
        );
        let same = next(Some(&first), vec![node("a", 2), node("b", 1)], None, "t2");
        assert_eq!(same, first);
        let changed = next(Some(&first), vec![node("a", 3), node("b", 1)], None, "t3");
        assert_eq!((changed.generation, changed.updated.as_str()), (2, "t3"));
        // New drain settings are a change too: comets read them live.
        let drain = Some(DrainSettings {
            deadline_ms: 9000,
            close_rate: 3,
        });
        let redrained = next(Some(&changed), changed.nodes.clone(), drain, "t4");
        assert_eq!((redrained.generation, redrained.drain), (3, drain));
    }

    #[test]
    fn weight_falls_with_load() {
        assert_eq!(weight(0, 1000, false), 10);
        assert_eq!(weight(500, 1000, false), 5);
        assert_eq!(weight(5000, 1000, false), 1);
        assert_eq!(weight(0, 1000, true), 0);
    }

    #[tokio::test]
    async fn unreachable_comet_is_an_error_not_a_hang() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let err = load(&addr, Duration::from_millis(500), &Token::off())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Connect { .. }), "{err}");
    }
}
