//! A comet's life around its connections: load and drain (RPC and on
//! shutdown), shutdown, readiness, the admin HTTP endpoints, and a mass close
//! whose every `Disconnect` reaches logic.

mod common;

use std::time::Duration;

use anyhow::Context;
use herald_comet::Config;
use herald_protocol::op;
use herald_protocol::pb::BroadcastRoomReq;
use herald_protocol::pb::admin::{CancelDrainRequest, DrainRequest, LoadRequest};
use herald_testkit::http;
use herald_testkit::stub::Event;
use tokio::net::TcpListener;
use tokio::time::timeout;

use common::{
    Harness, Result, T3, WAIT, auth_frame, closed, connect_tcp, hex, raw_push, stub, token,
};

/// A drain that redirects to `comet-b.example.com`, closing 100/s within 2 s.
fn drain_to_comet_b() -> DrainRequest {
    DrainRequest {
        deadline_ms: 2000,
        close_rate: 100,
        nodes: vec!["comet-b.example.com".into()],
        tcp_port: 3101,
        ws_port: 3102,
        wss_port: 3103,
        reconnect_within_ms: 1500,
    }
}

#[tokio::test]
async fn load_and_drain_redirect_then_close_everything() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let redirect = serde_json::json!({
        "key": "r1", "room_id": "a", "herald": {"redirect": true}
    })
    .to_string();
    let mut w = h.ws_client(&redirect).await?;
    let mut t = h.tcp_client(&token("plain", "b", &[])).await?;
    let mut admin = h.admin_client().await?;

    let load = admin.load(LoadRequest {}).await?.into_inner();
    assert_eq!(load.server, "comet-test");
    assert_eq!((load.connections, load.client_ips, load.rooms), (2, 1, 2));
    assert!(!load.draining);
    assert_eq!(load.version, env!("CARGO_PKG_VERSION"));

    let drain = drain_to_comet_b();
    let reply = admin.drain(drain.clone()).await?.into_inner();
    assert!(reply.started);
    assert_eq!(reply.connections, 2);

    let msgs = closed(&mut w).await?;
    assert_eq!(msgs.len(), 1, "one op 18 before the close: {msgs:?}");
    let frame = &msgs[0];
    assert_eq!(frame.op, op::REDIRECT, "op 18 unwrapped on WebSocket");
    let body: serde_json::Value = serde_json::from_slice(&frame.body)?;
    assert_eq!(
        body,
        serde_json::json!({"reason": "drain", "nodes": ["comet-b.example.com"],
            "tcp_port": 3101, "ws_port": 3102, "wss_port": 3103, "reconnect_within_ms": 1500})
    );
    assert!(
        closed(&mut t).await?.is_empty(),
        "no redirect for a client that did not ask"
    );

    let load = admin.load(LoadRequest {}).await?.into_inner();
    assert!(load.draining);
    timeout(WAIT, async {
        while admin.load(LoadRequest {}).await?.into_inner().connections != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        anyhow::Ok(())
    })
    .await??;
    // New connections are refused while draining; a second drain changes nothing.
    let mut late = connect_tcp(h.tcp).await?;
    let _ = late.send(auth_frame(&token("late", "", &[]))).await;
    assert!(closed(&mut late).await?.is_empty());
    assert!(!admin.drain(drain).await?.into_inner().started);
    let readyz = http::get(h.http, "/readyz").await?;
    assert_eq!(
        readyz.status, 503,
        "draining comet is not ready: {readyz:?}"
    );
    h.logic_saw("both Disconnects", |_| {
        h.stub.disconnects("r1") == 1 && h.stub.disconnects("plain") == 1
    })
    .await?;
    h.shutdown().await
}

