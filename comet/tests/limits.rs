//! What a client may send: invalid frames, the connection limit, the
//! `Receive` rate limit and flood close, and short `pack_len` (lenient or
//! strict).

mod common;

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use herald_protocol::pb::BroadcastRoomReq;
use herald_protocol::{Frame, op};
use tokio::time::timeout;

use common::{
    Harness, Result, T3, T10_REQ, WAIT, auth_frame, closed, connect_tcp, hex, raw_push, token,
    token_mid,
};

#[tokio::test]
async fn invalid_frames_close_only_the_offender() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let mut healthy = h.tcp_client(&token("ok", "room", &[])).await?;
    let mut grpc = h.comet_client().await?;
    let mut check_healthy = async |body: &'static [u8]| -> Result {
        grpc.broadcast_room(BroadcastRoomReq {
            room_id: "room".into(),
            proto: Some(raw_push(1000, body)),
        })
        .await?;
        assert_eq!(healthy.next_message().await?, Frame::push(1000, body));
        Ok(())
    };

    // TCP: pack_len 4113 (> 4112).
    let mut big = h.tcp_client(&token("big", "room", &[])).await?;
    let mut header = hex(T3);
    header[..4].copy_from_slice(&4113i32.to_be_bytes());
    big.send_raw(header).await?;
    closed(&mut big).await?;
    check_healthy(b"1").await?;

    // TCP: header_len 15.
    let mut bad = h.tcp_client(&token("hl", "room", &[])).await?;
    let mut header = hex(T3);
    header[4..6].copy_from_slice(&15i16.to_be_bytes());
    bad.send_raw(header).await?;
    closed(&mut bad).await?;
    check_healthy(b"2").await?;

    // WebSocket: a message shorter than its pack_len.
    let mut short = h.ws_client(&token("short", "room", &[])).await?;
    let mut msg = hex(T10_REQ);
    msg[..4].copy_from_slice(&32i32.to_be_bytes());
    short.send_raw(msg).await?;
    closed(&mut short).await?;
    check_healthy(b"3").await?;

    // WebSocket: a message past the size limit.
    let mut huge = h.ws_client(&token("huge", "room", &[])).await?;
    let frame = Frame {
        ver: 1,
        op: 4,
        seq: 1,
        body: Bytes::from(vec![0u8; 9000]),
    };
    let _ = huge.send(frame).await;
    closed(&mut huge).await?;
    check_healthy(b"4").await?;

    for key in ["big", "hl", "short", "huge"] {
        h.logic_saw("Disconnect", |_| h.stub.disconnects(key) == 1)
            .await?;
    }
    h.shutdown().await
}

