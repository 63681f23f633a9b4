//! The client session: the spec vectors over raw TCP, the handshake with
//! logic and its deadline, authentication failures, replacement by the same
//! key, the idle timeout and heartbeats.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use herald_comet::Config;
use herald_protocol::pb::PushMsgReq;
use herald_protocol::{Frame, op, ws};
use herald_testkit::stub::Event;
use tokio::net::TcpListener;
use tokio::time::timeout;

use common::{
    Harness, Result, T1, T2, T3, T4, T8_REPLY, T8_REQ, T10_REPLY, T10_REQ, WAIT, auth_frame,
    closed, connect_tcp, connect_ws, hex, raw_push, stub, token,
};

#[tokio::test]
async fn tcp_session_matches_spec_vectors() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let mut c = connect_tcp(h.tcp).await?;
    // A frame before op 7 is discarded without reply.
    c.send_raw(hex(T3)).await?;
    c.send_raw(hex(T1)).await?;
    assert_eq!(c.next_message().await?.to_bytes(), hex(T2), "T2");
    let _b = h.tcp_client(&token("b", "live://1000", &[])).await?;
    let _d = h.ws_client(&token("d", "live://1000", &[])).await?;

    c.send_raw(hex(T3)).await?;
    assert_eq!(
        c.next_message().await?.to_bytes(),
        hex(T4),
        "T4: three members of live://1000"
    );

    c.send_raw(hex(T8_REQ)).await?;
    assert_eq!(c.next_message().await?.to_bytes(), hex(T8_REPLY), "T8");
    c.send_raw(hex(T3)).await?;
    assert_eq!(
        c.next_message().await?.to_bytes()[16..],
        [0, 0, 0, 1],
        "alone in live://1001"
    );

    c.send(Frame {
        ver: 1,
        op: op::CHANGE_ROOM,
        seq: 9,
        body: Bytes::new(),
    })
    .await?;
    let reply = c.next_message().await?;
    assert_eq!(
        (reply.op, reply.seq, reply.body.len()),
        (op::CHANGE_ROOM_REPLY, 9, 0)
    );
    c.send_raw(hex(T3)).await?;
    assert_eq!(
        c.next_message().await?.to_bytes()[16..],
        [0, 0, 0, 0],
        "no stale count outside a room"
    );

    c.send_raw(hex(T10_REQ)).await?;
    assert_eq!(c.next_message().await?.to_bytes(), hex(T10_REPLY), "T10");
    h.logic_saw("Receive of op 4", |events| {
        events.iter().any(|e| {
            matches!(e, Event::Receive { mid: 123, proto }
                    if proto.op == 4 && proto.seq == 5 && proto.body.as_ref() == b"hi")
        })
    })
    .await?;
    let connects = h
        .stub
        .events()
        .into_iter()
        .filter(|e| matches!(e, Event::Connect { .. }));
    assert_eq!(
        connects.count(),
        3,
        "the early heartbeat did not reach logic"
    );
    h.shutdown().await
}

#[tokio::test]
async fn handshake_deadline_closes_silent_connections() -> Result {
    let mut h = Harness::start(|c| c.handshake_timeout = Duration::from_millis(300)).await?;
    let start = tokio::time::Instant::now();
    let mut tcp = connect_tcp(h.tcp).await?;
    tcp.send_raw(hex(T3)).await?;
    assert!(
        closed(&mut tcp).await?.is_empty(),
        "nothing answered before auth"
    );
    // A WebSocket-port client that never sends its upgrade is closed too.
    let mut raw = connect_tcp(h.ws).await?;
    assert!(closed(&mut raw).await?.is_empty());
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(h.stub.events().is_empty(), "logic was never called");
    h.shutdown().await
}

