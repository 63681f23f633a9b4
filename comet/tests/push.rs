//! Pushes through the gRPC services: the spec vectors on each transport,
//! batched and refused pushes, accepted ops, paced broadcasts, slow consumers
//! against a comet that falls behind, and push-to-write latency.

mod common;

use std::collections::HashMap;

use bytes::Bytes;
use herald_client::Client;
use herald_protocol::pb::admin::LoadRequest;
use herald_protocol::pb::goim::comet::RoomsReq;
use herald_protocol::pb::{BroadcastReq, BroadcastRoomReq, Proto, PushMsgReq};
use herald_protocol::{Frame, op, ws};
use herald_testkit::http;

use common::{
    Harness, Result, T3, T5, T6, T7, WAIT, closed, hex, metric_value, raw_push, t7_ws, token,
};

#[tokio::test]
async fn pushes_match_t5_t6_t7_on_each_transport() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let mut t = h.tcp_client(&token("k1", "live://1000", &[1000])).await?;
    let mut w = h.ws_client(&token("k2", "live://1000", &[1000])).await?;
    let mut grpc = h.comet_client().await?;

    grpc.push_msg(PushMsgReq {
        keys: vec!["k1".into(), "missing".into(), "k2".into()],
        proto: Some(ws::raw_proto(hex(T5).into())),
        proto_op: 1000,
    })
    .await?;
    assert_eq!(t.next_message().await?.to_bytes(), hex(T5), "T5 on TCP");
    assert_eq!(
        w.next_message().await?.to_bytes(),
        hex(T6),
        "T6 on WebSocket"
    );

    grpc.broadcast_room(BroadcastRoomReq {
        room_id: "live://1000".into(),
        proto: Some(ws::raw_proto(hex(T7).into())),
    })
    .await?;
    let mut t7 = t.next_message().await?.to_bytes().to_vec();
    t7.extend(t.next_message().await?.to_bytes());
    assert_eq!(t7, hex(T7), "T7 on TCP");
    assert_eq!(
        w.next_message().await?.to_bytes(),
        t7_ws(),
        "T7 on WebSocket"
    );

    // A non-op-9 proto is framed as one frame.
    grpc.push_msg(PushMsgReq {
        keys: vec!["k1".into()],
        proto: Some(Proto {
            ver: 1,
            op: 1000,
            seq: 0,
            body: Bytes::from_static(b"hello"),
        }),
        proto_op: 1000,
    })
    .await?;
    assert_eq!(t.next_message().await?.to_bytes(), hex(T5));

    let rooms = grpc.rooms(RoomsReq {}).await?.into_inner().rooms;
    assert_eq!(rooms, HashMap::from([("live://1000".to_owned(), true)]));
    h.shutdown().await
}

#[tokio::test]
async fn push_msgs_delivers_each_push_to_its_keys_in_order() -> Result {
    use herald_protocol::pb::push::PushMsgsReq;
    use herald_protocol::pb::push::comet_push_client::CometPushClient;
    let mut h = Harness::start(|_| {}).await?;
    let mut a = h.tcp_client(&token("a", "", &[1000])).await?;
    let mut b = h.ws_client(&token("b", "", &[1000])).await?;
    let mut batch = CometPushClient::new(h.channel().await?);
    let push = |keys: &[&str], body: &'static [u8]| PushMsgReq {
        keys: keys.iter().map(|k| (*k).to_owned()).collect(),
        proto: Some(raw_push(1000, body)),
        proto_op: 1000,
    };
    batch
        .push_msgs(PushMsgsReq {
            pushes: vec![
                push(&["a"], b"a1"),
                push(&["b", "missing"], b"b1"),
                push(&["a", "b"], b"ab"),
                push(&["a"], b"a2"),
            ],
        })
        .await?;
    for want in [&b"a1"[..], b"ab", b"a2"] {
        assert_eq!(&a.next_message().await?.body[..], want);
    }
    for want in [&b"b1"[..], b"ab"] {
        let msg = b.next_message().await?.to_bytes();
        assert!(msg.ends_with(want), "{msg:?} for {want:?}");
    }
    // One bad push refuses the whole batch before any of it is delivered.
    let err = batch
        .push_msgs(PushMsgsReq {
            pushes: vec![push(&["a"], b"no"), push(&[], b"xx")],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("push 1"), "{}", err.message());
    h.comet_client()
        .await?
        .push_msg(push(&["a"], b"ok"))
        .await?;
    assert_eq!(
        &a.next_message().await?.body[..],
        b"ok",
        "the refused batch sent nothing"
    );
    h.shutdown().await
}

