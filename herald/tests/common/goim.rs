//! goim clients that follow Herald's op-18 redirect the way a client SDK
//! does, for the drain scenarios (`operator_e2e.rs`, `chart_e2e.rs`).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, ensure};
use bytes::Bytes;
use herald_client::{Client, Event, Redirect, Token};

/// Every read waits up to this long once authenticated.
pub(crate) const READ_WAIT: Duration = Duration::from_secs(60);
/// The push operation the clients accept.
pub(crate) const PUSH_OP: i32 = 1000;

/// goim's JSON token for member `mid` in room `live://7` that asks for
/// Herald's redirect (op 18).
pub(crate) fn json_token(mid: u64) -> Bytes {
    Token::new(mid as i64, format!("e2e-{mid}"))
        .room("live://7")
        .platform("android")
        .accepts([PUSH_OP])
        .redirect()
        .to_json()
        .into()
}

/// A goim TCP client that asked for op 18, where it is connected, and the
/// token it reconnects with.
#[derive(Debug)]
pub(crate) struct GoimClient {
    pub(crate) mid: u64,
    pub(crate) addr: SocketAddr,
    pub(crate) client: Client,
    token: Bytes,
}

impl GoimClient {
    /// Connected and authenticated (the auth reply has arrived) within 10 s;
    /// reads then wait up to [`READ_WAIT`].
    pub(crate) async fn connect(
        addr: SocketAddr,
        mid: u64,
        token: Bytes,
    ) -> anyhow::Result<GoimClient> {
        let bound = Duration::from_secs(10);
        let mut client = tokio::time::timeout(bound, Client::connect_tcp(addr))
            .await
            .with_context(|| format!("connecting to {addr}"))??
            .with_timeout(bound);
        client
            .auth(token.clone())
            .await
            .with_context(|| format!("auth to {addr}"))?;
        client.set_timeout(Some(READ_WAIT));
        Ok(GoimClient {
            mid,
            addr,
            client,
            token,
        })
    }
}

/// What a client saw until it had the push (and, on the drained comet,
/// until it was moved).
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) mid: u64,
    /// Op-18 bodies received.
    pub(crate) redirects: Vec<Redirect>,
    /// Where the push arrived: `true` on the comet it started on.
    pub(crate) push_on_first_comet: bool,
    /// The connection it ends on, kept open until the test ends.
    pub(crate) client: GoimClient,
}

/// Reads until the push arrives and, with `until_redirected`, until an op
/// 18 moved it. On op 18 it connects to the first node the redirect names
/// (as a client SDK does), tells `reconnected`, and goes on reading there.
pub(crate) async fn follow(
    mut client: GoimClient,
    body: Bytes,
    until_redirected: bool,
    reconnected: tokio::sync::mpsc::UnboundedSender<u64>,
) -> anyhow::Result<Outcome> {
    let mut redirects = Vec::new();
    let mut push_on_first_comet = None;
    while push_on_first_comet.is_none() || (until_redirected && redirects.is_empty()) {
        let event = client
            .client
            .next_event()
            .await
            .with_context(|| format!("client {}", client.mid))?;
        match event {
            // A late warm-up push is not the one awaited.
            Event::Push(push) if push.op == PUSH_OP && push.body == body => {
                push_on_first_comet.get_or_insert(redirects.is_empty());
            }
            Event::Redirect(redirect) => {
                let host = redirect
                    .nodes
                    .first()
                    .with_context(|| format!("op 18 without nodes: {redirect:?}"))?;
                let port = u16::try_from(redirect.tcp_port)
                    .ok()
                    .filter(|p| *p > 0)
                    .with_context(|| format!("op 18 without tcp_port: {redirect:?}"))?;
                let ip: Ipv4Addr = host.parse()?;
                ensure!(ip.is_loopback(), "redirected off loopback: {redirect:?}");
                let (mid, token) = (client.mid, client.token.clone());
                client = GoimClient::connect(SocketAddr::from((ip, port)), mid, token).await?;
                redirects.push(redirect);
                let _ = reconnected.send(mid);
            }
            Event::Push(_) => {}
        }
    }
    Ok(Outcome {
        mid: client.mid,
        redirects,
        push_on_first_comet: push_on_first_comet.unwrap_or_default(),
        client,
    })
}

/// Until one push of op [`PUSH_OP`] reaches `client`, calls `send` every
/// 2 s (job may join a fresh topic after the first records), for at most
/// `secs`.
pub(crate) async fn warm_up<F, Fut>(
    client: &mut Client,
    secs: u64,
    mut send: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    client.set_timeout(Some(Duration::from_secs(1)));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        send().await?;
        let round = tokio::time::Instant::now() + Duration::from_secs(2);
        while tokio::time::Instant::now() < round {
            match client.next_event().await {
                Ok(Event::Push(push)) if push.op == PUSH_OP => return Ok(()),
                Ok(_) | Err(herald_client::Error::Timeout(_)) => {}
                Err(err) => return Err(err.into()),
            }
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no push ever reached a client"
        );
    }
}