/// Make before break: after its op 18 a redirected client keeps its
/// connection (and its pushes) for `reconnect_within_ms`, so that it can
/// connect to the new comet first; it is closed then, or as soon as it
/// leaves by itself. A client that did not ask is closed at once.
#[tokio::test]
async fn a_redirected_client_keeps_its_pushes_until_it_has_moved() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let redirect = |key: &str| {
        serde_json::json!({"key": key, "room_id": "live://1", "accepts": [1000],
                           "herald": {"redirect": true}})
        .to_string()
    };
    let mut stays = h.tcp_client(&redirect("stays")).await?;
    let mut leaves = h.tcp_client(&redirect("leaves")).await?;
    let mut plain = h.tcp_client(&token("plain", "live://1", &[1000])).await?;
    let mut admin = h.admin_client().await?;
    let mut drain = drain_to_comet_b();
    drain.deadline_ms = 10_000;
    drain.reconnect_within_ms = 1500;
    let started = std::time::Instant::now();
    assert!(admin.drain(drain).await?.into_inner().started);
    assert!(closed(&mut plain).await?.is_empty(), "closed at once");
    for client in [&mut stays, &mut leaves] {
        let frame = client.next_message().await?;
        assert_eq!(frame.op, op::REDIRECT);
    }
    // Both still get a room push after their op 18.
    let mut grpc = h.comet_client().await?;
    grpc.broadcast_room(BroadcastRoomReq {
        room_id: "live://1".into(),
        proto: Some(raw_push(1000, b"after op 18")),
    })
    .await?;
    for client in [&mut stays, &mut leaves] {
        let frame = client.next_message().await?;
        assert_eq!(&frame.body[..], b"after op 18");
    }
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "the push came after the linger"
    );
    // One leaves on its own: the comet lets go of it then, and the other at
    // the end of its 1.5 s.
    drop(leaves);
    h.logic_saw("the leaving client's Disconnect", |_| {
        h.stub.disconnects("leaves") == 1
    })
    .await?;
    assert_eq!(h.stub.disconnects("stays"), 0, "closed before its linger");
    assert!(closed(&mut stays).await?.is_empty());
    let lingered = started.elapsed();
    assert!(
        lingered >= Duration::from_millis(1400) && lingered < Duration::from_secs(5),
        "closed after {lingered:?}, not at reconnect_within_ms"
    );
    h.shutdown().await
}

/// The opt-in logic verified counts, not only the token's own JSON: a signed
/// token (here: the stub's `grant_redirect`, standing for the claims logic
/// read from a JWT) gets op 18 although comet cannot read it.
#[tokio::test]
async fn a_redirect_granted_by_logic_gets_op_18_without_the_json_member() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let granted = serde_json::json!({"key": "g1", "grant_redirect": true}).to_string();
    let mut g = h.tcp_client(&granted).await?;
    let mut admin = h.admin_client().await?;
    assert!(admin.drain(drain_to_comet_b()).await?.into_inner().started);
    let msgs = closed(&mut g).await?;
    assert_eq!(msgs.len(), 1, "one op 18 before the close: {msgs:?}");
    assert_eq!(msgs[0].op, op::REDIRECT);
    let body: serde_json::Value = serde_json::from_slice(&msgs[0].body)?;
    assert_eq!(body["nodes"], serde_json::json!(["comet-b.example.com"]));
    h.shutdown().await
}

#[tokio::test]
async fn drain_meets_its_deadline_even_at_a_slow_close_rate() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let mut clients = Vec::new();
    for i in 0..4 {
        clients.push(h.tcp_client(&token(&format!("d{i}"), "", &[])).await?);
    }
    let mut admin = h.admin_client().await?;
    let start = tokio::time::Instant::now();
    // One close per second would take 3 s; the 800 ms deadline wins.
    let reply = admin
        .drain(DrainRequest {
            deadline_ms: 800,
            close_rate: 1,
            ..DrainRequest::default()
        })
        .await?
        .into_inner();
    assert_eq!((reply.started, reply.connections), (true, 4));
    for c in &mut clients {
        assert!(
            closed(c).await?.is_empty(),
            "no op 18 without the herald opt-in"
        );
    }
    let took = start.elapsed();
    assert!(took < Duration::from_millis(1500), "drain took {took:?}");
    // ...yet the closes were spread out rather than all at once.
    assert!(took >= Duration::from_millis(400), "drain took {took:?}");
    h.shutdown().await
}

#[tokio::test]
async fn shutdown_closes_connections_and_disconnects_them() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let mut t = h.tcp_client(&token("s1", "", &[])).await?;
    let mut w = h.ws_client(&token("s2", "", &[])).await?;
    h.shutdown().await?;
    closed(&mut t).await?;
    closed(&mut w).await?;
    assert_eq!((h.stub.disconnects("s1"), h.stub.disconnects("s2")), (1, 1));
    Ok(())
}