#[tokio::test]
async fn connections_past_the_limit_are_refused() -> Result {
    let mut h = Harness::start(|c| c.max_connections = 1).await?;
    let mut first = h.tcp_client(&token("one", "", &[])).await?;
    let mut second = connect_tcp(h.tcp).await?;
    let _ = second.send(auth_frame(&token("two", "", &[]))).await;
    assert!(
        closed(&mut second).await?.is_empty(),
        "refused without op 8"
    );
    // The held connection is unaffected, and its slot frees when it leaves.
    first.send_raw(hex(T3)).await?;
    assert_eq!(first.next_message().await?.op, op::HEARTBEAT_REPLY);
    drop(first);
    h.logic_saw("Disconnect", |_| h.stub.disconnects("one") == 1)
        .await?;
    timeout(WAIT, async {
        loop {
            let mut c = connect_tcp(h.tcp).await?;
            c.send(auth_frame(&token("three", "", &[]))).await?;
            if c.next_message().await.is_ok_and(|f| f.op == op::AUTH_REPLY) {
                return anyhow::Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await??;
    h.shutdown().await
}

/// `n` op-4 frames (T10) back to back, then one heartbeat (T3).
fn op4_burst_then_heartbeat(n: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    for _ in 0..n {
        bytes.extend(hex(T10_REQ));
    }
    bytes.extend(hex(T3));
    bytes
}

#[tokio::test]
async fn receive_is_rate_limited_per_connection() -> Result {
    let mut h = Harness::start(|c| {
        c.receive_rate = 5;
        c.receive_burst = 10;
        c.receive_flood_close = 0;
    })
    .await?;
    let mut flooder = h.tcp_client(&token_mid(31, "flooder")).await?;
    let mut quiet = h.tcp_client(&token_mid(32, "quiet")).await?;

    let started = std::time::Instant::now();
    flooder.send_raw(op4_burst_then_heartbeat(50)).await?;
    // Frames are handled in order: the heartbeat reply comes after every
    // op 4 was either forwarded (and acknowledged) or dropped (no reply).
    let mut acknowledged = 0;
    loop {
        let frame = flooder.next_message().await?;
        match frame.op {
            4 => acknowledged += 1,
            op::HEARTBEAT_REPLY => break,
            other => bail!("unexpected op {other}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ceiling = 10 + (5.0 * elapsed).ceil() as usize;
    assert!(
        (10..=ceiling).contains(&acknowledged),
        "{acknowledged} forwarded in {elapsed:.3}s, expected 10..={ceiling}"
    );
    h.logic_saw("the forwarded Receives", |_| {
        h.stub.receives(31) == acknowledged
    })
    .await?;

    // Another connection has its own bucket.
    quiet.send_raw(op4_burst_then_heartbeat(8)).await?;
    for _ in 0..8 {
        assert_eq!(quiet.next_message().await?.op, 4);
    }
    assert_eq!(quiet.next_message().await?.op, op::HEARTBEAT_REPLY);
    h.logic_saw("8 Receives", |_| h.stub.receives(32) == 8)
        .await?;

    assert_eq!(
        h.metric(r#"herald_comet_receives_total{outcome="forwarded"}"#)
            .await?,
        (acknowledged + 8) as f64
    );
    assert_eq!(
        h.metric(r#"herald_comet_receives_total{outcome="rate_limited"}"#)
            .await?,
        (50 - acknowledged) as f64
    );
    // Dropping is not closing (flood close is off): the flooder still works.
    flooder.send_raw(hex(T3)).await?;
    assert_eq!(flooder.next_message().await?.op, op::HEARTBEAT_REPLY);
    h.shutdown().await
}

#[tokio::test]
async fn a_sustained_receive_flood_closes_the_connection() -> Result {
    let mut h = Harness::start(|c| {
        c.receive_rate = 5;
        c.receive_burst = 5;
        c.receive_flood_close = 20;
    })
    .await?;
    let mut healthy = h.tcp_client(&token_mid(41, "calm")).await?;
    let mut flooder = h.tcp_client(&token_mid(42, "flood")).await?;
    let _ = flooder.send_raw(op4_burst_then_heartbeat(100)).await;
    let frames = closed(&mut flooder).await?;
    assert!(
        frames.iter().all(|f| f.op == 4) && (5..=7).contains(&frames.len()),
        "only the burst is acknowledged before the close: {frames:?}"
    );
    h.logic_saw("Disconnect", |_| h.stub.disconnects("flood") == 1)
        .await?;
    assert_eq!(h.stub.receives(42), frames.len());
    assert_eq!(
        h.metric(r#"herald_comet_disconnects_total{reason="receive_flood"}"#)
            .await?,
        1.0
    );
    // The closing drop is the 20th: every one is counted, none forwarded.
    assert_eq!(
        h.metric(r#"herald_comet_receives_total{outcome="rate_limited"}"#)
            .await?,
        20.0
    );
    healthy.send_raw(hex(T10_REQ)).await?;
    assert_eq!(healthy.next_message().await?.op, 4);
    h.serves_a_new_client(false, "after-flood").await?;
    h.shutdown().await
}

/// `frames` encoded back to back, for one write.
fn concat(frames: &[Frame]) -> Vec<u8> {
    frames.iter().flat_map(|f| f.to_bytes().to_vec()).collect()
}

#[tokio::test]
async fn ops_not_bound_for_receive_are_never_rate_limited() -> Result {
    let mut h = Harness::start(|c| {
        c.receive_rate = 1;
        c.receive_burst = 1;
        c.receive_flood_close = 2;
    })
    .await?;
    let mut c = h.tcp_client(&token_mid(61, "busy")).await?;
    // The one token goes: from here any limited op is dropped, and the
    // second drop closes the connection.
    c.send_raw(hex(T10_REQ)).await?;
    assert_eq!(c.next_message().await?.op, op::SEND_MSG);
    let frame = |op, body: &'static [u8]| Frame {
        ver: 1,
        op,
        seq: op,
        body: Bytes::from_static(body),
    };
    let mut unlimited = Vec::new();
    for _ in 0..5 {
        unlimited.push(frame(op::HEARTBEAT, b""));
        unlimited.push(frame(op::CHANGE_ROOM, b"live://a"));
        unlimited.push(frame(op::SUB, b"1000"));
        unlimited.push(frame(op::UNSUB, b"1000"));
    }
    c.send_raw(concat(&unlimited)).await?;
    for sent in &unlimited {
        assert_eq!(c.next_message().await?.op, sent.op + 1, "answered");
    }
    assert_eq!(
        h.metric(r#"herald_comet_receives_total{outcome="rate_limited"}"#)
            .await?,
        0.0
    );
    // The limit was live all along: three op 4 now close the connection.
    let op4 = frame(op::SEND_MSG, b"");
    c.send_raw(concat(&[op4.clone(), op4.clone(), op4])).await?;
    let frames = closed(&mut c).await?;
    assert!(frames.iter().all(|f| f.op == op::SEND_MSG), "{frames:?}");
    h.wait_metric(
        r#"herald_comet_disconnects_total{reason="receive_flood"}"#,
        1.0,
    )
    .await?;
    h.serves_a_new_client(false, "after-busy").await?;
    h.shutdown().await
}

/// Sends `n` op 4 and a heartbeat; returns how many op 4 were answered
/// (forwarded) before the heartbeat's reply, and the seconds it took.
async fn op4_acknowledged(client: &mut herald_client::Client, n: usize) -> Result<(usize, f64)> {
    let started = std::time::Instant::now();
    client.send_raw(op4_burst_then_heartbeat(n)).await?;
    let mut acknowledged = 0;
    loop {
        match client.next_message().await?.op {
            op::SEND_MSG => acknowledged += 1,
            op::HEARTBEAT_REPLY => return Ok((acknowledged, started.elapsed().as_secs_f64())),
            other => bail!("unexpected op {other}"),
        }
    }
}

#[tokio::test]
async fn receive_limit_flags_default_as_documented_and_zero_means_none() -> Result {
    use herald_comet::{Args, Config};

    // The documented defaults, as the binary parses them and as tests build them.
    let parsed: Args = herald_runtime::args::parse(&[])?;
    for config in [parsed.config(), Config::new("c", "l:1")] {
        assert_eq!(
            (
                config.receive_rate,
                config.receive_burst,
                config.receive_flood_close
            ),
            (20, 40, 200)
        );
        assert_eq!(config.queue_bytes, 262_144);
        assert_eq!(config.send_buffer, Some(65_536));
        assert!(!config.strict_pack_len);
    }
    let autotuned: Args = herald_runtime::args::parse(&["--send-buffer-bytes", "0"])?;
    assert_eq!(autotuned.config().send_buffer, None, "0 keeps autotuning");

    // Defaults over a socket: a burst of 40 passes, more are dropped, and
    // 60 at once is no flood.
    let mut h = Harness::start(|_| {}).await?;
    let mut c = h.tcp_client(&token_mid(71, "default")).await?;
    let (acknowledged, elapsed) = op4_acknowledged(&mut c, 60).await?;
    let ceiling = 40 + (20.0 * elapsed).ceil() as usize;
    assert!(
        (40..=ceiling).contains(&acknowledged),
        "{acknowledged} forwarded in {elapsed:.3}s, expected 40..={ceiling}"
    );
    assert_eq!(
        h.metric(r#"herald_comet_receives_total{outcome="rate_limited"}"#)
            .await?,
        (60 - acknowledged) as f64
    );
    h.serves_a_new_client(false, "after-default").await?;
    h.shutdown().await?;

    // Rate 0: no limit, so not even 300 at once (past the default flood
    // close) is dropped or closed.
    let mut h = Harness::start(|c| c.receive_rate = 0).await?;
    let mut c = h.tcp_client(&token_mid(72, "unlimited")).await?;
    assert_eq!(op4_acknowledged(&mut c, 300).await?.0, 300);
    h.logic_saw("300 Receives", |_| h.stub.receives(72) == 300)
        .await?;
    assert_eq!(
        h.metric(r#"herald_comet_receives_total{outcome="rate_limited"}"#)
            .await?,
        0.0
    );
    h.serves_a_new_client(false, "after-unlimited").await?;
    h.shutdown().await
}

/// T3 (heartbeat) with `pack_len` 10, shorter than its own header.
fn short_heartbeat() -> Vec<u8> {
    let mut frame = hex(T3);
    frame[..4].copy_from_slice(&10i32.to_be_bytes());
    frame
}

#[tokio::test]
async fn short_pack_len_is_lenient_by_default() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let mut c = h.tcp_client(&token("lenient", "", &[])).await?;
    c.send_raw(short_heartbeat()).await?;
    assert_eq!(
        c.next_message().await?.op,
        op::HEARTBEAT_REPLY,
        "goim reads it as no body"
    );
    let mut w = h.ws_client(&token("lenient-ws", "", &[])).await?;
    w.send_raw(short_heartbeat()).await?;
    assert_eq!(w.next_message().await?.op, op::HEARTBEAT_REPLY);
    h.shutdown().await
}

#[tokio::test]
async fn strict_pack_len_closes_short_frames() -> Result {
    let mut h = Harness::start(|c| c.strict_pack_len = true).await?;
    let mut healthy = h.tcp_client(&token("fine", "", &[])).await?;
    let mut c = h.tcp_client(&token("strict", "", &[])).await?;
    c.send_raw(short_heartbeat()).await?;
    assert!(closed(&mut c).await?.is_empty(), "closed without a reply");
    let mut w = h.ws_client(&token("strict-ws", "", &[])).await?;
    w.send_raw(short_heartbeat()).await?;
    assert!(closed(&mut w).await?.is_empty(), "closed without a reply");
    h.wait_metric(
        r#"herald_comet_disconnects_total{reason="short_pack_len"}"#,
        2.0,
    )
    .await?;
    healthy.send_raw(hex(T3)).await?;
    assert_eq!(healthy.next_message().await?.op, op::HEARTBEAT_REPLY);
    h.serves_a_new_client(false, "after-strict").await?;
    h.shutdown().await
}

/// One frame of `op` from a client (ver 1, seq = op), empty body.
fn client_frame(op: i32) -> Frame {
    Frame {
        ver: 1,
        op,
        seq: op,
        body: Bytes::new(),
    }
}

#[tokio::test]
async fn reserved_ops_from_clients_are_dropped_unanswered() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let reserved = [op::PROTO_READY, op::PROTO_FINISH, op::REDIRECT, 19, 20, 31];
    let mut tcp = h.tcp_client(&token_mid(51, "tcp")).await?;
    let mut ws = h.ws_client(&token_mid(52, "ws")).await?;
    for client in [&mut tcp, &mut ws] {
        for op in reserved {
            client.send(client_frame(op)).await?;
        }
        // Replies keep request order: op 4's echo comes after whatever the
        // reserved ops got, and nothing else may come before it.
        client.send(client_frame(op::SEND_MSG)).await?;
        let first = client.next_message().await?;
        assert_eq!(
            (first.op, first.seq),
            (op::SEND_MSG, op::SEND_MSG),
            "no echo of a reserved op"
        );
        // The client is still served.
        client.send_raw(hex(T3)).await?;
        assert_eq!(client.next_message().await?.op, op::HEARTBEAT_REPLY);
    }
    h.logic_saw("both op-4 Receives", |_| {
        h.stub.receives(51) == 1 && h.stub.receives(52) == 1
    })
    .await?;
    assert_eq!(
        h.metric(r#"herald_comet_refusals_total{reason="client_reserved_op"}"#)
            .await?,
        (2 * reserved.len()) as f64
    );
    h.serves_a_new_client(false, "after-reserved").await?;
    h.shutdown().await
}

#[tokio::test]
async fn pushes_carrying_reserved_ops_are_refused_on_every_rpc() -> Result {
    use herald_protocol::pb::push::PushMsgsReq;
    use herald_protocol::pb::push::comet_push_client::CometPushClient;
    use herald_protocol::pb::{BroadcastReq, Proto, PushMsgReq};

    let mut h = Harness::start(|_| {}).await?;
    // Accepts the reserved ops too: only the comet's refusal keeps them off.
    let accepts = [1000, 10, 11, 18, 19];
    let mut tcp = h.tcp_client(&token("k1", "room", &accepts)).await?;
    let mut ws = h.ws_client(&token("k2", "room", &accepts)).await?;
    let mut grpc = h.comet_client().await?;
    let mut batch = CometPushClient::new(h.channel().await?);
    let keys = vec!["k1".to_owned(), "k2".to_owned()];
    let bare = |op| Proto {
        ver: 1,
        op,
        seq: 0,
        body: Bytes::from_static(b"x"),
    };
    let push = |proto_op, proto| PushMsgReq {
        keys: keys.clone(),
        proto: Some(proto),
        proto_op,
    };
    let mut refused = Vec::new();
    // The frames carry a reserved op, or (third) only the filtering op is
    // one: room pushes have none, so that one is no room push.
    for (proto_op, proto, frames_reserved) in [
        (10, raw_push(10, b"x"), true),
        (1000, raw_push(18, b"x"), true),
        (18, raw_push(1000, b"x"), false),
        (11, bare(11), true),
        (1000, bare(19), true),
    ] {
        refused.push(grpc.push_msg(push(proto_op, proto.clone())).await.err());
        refused.push(
            grpc.broadcast(BroadcastReq {
                proto_op,
                proto: Some(proto.clone()),
                speed: 0,
            })
            .await
            .err(),
        );
        if frames_reserved {
            refused.push(
                grpc.broadcast_room(BroadcastRoomReq {
                    room_id: "room".into(),
                    proto: Some(proto.clone()),
                })
                .await
                .err(),
            );
        }
        // One reserved push in a batch refuses the batch before delivery.
        refused.push(
            batch
                .push_msgs(PushMsgsReq {
                    pushes: vec![push(1000, raw_push(1000, b"ok")), push(proto_op, proto)],
                })
                .await
                .err(),
        );
    }
    for status in &refused {
        assert_eq!(
            status.as_ref().map(tonic::Status::code),
            Some(tonic::Code::InvalidArgument),
            "{refused:?}"
        );
    }
    // A room push whose op-9 body hides a reserved frame after a good one.
    let mut hidden = Frame::push(1000, &b"a"[..]).to_bytes().to_vec();
    hidden.extend_from_slice(&Frame::push(op::PROTO_READY, &b"b"[..]).to_bytes());
    let status = grpc
        .broadcast_room(BroadcastRoomReq {
            room_id: "room".into(),
            proto: Some(herald_protocol::ws::raw_proto(hidden.into())),
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    // An op-9 body that ends inside a frame: malformed, refused whole.
    let mut cut = Frame::push(1000, &b"a"[..]).to_bytes().to_vec();
    cut.extend_from_slice(&Frame::push(1000, &b"bc"[..]).to_bytes()[..17]);
    let status = grpc
        .broadcast_room(BroadcastRoomReq {
            room_id: "room".into(),
            proto: Some(herald_protocol::ws::raw_proto(cut.into())),
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // Nothing reached either client: the next message is the good push.
    grpc.push_msg(push(1000, raw_push(1000, b"good"))).await?;
    let good = Frame::push(1000, &b"good"[..]);
    assert_eq!(tcp.next_message().await?, good);
    let wrapped = ws.next_message().await?;
    assert_eq!((wrapped.op, wrapped.body), (op::RAW, good.to_bytes()));
    assert_eq!(
        h.metric(r#"herald_comet_refusals_total{reason="push_reserved_op"}"#)
            .await?,
        (refused.len() + 1) as f64
    );
    assert_eq!(
        h.metric(r#"herald_comet_refusals_total{reason="push_malformed"}"#)
            .await?,
        1.0
    );
    h.shutdown().await
}

#[tokio::test]
async fn accepted_ops_and_room_ids_are_capped() -> Result {
    use herald_protocol::limits::{MAX_ACCEPTED_OPS, MAX_ROOM_ID_BYTES};
    use herald_protocol::pb::PushMsgReq;

    let mut h = Harness::start(|_| {}).await?;
    let mut c = h.tcp_client(&token("capped", "room", &[1000])).await?;
    let mut healthy = h.tcp_client(&token("healthy", "room", &[1000])).await?;
    let mut grpc = h.comet_client().await?;

    // Filling the set to the limit works; one more op is refused whole.
    let fill: Vec<i32> = (2000..).take(MAX_ACCEPTED_OPS - 1).collect();
    c.subscribe(&fill).await?;
    c.subscribe(&[5000, 5001]).await?;
    let push = |key: &str, op| PushMsgReq {
        keys: vec![key.to_owned()],
        proto: Some(raw_push(op, b"p")),
        proto_op: op,
    };
    grpc.push_msg(push("capped", 5000)).await?;
    grpc.push_msg(push("capped", 2000)).await?;
    assert_eq!(
        c.next_message().await?.op,
        2000,
        "op 5000 was not added, op 2000 was"
    );
    assert_eq!(
        h.metric(r#"herald_comet_refusals_total{reason="accepted_ops_limit"}"#)
            .await?,
        1.0
    );

    // A room id one byte too long: the move fails (echo all the same).
    let long = "r".repeat(MAX_ROOM_ID_BYTES + 1);
    c.change_room(&long).await?;
    assert_eq!(c.heartbeat().await?, 2, "still in `room` with `healthy`");
    c.change_room(&long[1..]).await?;
    assert_eq!(c.heartbeat().await?, 1, "a room at the limit is joined");
    assert_eq!(
        h.metric(r#"herald_comet_refusals_total{reason="room_id_too_long"}"#)
            .await?,
        1.0
    );

    // A Connect reply over either limit (a goim logic does not check) is
    // refused, and its route taken back.
    let mut too_many = connect_tcp(h.tcp).await?;
    let accepts: Vec<i32> = (0..).take(MAX_ACCEPTED_OPS + 1).collect();
    let _ = too_many
        .send(auth_frame(&token("many", "", &accepts)))
        .await;
    assert!(closed(&mut too_many).await?.is_empty(), "no op 8");
    let mut far = connect_tcp(h.tcp).await?;
    let _ = far.send(auth_frame(&token("far", &long, &[]))).await;
    assert!(closed(&mut far).await?.is_empty(), "no op 8");
    for key in ["many", "far"] {
        h.logic_saw("Disconnect", |_| h.stub.disconnects(key) == 1)
            .await?;
    }
    assert_eq!(
        h.metric(r#"herald_comet_refusals_total{reason="room_id_too_long"}"#)
            .await?,
        2.0
    );
    assert_eq!(
        h.metric(r#"herald_comet_refusals_total{reason="accepted_ops_limit"}"#)
            .await?,
        2.0,
        "op 14, then the Connect reply"
    );

    // The others are served throughout.
    grpc.push_msg(push("healthy", 1000)).await?;
    assert_eq!(healthy.next_message().await?.op, 1000);
    h.shutdown().await
}

/// The soft `RLIMIT_NOFILE` of this process, from `/proc/self/limits`.
fn open_files_limit() -> Result<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits")?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no open files line")?;
    Ok(line
        .split_whitespace()
        .nth(3)
        .context("no soft limit")?
        .parse()?)
}

/// Connections wait in the kernel's accept queue of a client listener bound
/// as the binary binds it, with nothing accepting: far more than tokio's
/// `bind` allows (128; 129 connects complete there, then SYNs are dropped and
/// the next connect hangs, which the deadline catches).
#[tokio::test]
async fn client_listeners_queue_more_than_tokios_default_backlog() -> Result {
    use herald_comet::{Args, LISTEN_BACKLOG};

    let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")?
        .trim()
        .parse()?;
    // Bounded by the kernel's cap and by the descriptors this process may
    // open (other tests in this binary run alongside).
    let queued = (LISTEN_BACKLOG as usize)
        .min(somaxconn)
        .min(1500)
        .min(open_files_limit()? / 4);
    let args: Args = herald_runtime::args::parse(&[
        "--tcp-addr",
        "127.0.0.1:0",
        "--ws-addr",
        "127.0.0.1:0",
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
    ])?;
    let listeners = args.bind().await?;
    for listener in [&listeners.tcp, &listeners.ws] {
        let addr = listener.local_addr()?;
        let mut waiting = Vec::with_capacity(queued);
        let connected = timeout(WAIT, async {
            while waiting.len() < queued {
                waiting.push(tokio::net::TcpStream::connect(addr).await?);
            }
            anyhow::Ok(())
        })
        .await;
        anyhow::ensure!(
            connected.is_ok(),
            "only {} of {queued} connects completed",
            waiting.len()
        );
        connected??;
    }
    println!("{queued} connections queued unaccepted (somaxconn {somaxconn})");
    Ok(())
}