#[tokio::test]
async fn invalid_push_requests_are_rejected() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let mut grpc = h.comet_client().await?;
    let proto = Some(raw_push(1000, b"x"));
    let err = grpc
        .push_msg(PushMsgReq {
            keys: vec![],
            proto: proto.clone(),
            proto_op: 1000,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = grpc
        .push_msg(PushMsgReq {
            keys: vec!["k".into()],
            proto: None,
            proto_op: 1000,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = grpc
        .broadcast_room(BroadcastRoomReq {
            room_id: String::new(),
            proto,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = grpc
        .broadcast_room(BroadcastRoomReq {
            room_id: "r".into(),
            proto: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    h.shutdown().await
}

#[tokio::test]
async fn key_and_broadcast_pushes_respect_accepted_ops() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let mut c = h.tcp_client(&token("f", "", &[1000])).await?;
    let mut grpc = h.comet_client().await?;
    let push = |op: i32, body: &'static [u8]| PushMsgReq {
        keys: vec!["f".into()],
        proto: Some(raw_push(op, body)),
        proto_op: op,
    };

    // 1001 is not accepted: the next frame seen is the 1000 marker.
    grpc.push_msg(push(1001, b"no")).await?;
    grpc.push_msg(push(1000, b"m1")).await?;
    assert_eq!(c.next_message().await?, Frame::push(1000, &b"m1"[..]));

    c.send(Frame {
        ver: 1,
        op: op::SUB,
        seq: 4,
        body: Bytes::from_static(b"1001,1002"),
    })
    .await?;
    let reply = c.next_message().await?;
    assert_eq!(
        (reply.op, reply.seq, &reply.body[..]),
        (op::SUB_REPLY, 4, &b"1001,1002"[..])
    );
    grpc.push_msg(push(1001, b"yes")).await?;
    assert_eq!(c.next_message().await?, Frame::push(1001, &b"yes"[..]));

    // A bad list changes nothing but is still echoed.
    c.send(Frame {
        ver: 1,
        op: op::UNSUB,
        seq: 5,
        body: Bytes::from_static(b"1001,x"),
    })
    .await?;
    assert_eq!(c.next_message().await?.op, op::UNSUB_REPLY);
    grpc.push_msg(push(1001, b"still")).await?;
    assert_eq!(c.next_message().await?, Frame::push(1001, &b"still"[..]));

    c.send(Frame {
        ver: 1,
        op: op::UNSUB,
        seq: 6,
        body: Bytes::from_static(b"1001"),
    })
    .await?;
    assert_eq!(c.next_message().await?.op, op::UNSUB_REPLY);
    grpc.push_msg(push(1001, b"gone")).await?;
    grpc.broadcast(BroadcastReq {
        proto_op: 1001,
        proto: Some(raw_push(1001, b"gone")),
        speed: 0,
    })
    .await?;
    grpc.broadcast(BroadcastReq {
        proto_op: 1002,
        proto: Some(raw_push(1002, b"bc")),
        speed: 0,
    })
    .await?;
    assert_eq!(c.next_message().await?, Frame::push(1002, &b"bc"[..]));
    h.shutdown().await
}

#[tokio::test]
async fn paced_broadcast_reaches_every_accepting_connection() -> Result {
    let mut h = Harness::start(|c| c.buckets = 4).await?;
    let mut clients = Vec::new();
    for i in 0..6 {
        clients.push(h.tcp_client(&token(&format!("p{i}"), "", &[1000])).await?);
    }
    let mut w = h.ws_client(&token("pw", "", &[1000])).await?;
    let mut grpc = h.comet_client().await?;
    grpc.broadcast(BroadcastReq {
        proto_op: 1000,
        proto: Some(raw_push(1000, b"all")),
        speed: 50,
    })
    .await?;
    for c in &mut clients {
        assert_eq!(c.next_message().await?, Frame::push(1000, &b"all"[..]));
    }
    let msg = w.next_message().await?.to_bytes();
    assert_eq!(msg, ws::wrap(&Frame::push(1000, &b"all"[..]).to_bytes()));
    h.shutdown().await
}

#[tokio::test]
async fn slow_consumer_is_closed_and_others_still_receive() -> Result {
    const QUEUE: usize = 64 * 1024;
    const SEND_BUFFER: usize = 16 * 1024;
    let mut h = Harness::start(|c| {
        c.queue_bytes = QUEUE;
        c.send_buffer = Some(SEND_BUFFER);
    })
    .await?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut slow = Client::tcp_over(socket.connect(h.tcp).await?).with_timeout(WAIT);
    slow.auth(token("slow", "", &[1000])).await?;
    let mut fast = h.ws_client(&token("fast", "", &[1000])).await?;
    let mut grpc = h.comet_client().await?;
    let mut admin = h.admin_client().await?;
    let big = Frame::push(1000, vec![7u8; 16 * 1024]).to_bytes();

    let mut pushes = 0;
    loop {
        grpc.push_msg(PushMsgReq {
            keys: vec!["slow".into()],
            proto: Some(ws::raw_proto(big.clone())),
            proto_op: 1000,
        })
        .await?;
        pushes += 1;
        let load = admin.load(LoadRequest {}).await?.into_inner();
        if load.connections == 1 {
            break;
        }
        assert!(pushes < 4000, "slow consumer never closed");
    }
    // What a non-reader can hold before it is closed: the queue, the kernel
    // send buffer (doubled by Linux), and its own small receive window.
    let held = pushes * big.len();
    println!("slow consumer closed after {pushes} pushes, {held} bytes");
    assert!(
        held <= QUEUE + 2 * SEND_BUFFER + 64 * 1024,
        "closed only after {held} bytes"
    );
    grpc.push_msg(PushMsgReq {
        keys: vec!["fast".into(), "slow".into()],
        proto: Some(raw_push(1000, b"still here")),
        proto_op: 1000,
    })
    .await?;
    let msg = fast.next_message().await?.to_bytes();
    assert_eq!(
        msg,
        ws::wrap(&Frame::push(1000, &b"still here"[..]).to_bytes())
    );
    h.logic_saw("slow Disconnect", |_| h.stub.disconnects("slow") == 1)
        .await?;
    h.wait_metric(
        r#"herald_comet_disconnects_total{reason="slow_consumer"}"#,
        1.0,
    )
    .await?;
    assert!(
        h.metric(r#"herald_comet_push_drops_total{reason="slow_consumer"}"#)
            .await?
            >= 1.0,
        "the push that found the queue full is counted"
    );
    // The slow client's socket ends after whatever was in flight.
    closed(&mut slow).await?;
    // A client that connects now is served.
    let mut late = h.tcp_client(&token("late", "", &[1000])).await?;
    grpc.push_msg(PushMsgReq {
        keys: vec!["late".into()],
        proto: Some(raw_push(1000, b"late")),
        proto_op: 1000,
    })
    .await?;
    assert_eq!(late.next_message().await?, Frame::push(1000, &b"late"[..]));
    h.shutdown().await
}

/// Room pushes that outrun comet's own writing (a hundred calls in flight at
/// once against a 1 KiB queue) fill the queue of a client that reads all the
/// time. That is comet falling behind, not a slow client: the pushes wait
/// for queue space and the client gets every one, in no particular order, and is
/// not closed. (Before, it was closed as a slow consumer.)
#[tokio::test]
async fn a_client_that_keeps_up_is_not_closed_when_comet_falls_behind() -> Result {
    const CALLS: usize = 100;
    let mut h = Harness::start(|c| c.queue_bytes = 1024).await?;
    let mut client = h.tcp_client(&token("busy", "live://busy", &[])).await?;
    let grpc = h.comet_client().await?;
    let calls = (0..CALLS).map(|i| {
        let mut grpc = grpc.clone();
        // ~300 bytes each: four fill the queue.
        let body = format!("{i:>300}");
        async move {
            grpc.broadcast_room(BroadcastRoomReq {
                room_id: "live://busy".into(),
                proto: Some(ws::raw_proto(
                    Frame::push(1000, body.into_bytes()).to_bytes(),
                )),
            })
            .await
        }
    });
    let (answers, frames) = tokio::join!(futures::future::join_all(calls), async {
        let mut frames = Vec::new();
        while frames.len() < CALLS {
            frames.push(client.next_message().await?);
        }
        Result::<_>::Ok(frames)
    });
    for answer in answers {
        answer?;
    }
    let mut got: Vec<usize> = frames?
        .iter()
        .map(|f| String::from_utf8_lossy(&f.body).trim().parse())
        .collect::<std::result::Result<_, _>>()?;
    got.sort_unstable();
    assert_eq!(got, (0..CALLS).collect::<Vec<_>>(), "every push, once");
    assert!(
        h.metric("herald_comet_push_waits_total").await? > 0.0,
        "the queue never filled: this test did not make comet fall behind"
    );
    assert_eq!(
        h.metric("herald_comet_push_drops_total{reason=\"slow_consumer\"}")
            .await?,
        0.0
    );
    let mut admin = h.admin_client().await?;
    assert_eq!(
        admin.load(LoadRequest {}).await?.into_inner().connections,
        1
    );
    h.shutdown().await
}

#[tokio::test]
async fn push_to_write_latency_is_observed_for_pushes_only() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let mut tcp = h.tcp_client(&token("lat-tcp", "", &[1000])).await?;
    let mut web = h.ws_client(&token("lat-ws", "", &[1000])).await?;
    // Replies are not pushes: a heartbeat must not be observed.
    tcp.send_raw(hex(T3)).await?;
    assert_eq!(tcp.next_message().await?.op, op::HEARTBEAT_REPLY);
    let mut grpc = h.comet_client().await?;
    for _ in 0..3 {
        grpc.push_msg(PushMsgReq {
            keys: vec!["lat-tcp".into(), "lat-ws".into()],
            proto_op: 1000,
            proto: Some(raw_push(1000, b"hello")),
        })
        .await?;
        assert_eq!(tcp.next_message().await?, Frame::push(1000, &b"hello"[..]));
        web.next_message().await?;
    }
    h.wait_metric("herald_comet_push_write_latency_seconds_count", 6.0)
        .await?;
    let body = http::get(h.http, "/metrics").await?.body;
    let sum = metric_value(&body, "herald_comet_push_write_latency_seconds_sum");
    assert!(sum > 0.0 && sum < 6.0 * 5.0, "sum {sum}");
    assert_eq!(
        metric_value(
            &body,
            r#"herald_comet_push_write_latency_seconds_bucket{le="+Inf"}"#
        ),
        6.0
    );
    h.shutdown().await
}

/// With a shared gRPC token set, the gRPC port refuses a push without it
/// and one with another token (`Unauthenticated`, saying what is wrong and
/// never the token, each counted by reason); with the token, pushes and the
/// operator's `Load` go through. The admin HTTP port stays open.
#[tokio::test]
async fn the_grpc_port_wants_the_shared_token_when_one_is_set() -> Result {
    use herald_protocol::pb::CometClient;
    use herald_protocol::pb::admin::comet_admin_client::CometAdminClient;
    use herald_runtime::grpc_auth::{self, TokenSource};

    const SECRET: &str = "s3cret-grpc-token";
    let mut h = Harness::start(|config| config.grpc_token = TokenSource::literal(SECRET)).await?;
    let mut t = h.tcp_client(&token("k1", "", &[1000])).await?;
    let push = || PushMsgReq {
        keys: vec!["k1".into()],
        proto: Some(ws::raw_proto(hex(T5).into())),
        proto_op: 1000,
    };

    let refused = h.comet_client().await?.push_msg(push()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(grpc_auth::is_refusal(&refused), "{refused:?}");
    assert!(refused.message().contains("carried none"), "{refused:?}");
    let missing = "herald_comet_grpc_auth_refusals_total{reason=\"missing\"}";
    h.wait_metric(missing, 1.0).await?;

    let wrong_token = TokenSource::literal("not-the-token").start()?;
    let mut wrong = CometClient::new(wrong_token.channel(h.channel().await?));
    let refused = wrong.push_msg(push()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(!refused.message().contains("not-the-token"), "{refused:?}");
    assert!(!refused.message().contains(SECRET), "{refused:?}");
    let wrong_series = "herald_comet_grpc_auth_refusals_total{reason=\"wrong\"}";
    h.wait_metric(wrong_series, 1.0).await?;
    herald_testkit::expect_silence(&mut t, std::time::Duration::from_millis(200)).await?;

    let right = TokenSource::literal(SECRET).start()?;
    let mut comet = CometClient::new(right.channel(h.channel().await?));
    comet.push_msg(push()).await?;
    assert_eq!(t.next_message().await?.to_bytes(), hex(T5), "pushed");
    let mut admin = CometAdminClient::new(right.channel(h.channel().await?));
    let load = admin.load(LoadRequest {}).await?.into_inner();
    assert_eq!(load.connections, 1);
    assert_eq!(h.metric(missing).await?, 1.0, "nothing more refused");
    assert_eq!(h.metric(wrong_series).await?, 1.0);
    assert_eq!(http::get(h.http, "/healthz").await?.status, 200);
    h.shutdown().await
}