#[tokio::test]
async fn shutdown_drains_paced_with_redirects_then_returns() -> Result {
    let deadline = Duration::from_secs(5);
    let mut h = Harness::start(|c| {
        c.drain_deadline = deadline;
        c.drain_close_rate = 5;
    })
    .await?;
    h.wait_readyz(200).await?;
    let redirect = serde_json::json!({"key": "sr", "herald": {"redirect": true}}).to_string();
    let mut w = h.ws_client(&redirect).await?;
    let t1 = h.tcp_client(&token("st1", "", &[])).await?;
    let t2 = h.tcp_client(&token("st2", "", &[])).await?;

    // Each client records when it saw EOF (and what came before it).
    let ws_task = tokio::spawn(async move {
        let msgs = closed(&mut w).await;
        (msgs, std::time::Instant::now())
    });
    let tcp_tasks = [t1, t2].map(|mut t| {
        tokio::spawn(async move {
            let frames = closed(&mut t).await;
            (frames, std::time::Instant::now())
        })
    });

    let started = std::time::Instant::now();
    let _ = h.stop.take().context("stop")?.send(());
    // Draining: not ready, new connections refused.
    h.wait_readyz(503).await?;
    // (A refused TCP connect, should the drain already be over, is fine too.)
    if let Ok(mut late) = connect_tcp(h.tcp).await {
        let _ = late.send(auth_frame(&token("late", "", &[]))).await;
        assert!(
            closed(&mut late).await?.is_empty(),
            "refused while draining"
        );
    }

    let comet = h.comet.take().context("comet")?;
    timeout(deadline + Duration::from_secs(2), comet)
        .await
        .context("run did not return")???;
    let took = started.elapsed();
    assert!(took < deadline, "run returned after the deadline: {took:?}");

    let (msgs, ws_closed) = ws_task.await?;
    let msgs = msgs?;
    assert_eq!(msgs.len(), 1, "one op 18 before EOF: {msgs:?}");
    let frame = &msgs[0];
    assert_eq!(frame.op, op::REDIRECT);
    let body: serde_json::Value = serde_json::from_slice(&frame.body)?;
    assert_eq!(body["reason"], "drain");
    assert_eq!(body["nodes"], serde_json::json!([]), "no nodes configured");
    assert_eq!(body["ws_port"], i64::from(h.ws.port()));
    let mut closes = vec![ws_closed];
    for task in tcp_tasks {
        let (frames, closed) = task.await?;
        assert!(frames?.is_empty(), "no op 18 without the opt-in");
        closes.push(closed);
    }
    let first = closes.iter().min().context("closes")?;
    let last = closes.iter().max().context("closes")?;
    // 5/s spaces 3 closes 400 ms apart end to end; a loose lower bound.
    let span = last.duration_since(*first);
    assert!(
        span >= Duration::from_millis(250),
        "closes not paced: {span:?}"
    );
    for key in ["sr", "st1", "st2"] {
        assert_eq!(h.stub.disconnects(key), 1, "Disconnect of {key}");
    }
    let disconnects = h
        .stub
        .events()
        .iter()
        .filter(|e| matches!(e, Event::Disconnect { .. }))
        .count();
    assert_eq!(disconnects, 3);
    Ok(())
}

