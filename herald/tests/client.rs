//! herald-client against a real comet: `herald_comet::run` on 127.0.0.1:0
//! with the stub logic, clients over raw TCP and WebSocket, pushes sent
//! through comet's gRPC service, a drain through its admin service.

use std::time::Duration;

use anyhow::ensure;
use herald_client::{Client, Error, Event, Frame, Push, Redirect, Token, Transport, op};
use herald_protocol::pb::CometClient;
use herald_protocol::pb::PushMsgReq;
use herald_protocol::pb::admin::DrainRequest;
use herald_protocol::pb::admin::comet_admin_client::CometAdminClient;
use herald_protocol::ws::raw_proto;
use herald_testkit::stub::Event as Call;
use tonic::transport::Channel;

type Result<T = (), E = anyhow::Error> = std::result::Result<T, E>;

const WAIT: Duration = Duration::from_secs(10);

mod common;

use common::LocalComet as Comet;

impl Comet {
    async fn tcp(&self) -> Result<Client> {
        Ok(Client::connect_tcp(self.tcp).await?.with_timeout(WAIT))
    }

    async fn ws(&self) -> Result<Client> {
        let url = format!("ws://{}/sub", self.ws);
        Ok(Client::connect_ws(url).await?.with_timeout(WAIT))
    }

    async fn channel(&self) -> Result<Channel> {
        Ok(Channel::from_shared(format!("http://{}", self.grpc))?
            .connect()
            .await?)
    }

    /// Pushes `body` as op 1000 to `key` through comet's gRPC `PushMsg`.
    async fn push(&self, key: &str, body: &'static [u8]) -> Result {
        CometClient::new(self.channel().await?)
            .push_msg(PushMsgReq {
                keys: vec![key.to_owned()],
                proto_op: 1000,
                proto: Some(raw_proto(Frame::push(1000, body).to_bytes())),
            })
            .await?;
        Ok(())
    }
}

fn token(key: &str) -> Token {
    Token::new(7, key).room("live://1").accepts([1000])
}

/// Everything a session does, on either transport.
async fn session(comet: &Comet, mut client: Client, key: &str) -> Result {
    let auth = client.auth(&token(key)).await?;
    ensure!(auth.op == op::AUTH_REPLY && auth.seq == 1, "{auth:?}");
    ensure!(client.heartbeat().await? == 1, "alone in live://1");
    client.change_room("live://2").await?;
    client.subscribe(&[1001, 1002]).await?;
    client.unsubscribe(&[1002]).await?;
    ensure!(client.heartbeat().await? == 1, "alone in live://2");

    // A push that arrives while a request waits for its reply is kept.
    comet.push(key, b"first").await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    client.heartbeat().await?;
    comet.push(key, b"second").await?;
    let batched = client.transport() == Transport::WebSocket;
    for body in [&b"first"[..], b"second"] {
        let push = client.next_push().await?;
        let want = Push {
            op: 1000,
            body: body.into(),
            batched,
        };
        ensure!(push == want, "{push:?}");
    }

    // Nothing more: a bounded wait runs out and leaves the client usable.
    client.set_timeout(Some(Duration::from_millis(200)));
    ensure!(matches!(client.next_push().await, Err(Error::Timeout(_))));
    client.set_timeout(Some(WAIT));
    ensure!(client.heartbeat().await? == 1);

    client.close().await?;
    ensure!(
        comet
            .logic
            .wait_until(WAIT, |_| comet.logic.disconnects(key) == 1)
            .await,
        "no Disconnect for {key}: {:?}",
        comet.logic.events()
    );
    Ok(())
}

/// [`session`] on a fresh comet over `transport`.
async fn session_over(transport: Transport, key: &str) -> Result {
    let comet = Comet::start("comet-client").await?;
    let client = match transport {
        Transport::Tcp => comet.tcp().await?,
        Transport::WebSocket => comet.ws().await?,
    };
    ensure!(client.transport() == transport);
    session(&comet, client, key).await
}

#[tokio::test]
async fn a_tcp_session_authenticates_beats_moves_and_receives() -> Result {
    session_over(Transport::Tcp, "tcp").await
}

#[tokio::test]
async fn a_websocket_session_authenticates_beats_moves_and_receives() -> Result {
    session_over(Transport::WebSocket, "ws").await
}

#[tokio::test]
async fn websocket_pushes_arrive_in_op_9_and_tcp_pushes_bare() -> Result {
    let comet = Comet::start("comet-client").await?;
    let mut tcp = comet.tcp().await?;
    let mut ws = comet.ws().await?;
    tcp.auth(&token("bare")).await?;
    ws.auth(&token("wrapped")).await?;
    comet.push("bare", b"hello").await?;
    comet.push("wrapped", b"hello").await?;
    // §14 T5 and T6.
    let bare = tcp.next_message().await?;
    ensure!(bare.to_bytes()[..] == *Frame::push(1000, &b"hello"[..]).to_bytes());
    let wrapped = ws.next_message().await?;
    ensure!(wrapped.op == op::RAW && wrapped.ver == 1 && wrapped.seq == 0);
    ensure!(wrapped.body == Frame::push(1000, &b"hello"[..]).to_bytes());
    Ok(())
}

#[tokio::test]
async fn a_refused_token_is_a_clear_error_on_both_transports() -> Result {
    let comet = Comet::start("comet-client").await?;
    for mut client in [comet.tcp().await?, comet.ws().await?] {
        let got = client.auth(r#"{"key":"no","fail":true}"#).await;
        ensure!(matches!(got, Err(Error::AuthRefused)), "{got:?}");
    }
    let refused = comet
        .logic
        .events()
        .iter()
        .filter(|e| matches!(e, Call::Connect { token, .. } if token.contains("fail")))
        .count();
    ensure!(refused == 2, "{:?}", comet.logic.events());
    Ok(())
}

#[tokio::test]
async fn a_drain_hands_out_the_redirect_then_closes() -> Result {
    let comet = Comet::start("comet-client").await?;
    let mut asked = comet.tcp().await?;
    asked.auth(&token("asked").redirect()).await?;
    let mut web = comet.ws().await?;
    web.auth(&token("web").redirect()).await?;
    let mut plain = comet.tcp().await?;
    plain.auth(&token("plain")).await?;

    CometAdminClient::new(comet.channel().await?)
        .drain(DrainRequest {
            deadline_ms: 2000,
            close_rate: 0,
            nodes: vec!["comet-b.example.com".to_owned()],
            tcp_port: 3101,
            ws_port: 3102,
            wss_port: 3103,
            reconnect_within_ms: 1500,
        })
        .await?;
    let want = Redirect {
        reason: "drain".to_owned(),
        nodes: vec!["comet-b.example.com".to_owned()],
        tcp_port: 3101,
        ws_port: 3102,
        wss_port: 3103,
        reconnect_within_ms: 1500,
    };
    let event = asked.next_event().await?;
    ensure!(event == Event::Redirect(want.clone()), "{event:?}");
    let got = web.next_push().await;
    ensure!(
        matches!(&got, Err(Error::Redirected(r)) if *r == want),
        "{got:?}"
    );
    for client in [&mut asked, &mut web, &mut plain] {
        let end = client.next_event().await;
        ensure!(matches!(end, Err(Error::Closed)), "{end:?}");
    }
    Ok(())
}