#[tokio::test]
async fn auth_failures_close_without_reply() -> Result {
    // Logic refuses the token.
    let mut h = Harness::start(|_| {}).await?;
    let mut c = connect_tcp(h.tcp).await?;
    c.send(auth_frame(r#"{"key":"x","fail":true}"#)).await?;
    assert!(closed(&mut c).await?.is_empty(), "no op 8");
    let mut w = connect_ws(h.ws).await?;
    w.send(auth_frame("not json")).await?;
    assert!(closed(&mut w).await?.is_empty(), "no op 8");
    h.shutdown().await?;
    assert_eq!(h.stub.disconnects("x"), 0);

    // Logic accepts TCP but never answers: the handshake deadline still holds.
    let black_hole = TcpListener::bind("127.0.0.1:0").await?;
    let mut config = Config::new("comet-test", black_hole.local_addr()?.to_string());
    config.handshake_timeout = Duration::from_millis(500);
    config.logic_timeout = Duration::from_secs(30);
    let mut h = Harness::start_comet(config, stub()).await?;
    let start = tokio::time::Instant::now();
    let mut c = connect_tcp(h.tcp).await?;
    c.send(auth_frame(&token("k", "", &[]))).await?;
    assert!(closed(&mut c).await?.is_empty(), "no op 8");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "closed within the deadline"
    );

    // Logic's port refuses connections.
    drop(black_hole);
    let mut c = connect_tcp(h.tcp).await?;
    c.send(auth_frame(&token("k", "", &[]))).await?;
    assert!(closed(&mut c).await?.is_empty(), "no op 8");
    h.shutdown().await
}

#[tokio::test]
async fn same_key_replaces_and_each_connection_disconnects_once() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let mut old = h.tcp_client(&token("dup", "r", &[1000])).await?;
    let mut new = h.ws_client(&token("dup", "r", &[1000])).await?;
    assert!(
        closed(&mut old).await?.is_empty(),
        "old connection closed without more frames"
    );
    let mut grpc = h.comet_client().await?;
    grpc.push_msg(PushMsgReq {
        keys: vec!["dup".into()],
        proto: Some(raw_push(1000, b"to-new")),
        proto_op: 1000,
    })
    .await?;
    let msg = new.next_message().await?.to_bytes();
    assert_eq!(msg, ws::wrap(&Frame::push(1000, &b"to-new"[..]).to_bytes()));
    h.logic_saw("old Disconnect", |_| h.stub.disconnects("dup") == 1)
        .await?;
    // The old Disconnect removed the route logic keeps per key and server; a
    // refresh for the successor must follow it to restore the route.
    h.logic_saw("route restored after the old Disconnect", |events| {
        let disconnect = events
            .iter()
            .position(|e| matches!(e, Event::Disconnect { .. }));
        let refresh = events
            .iter()
            .rposition(|e| *e == Event::Heartbeat { key: "dup".into() });
        matches!((disconnect, refresh), (Some(d), Some(r)) if r > d)
    })
    .await?;

    // An unauthenticated connection never causes a Disconnect.
    let mut anon = connect_tcp(h.tcp).await?;
    anon.send_raw(hex(T3)).await?;
    drop(anon);

    new.close().await?;
    h.logic_saw("new Disconnect", |_| h.stub.disconnects("dup") == 2)
        .await?;
    h.shutdown().await?;
    assert_eq!(h.stub.disconnects("dup"), 2, "exactly once per connection");
    let all = h
        .stub
        .events()
        .iter()
        .filter(|e| matches!(e, Event::Disconnect { .. }))
        .count();
    assert_eq!(all, 2);
    assert!(h.stub.events().contains(&Event::Disconnect {
        mid: 7,
        key: "dup".into()
    }));
    Ok(())
}

#[tokio::test]
async fn idle_timeout_comes_from_connect_reply() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let token = serde_json::json!({"key": "idle", "heartbeat_ms": 600}).to_string();
    let mut c = h.tcp_client(&token).await?;
    // Heartbeats keep it alive past one idle period...
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        c.send_raw(hex(T3)).await?;
        assert_eq!(c.next_message().await?.op, op::HEARTBEAT_REPLY);
    }
    // ...and silence ends it.
    closed(&mut c).await?;
    h.logic_saw("Disconnect", |_| h.stub.disconnects("idle") == 1)
        .await?;
    h.shutdown().await
}

#[tokio::test]
async fn heartbeat_prefers_the_cluster_count_and_refreshes_the_session() -> Result {
    let logic = stub().online(HashMap::from([("live://1000".to_owned(), 42)]));
    let mut h = Harness::start_with(logic, |c| {
        c.renew_online_interval = Duration::from_millis(100);
        c.session_refresh = Duration::from_millis(100);
    })
    .await?;
    let mut c = h.tcp_client(&token("hb", "live://1000", &[])).await?;
    h.logic_saw("RenewOnline with the local count", |events| {
        events
            .iter()
            .any(|e| matches!(e, Event::Renew { counts } if counts.get("live://1000") == Some(&1)))
    })
    .await?;
    // The reply is stored after logic records the call; poll a little.
    let count = timeout(WAIT, async {
        loop {
            c.send_raw(hex(T3)).await?;
            let reply = c.next_message().await?;
            let n = i32::from_be_bytes(reply.body[..4].try_into()?);
            if n == 42 {
                return anyhow::Ok(n);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await??;
    assert_eq!(count, 42);
    // The refresh rides on a client heartbeat once the interval has passed.
    let refreshed = |events: &[Event]| events.contains(&Event::Heartbeat { key: "hb".into() });
    timeout(WAIT, async {
        while !refreshed(&h.stub.events()) {
            c.send_raw(hex(T3)).await?;
            c.next_message().await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::Ok(())
    })
    .await
    .context("no session refresh")??;
    h.shutdown().await
}