/// With a node list (the operator's), the shutdown drain takes its deadline
/// and pace from the document as it is at shutdown (here changed after the
/// start: read live, no restart) and op 18 names the other comets that are
/// not draining, not itself and not the draining one.
#[tokio::test]
async fn shutdown_drain_follows_the_node_list() -> Result {
    use herald_runtime::nodes::{DrainSettings, Node, NodeList, Source};
    let dir = std::env::temp_dir().join(format!("comet-nodes-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("nodes.json");
    let node = |name: &str, addr: &str, draining| Node {
        name: name.to_owned(),
        addrs: vec![addr.to_owned()],
        weight: 10,
        draining,
        ..Node::default()
    };
    let mut list = NodeList {
        generation: 1,
        nodes: vec![
            node("comet-test", "127.0.0.1", false),
            node("comet-b", "127.0.0.2", false),
            node("comet-c", "127.0.0.3", true),
        ],
        drain: Some(DrainSettings {
            deadline_ms: 60_000,
            close_rate: 0,
        }),
        ..NodeList::default()
    };
    std::fs::write(&path, serde_json::to_vec(&list)?)?;
    let poll = Duration::from_millis(50);
    let mut h = Harness::start(|c| {
        // The flags say a minute; the document will say 1.5 s.
        c.drain_deadline = Duration::from_secs(60);
        c.node_list = Some(Source::File {
            path: path.clone(),
            poll,
        });
    })
    .await?;
    h.wait_readyz(200).await?;
    let redirect = serde_json::json!({"key": "nl", "herald": {"redirect": true}}).to_string();
    let mut client = h.tcp_client(&redirect).await?;
    // The operator changes the drain on the running cluster.
    list.generation = 2;
    list.drain = Some(DrainSettings {
        deadline_ms: 1500,
        close_rate: 0,
    });
    // A new mtime even on a coarse-grained filesystem clock.
    tokio::time::sleep(Duration::from_millis(20)).await;
    std::fs::write(&path, serde_json::to_vec(&list)?)?;
    tokio::time::sleep(poll * 6).await;

    let started = std::time::Instant::now();
    let _ = h.stop.take().context("stop")?.send(());
    let frames = closed(&mut client).await?;
    let comet = h.comet.take().context("comet")?;
    timeout(Duration::from_secs(10), comet)
        .await
        .context("run did not return within the document's deadline")???;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the flag's minute was used"
    );
    assert_eq!(frames.len(), 1, "one op 18 before EOF: {frames:?}");
    let body: serde_json::Value = serde_json::from_slice(&frames[0].body)?;
    assert_eq!(body["nodes"], serde_json::json!(["127.0.0.2"]), "{body}");
    // The closes are paced already: each redirected client gets the same
    // 2 s as under the operator's Drain to connect elsewhere first.
    assert_eq!(body["reconnect_within_ms"], 2000, "{body}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test]
async fn shutdown_waits_for_a_running_drain_within_the_deadline() -> Result {
    let deadline = Duration::from_millis(600);
    let mut h = Harness::start(|c| c.drain_deadline = deadline).await?;
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(h.tcp_client(&token(&format!("w{i}"), "", &[])).await?);
    }
    let mut admin = h.admin_client().await?;
    // An RPC drain far slower than the shutdown deadline.
    let reply = admin
        .drain(DrainRequest {
            deadline_ms: 60_000,
            close_rate: 1,
            ..DrainRequest::default()
        })
        .await?
        .into_inner();
    assert!(reply.started);
    let started = std::time::Instant::now();
    let _ = h.stop.take().context("stop")?.send(());
    let comet = h.comet.take().context("comet")?;
    timeout(WAIT, comet)
        .await
        .context("run did not return")???;
    let took = started.elapsed();
    // It waited for the running drain, but only until its own deadline.
    assert!(took >= Duration::from_millis(400), "did not wait: {took:?}");
    assert!(
        took < Duration::from_millis(3000),
        "waited too long: {took:?}"
    );
    for c in &mut clients {
        closed(c).await?;
    }
    for i in 0..3 {
        assert_eq!(h.stub.disconnects(&format!("w{i}")), 1);
    }
    Ok(())
}

#[tokio::test]
async fn a_cancelled_drain_accepts_clients_again() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(h.tcp_client(&token(&format!("c{i}"), "", &[])).await?);
    }
    let mut admin = h.admin_client().await?;
    // Nothing to cancel yet.
    let reply = admin
        .cancel_drain(CancelDrainRequest {})
        .await?
        .into_inner();
    assert!(!reply.cancelled);

    // One close a second: the first goes at once, the next a second later.
    let slow = DrainRequest {
        deadline_ms: 60_000,
        close_rate: 1,
        ..DrainRequest::default()
    };
    assert!(admin.drain(slow.clone()).await?.into_inner().started);
    h.logic_saw("the first Disconnect", |_| {
        (0..3).any(|i| h.stub.disconnects(&format!("c{i}")) == 1)
    })
    .await?;
    h.wait_readyz(503).await?;
    let reply = admin
        .cancel_drain(CancelDrainRequest {})
        .await?
        .into_inner();
    assert!(reply.cancelled);
    assert_eq!(reply.connections, 2);
    assert!(!admin.load(LoadRequest {}).await?.into_inner().draining);
    h.wait_readyz(200).await?;

    // New clients are accepted again...
    let mut late = h.tcp_client(&token("late", "", &[])).await?;
    late.send_raw(hex(T3)).await?;
    assert_eq!(late.next_message().await?.op, op::HEARTBEAT_REPLY);
    // ...and the drain closes no more: past the next close's time (1 s),
    // the two left still answer.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut open = 0;
    for c in &mut clients {
        if c.send_raw(hex(T3)).await.is_ok()
            && c.next_message()
                .await
                .is_ok_and(|f| f.op == op::HEARTBEAT_REPLY)
        {
            open += 1;
        }
    }
    assert_eq!(open, 2, "only the first client was closed");

    // A later drain starts afresh, and shutdown waits for it as usual.
    let fast = DrainRequest {
        deadline_ms: 2000,
        ..DrainRequest::default()
    };
    assert!(admin.drain(fast).await?.into_inner().started);
    closed(&mut late).await?;
    h.shutdown().await
}

#[tokio::test]
async fn readyz_waits_for_logic() -> Result {
    // A logic address nobody listens on.
    let closed = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let mut config = Config::new("comet-test", closed.to_string());
    config.renew_online_interval = Duration::from_secs(3600);
    let mut h = Harness::start_comet(config, stub()).await?;
    for _ in 0..3 {
        let readyz = http::get(h.http, "/readyz").await?;
        assert_eq!(readyz.status, 503, "{readyz:?}");
        let healthz = http::get(h.http, "/healthz").await?;
        assert_eq!(healthz.status, 200, "{healthz:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.shutdown().await?;

    let mut h = Harness::start(|_| {}).await?;
    h.wait_readyz(200).await?;
    h.shutdown().await
}

#[tokio::test]
async fn admin_http_serves_health_and_metrics() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let healthz = http::get(h.http, "/healthz").await?;
    assert_eq!(healthz.status, 200, "{healthz:?}");
    assert_eq!(healthz.body, "ok");
    h.wait_readyz(200).await?;

    let mut c = h.tcp_client(&token("m", "r", &[1000])).await?;
    c.send_raw(hex(T3)).await?;
    c.next_message().await?;
    let mut refused = connect_tcp(h.tcp).await?;
    refused.send(auth_frame(r#"{"fail":true}"#)).await?;
    closed(&mut refused).await?;
    let mut grpc = h.comet_client().await?;
    grpc.broadcast_room(BroadcastRoomReq {
        room_id: "r".into(),
        proto: Some(raw_push(1000, b"x")),
    })
    .await?;
    c.next_message().await?;

    let metrics = http::get(h.http, "/metrics").await?;
    assert_eq!(metrics.status, 200, "{metrics:?}");
    let body = metrics.body;
    for line in [
        r#"herald_comet_connections{transport="tcp"} 1"#,
        r#"herald_comet_auth_total{outcome="ok"} 1"#,
        r#"herald_comet_auth_total{outcome="refused"} 1"#,
        r#"herald_comet_frames_in_total{transport="tcp"} 1"#,
        r#"herald_comet_pushes_total{rpc="broadcast_room"} 1"#,
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "missing {line:?} in\n{body}"
        );
    }
    h.shutdown().await
}

/// Thousands of clients closing at once: comet queues their `Disconnect`s
/// (at most `logic_max_in_flight` in flight) and every one reaches logic.
/// Unbounded, a mass close sent every `Disconnect` at once and those logic
/// could not answer within the deadline were lost (216 of 2,000 arrived
/// here), leaving their routes in Redis until the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mass_close_disconnects_every_connection() -> Result {
    const N: usize = 2_000;
    // Logic serves 1,000 Disconnects a second: the burst takes it 2 s, four
    // times the calls' deadline, so only calls queued in comet (not sent)
    // can wait that long.
    let logic = stub().disconnect_cost(Duration::from_millis(1));
    let h = Harness::start_with(logic, |config| {
        config.logic_max_in_flight = 64;
        config.logic_timeout = Duration::from_millis(500);
    })
    .await?;
    let mut clients = Vec::with_capacity(N);
    let tokens: Vec<String> = (0..N)
        .map(|i| token(&format!("mass{i}"), "", &[]))
        .collect();
    for chunk in tokens.chunks(250) {
        let opened =
            futures::future::try_join_all(chunk.iter().map(|token| h.tcp_client(token))).await?;
        clients.extend(opened);
    }
    drop(clients);
    let disconnects = |events: &[Event]| {
        events
            .iter()
            .filter(|e| matches!(e, Event::Disconnect { key, .. } if key.starts_with("mass")))
            .count()
    };
    let start = std::time::Instant::now();
    timeout(Duration::from_secs(30), async {
        while disconnects(&h.stub.events()) < N {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .with_context(|| {
        format!(
            "logic saw {} of {N} Disconnects",
            disconnects(&h.stub.events())
        )
    })?;
    eprintln!("{N} Disconnects in {:?}", start.elapsed());
    assert_eq!(
        h.metric(r#"herald_comet_logic_call_failures_total{rpc="disconnect"}"#)
            .await?,
        0.0
    );
    Ok(())
}
