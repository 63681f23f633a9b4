//! The docs/protocol.md §7 HTTP API end to end: each push route's exact Kafka record (value
//! bytes and record key), the envelope and status of every bad input, API
//! key, body limit, compat-200 mode, backend outages, and the node list.

mod common;

use std::time::Duration;

use common::*;
use herald_protocol::pb::{ConnectReq, PushMsg, push_msg};
use prost::Message;
use serde_json::json;

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

async fn connect(logic: &Logic, server: &str, mid: i64, key: &str) {
    logic
        .grpc()
        .await
        .connect(ConnectReq {
            server: server.to_owned(),
            cookie: String::new(),
            token: format!(r#"{{"mid":{mid},"key":"{key}"}}"#)
                .into_bytes()
                .into(),
        })
        .await
        .expect("connect");
}

/// A successful push: goim's envelope plus Herald's message id.
fn assert_ok(ans: &Answer) {
    assert_eq!(ans.status, 200, "{ans:?}");
    assert_eq!(ans.body["code"], 0, "{ans:?}");
    assert_eq!(ans.body["message"], "", "{ans:?}");
    assert!(ans.body["data"]["records"].is_array(), "{ans:?}");
}

#[tokio::test]
async fn push_room_and_all_produce_t12_records() {
    let topic = unique("push-room");
    create_topic(&topic).await;
    let consumer = consumer(&topic);
    let logic = Logic::start(config(&topic)).await;

    let ans = http(
        logic.http,
        "POST",
        "/goim/push/room?operation=1000&type=live&room=1000",
        b"hello",
        None,
    )
    .await;
    assert_ok(&ans);
    let ans = http(
        logic.http,
        "POST",
        "/goim/push/all?operation=1000&speed=100",
        b"x",
        None,
    )
    .await;
    assert_ok(&ans);

    let records = consume(&consumer, 2).await;
    assert_eq!(records[0].0, "live://1000");
    assert_eq!(
        hex(&records[0].1),
        "08 01 10 e8 07 2a 0b 6c 69 76 65 3a 2f 2f 31 30 30 30 3a 05 68 65 6c 6c 6f"
    );
    assert_eq!(records[1].0, "1000");
    assert_eq!(hex(&records[1].1), "08 02 10 e8 07 18 64 3a 01 78");
    logic.stop().await;
}

#[tokio::test]
async fn push_keys_and_mids_produce_one_record_per_comet() {
    let topic = unique("push-keys");
    create_topic(&topic).await;
    let consumer = consumer(&topic);
    let logic = Logic::start(config(&topic)).await;
    let (cx, cy) = (unique("comet-x"), unique("comet-y"));
    let (k1, k2, k3) = (unique("k1"), unique("k2"), unique("k3"));
    let mid = unique_mid();
    connect(&logic, &cx, mid, &k1).await;
    connect(&logic, &cx, mid, &k2).await;
    connect(&logic, &cy, 0, &k3).await;

    // Binary body, delivered byte for byte; an unknown key is skipped.
    let body = [0u8, 1, 2, 0xff, b'h'];
    let ans = http(
        logic.http,
        "POST",
        &format!("/goim/push/keys?operation=0&keys={k1}&keys=unknown-key&keys={k3}&keys={k2}"),
        &body,
        None,
    )
    .await;
    assert_ok(&ans);
    let mut records = consume(&consumer, 2).await;
    records.sort_by(|a, b| a.1.cmp(&b.1));
    let mut expected: Vec<(String, Vec<u8>)> = [
        (cx.clone(), vec![k1.clone(), k2.clone()]),
        (cy.clone(), vec![k3.clone()]),
    ]
    .into_iter()
    .map(|(server, keys)| {
        let msg = PushMsg {
            r#type: push_msg::Type::Push as i32,
            operation: 0,
            server,
            keys: keys.clone(),
            msg: body.to_vec().into(),
            ..PushMsg::default()
        };
        (keys[0].clone(), msg.encode_to_vec())
    })
    .collect();
    expected.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(records, expected);

    // mids expand to every key of the mid (both on comet x).
    let ans = http(
        logic.http,
        "POST",
        &format!("/goim/push/mids?operation=1000&mids={mid}"),
        b"m",
        None,
    )
    .await;
    assert_ok(&ans);
    let records = consume(&consumer, 1).await;
    let msg = PushMsg::decode(records[0].1.as_slice()).unwrap();
    assert_eq!(msg.server, cx);
    let mut keys = msg.keys.clone();
    keys.sort();
    let mut want = vec![k1.clone(), k2.clone()];
    want.sort();
    assert_eq!(keys, want);
    assert_eq!((msg.operation, &msg.msg[..]), (1000, &b"m"[..]));
    assert_eq!(records[0].0, msg.keys[0]);

    // Only unknown keys, and no mids at all: success, nothing produced.
    let ans = http(
        logic.http,
        "POST",
        "/goim/push/keys?operation=1&keys=nobody-here",
        b"z",
        None,
    )
    .await;
    assert_ok(&ans);
    let ans = http(
        logic.http,
        "POST",
        "/goim/push/mids?operation=1",
        b"z",
        None,
    )
    .await;
    assert_ok(&ans);
    assert_no_more(&consumer, Duration::from_secs(2)).await;
    logic.stop().await;
}

#[tokio::test]
async fn bad_input_gets_400_envelopes_and_compat_mode_200() {
    let mut cfg = config(&unique("unused"));
    cfg.http.max_keys = 3;
    cfg.http.max_body = 16;
    let logic = Logic::start(cfg.clone()).await;
    cfg.http.compat_status_200 = true;
    let compat = Logic::start(cfg).await;

    let cases: &[(&str, &str, &[u8], u16, i32)] = &[
        ("POST", "/goim/push/keys?operation=1", b"x", 400, -400),
        (
            "POST",
            "/goim/push/keys?operation=abc&keys=a",
            b"x",
            400,
            -400,
        ),
        (
            "POST",
            "/goim/push/keys?operation=1&keys=a&keys=b&keys=c&keys=d",
            b"x",
            400,
            -400,
        ),
        (
            "POST",
            "/goim/push/mids?operation=1&mids=abc",
            b"x",
            400,
            -400,
        ),
        (
            "POST",
            "/goim/push/room?operation=1&room=1",
            b"x",
            400,
            -400,
        ),
        (
            "POST",
            "/goim/push/room?operation=1&type=live",
            b"x",
            400,
            -400,
        ),
        (
            "POST",
            "/goim/push/room?operation=0&type=live&room=1",
            b"x",
            400,
            -400,
        ),
        ("POST", "/goim/push/room?type=live&room=1", b"x", 400, -400),
        ("POST", "/goim/push/all", b"x", 400, -400),
        (
            "POST",
            "/goim/push/all?operation=1&speed=fast",
            b"x",
            400,
            -400,
        ),
        ("GET", "/goim/online/top?type=live", b"", 400, -400),
        ("GET", "/goim/online/top?type=live&limit=0", b"", 400, -400),
        ("GET", "/goim/online/top?limit=5", b"", 400, -400),
        ("GET", "/goim/online/room?type=live", b"", 400, -400),
        (
            "POST",
            "/goim/push/room?operation=1&type=live&room=1",
            &[b'a'; 17],
            413,
            -413,
        ),
    ];
    for &(method, path, body, status, code) in cases {
        let ans = http(logic.http, method, path, body, None).await;
        assert_eq!(ans.status, status, "{method} {path}: {ans:?}");
        assert_eq!(ans.body["code"], code, "{method} {path}: {ans:?}");
        assert!(
            ans.body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{ans:?}"
        );
        assert!(ans.body.get("data").is_none(), "{ans:?}");
        let ans = http(compat.http, method, path, body, None).await;
        assert_eq!(ans.status, 200, "compat {method} {path}: {ans:?}");
        assert_eq!(ans.body["code"], code, "compat {method} {path}: {ans:?}");
    }
    logic.stop().await;
    compat.stop().await;
}

/// The per-connection limits shared with the comet: reserved ops are never
/// pushed, a room no client can join is never pushed to, and `Connect`
/// refuses a token naming such a room or too many ops.
#[tokio::test]
async fn reserved_ops_and_rooms_past_the_limit_are_refused() {
    use herald_protocol::limits::{MAX_ACCEPTED_OPS, MAX_ROOM_ID_BYTES};

    let topic = unique("limits");
    create_topic(&topic).await;
    let logic = Logic::start(config(&topic)).await;
    // `type://` plus the id: exactly at the limit, and one byte past it.
    let fits = "r".repeat(MAX_ROOM_ID_BYTES - "live://".len());
    let long = format!("{fits}r");
    for path in [
        "/goim/push/keys?operation=10&keys=a".to_owned(),
        "/goim/push/mids?operation=11&mids=1".to_owned(),
        "/goim/push/room?operation=18&type=live&room=1".to_owned(),
        "/goim/push/all?operation=31".to_owned(),
        format!("/goim/push/room?operation=1000&type=live&room={long}"),
    ] {
        let ans = http(logic.http, "POST", &path, b"x", None).await;
        assert_eq!(
            (ans.status, &ans.body["code"]),
            (400, &json!(-400)),
            "{path}: {ans:?}"
        );
        assert!(
            ans.body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{ans:?}"
        );
    }
    for path in [
        format!("/goim/push/room?operation=1000&type=live&room={fits}"),
        "/goim/push/all?operation=32".to_owned(),
        "/goim/push/keys?operation=17&keys=a".to_owned(),
    ] {
        assert_ok(&http(logic.http, "POST", &path, b"x", None).await);
    }

    let connect = |token: serde_json::Value| ConnectReq {
        server: "comet-1".to_owned(),
        cookie: String::new(),
        token: token.to_string().into_bytes().into(),
    };
    let mut grpc = logic.grpc().await;
    let accepts: Vec<i32> = (0..).take(MAX_ACCEPTED_OPS + 1).collect();
    for token in [
        json!({"mid": 1, "key": "far", "room_id": format!("live://{long}")}),
        json!({"mid": 1, "key": "many", "accepts": accepts}),
    ] {
        let status = grpc.connect(connect(token)).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    }
    grpc.connect(connect(
        json!({"mid": 1, "key": "ok", "room_id": format!("live://{fits}"), "accepts": [1000]}),
    ))
    .await
    .expect("a token at both limits connects");
    logic.stop().await;
}

#[tokio::test]
async fn api_key_is_required_when_configured() {
    let mut cfg = config(&unique("unused"));
    cfg.http.api_key = Some("secret-key".into());
    let logic = Logic::start(cfg).await;
    for auth in [None, Some("wrong"), Some("secret-ke")] {
        let ans = http(logic.http, "GET", "/goim/online/total", b"", auth).await;
        assert_eq!(ans.status, 401, "{auth:?}");
        assert_eq!(ans.body["code"], -401);
        let ans = http(logic.http, "POST", "/goim/push/all?operation=1", b"x", auth).await;
        assert_eq!(ans.status, 401, "{auth:?}");
    }
    let ans = http(
        logic.http,
        "GET",
        "/goim/online/total",
        b"",
        Some("secret-key"),
    )
    .await;
    assert_eq!(ans.status, 200);
    assert_eq!(
        ans.body,
        json!({"code": 0, "message": "", "data": {"conn_count": 0, "ip_count": 0}})
    );
    // The scheme is case-insensitive, as HTTP says; another scheme is not
    // the key.
    for (value, status) in [
        ("bearer secret-key", 200),
        ("BEARER  secret-key", 200),
        ("Basic secret-key", 401),
    ] {
        let (got, _, _) = common::send_with(
            logic.http,
            "GET",
            "/goim/online/total",
            b"",
            &[("authorization", value.to_owned())],
        )
        .await;
        assert_eq!(got, status, "{value}");
    }
    logic.stop().await;
}

#[tokio::test]
async fn redis_down_answers_503_quickly() {
    let mut cfg = config(&unique("unused"));
    cfg.redis.url = format!("redis://127.0.0.1:{}/", closed_port().await);
    let logic = Logic::start(cfg).await;
    for path in [
        "/goim/push/keys?operation=1&keys=a",
        "/goim/push/mids?operation=1&mids=1",
    ] {
        let started = std::time::Instant::now();
        let ans = http(logic.http, "POST", path, b"x", None).await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{path} took {:?}",
            started.elapsed()
        );
        assert_eq!(ans.status, 503, "{path}: {ans:?}");
        assert_eq!(ans.body["code"], -500);
        assert_eq!(
            ans.headers.get("retry-after").map(|v| v.as_bytes()),
            Some(&b"1"[..])
        );
    }
    logic.stop().await;
}

#[tokio::test]
async fn kafka_down_answers_503_within_the_message_timeout() {
    let mut cfg = config(&unique("unused"));
    cfg.kafka.brokers = format!("127.0.0.1:{}", closed_port().await);
    cfg.kafka.message_timeout = Duration::from_millis(1500);
    let logic = Logic::start(cfg).await;
    let started = std::time::Instant::now();
    let ans = http(
        logic.http,
        "POST",
        "/goim/push/room?operation=1&type=live&room=1",
        b"x",
        None,
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(ans.status, 503, "{ans:?}");
    assert!(ans.headers.contains_key("retry-after"));
    // Not ready while the broker is unreachable.
    assert_eq!(get_text(logic.http, "/readyz").await.0, 503);
    logic.stop().await;
}

fn node_list(generation: i64, draining_b: bool) -> serde_json::Value {
    json!({"generation": generation, "updated": "2026-11-27T10:00:00Z", "nodes": [
        {"name": "comet-a", "grpc": "127.0.0.12:3109", "hosts": ["a.example.com"], "addrs": ["203.0.113.1"],
         "tcp_port": 3101, "ws_port": 3102, "wss_port": 3103, "weight": 10, "connections": 900,
         "client_ips": 800, "draining": false},
        {"name": "comet-b", "grpc": "127.0.0.13:3109", "hosts": ["b.example.com"], "addrs": ["203.0.113.2"],
         "tcp_port": 3101, "ws_port": 3102, "wss_port": 3103, "weight": 10, "connections": 100,
         "client_ips": 90, "draining": draining_b},
        {"name": "comet-c", "grpc": "127.0.0.14:3109", "hosts": ["c.example.com"], "addrs": ["203.0.113.3"],
         "tcp_port": 3101, "ws_port": 3102, "wss_port": 3103, "weight": 100, "connections": 0,
         "client_ips": 0, "draining": true}
    ]})
}

#[tokio::test]
async fn nodes_follow_the_node_list_file_and_skip_draining_comets() {
    let dir = std::env::temp_dir().join(unique("logic-nodes"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("nodes.json");
    std::fs::write(&file, node_list(1, false).to_string()).unwrap();
    let mut cfg = config(&unique("unused"));
    cfg.node_list = Some(herald_runtime::nodes::Source::File {
        path: file.clone(),
        poll: Duration::from_millis(100),
    });
    let logic = Logic::start(cfg).await;

    let ans = http(
        logic.http,
        "GET",
        "/goim/nodes/weighted?platform=web",
        b"",
        None,
    )
    .await;
    assert_eq!(ans.status, 200);
    assert_eq!(
        ans.body["data"],
        json!({"tcp_port": 3101, "ws_port": 3102, "wss_port": 3103, "heartbeat": 240,
               "nodes": ["b.example.com", "a.example.com"],
               "backoff": {"max_delay": 300, "base_delay": 3, "factor": 1.8, "jitter": 0.3},
               "heartbeat_max": 2})
    );
    let ans = http(logic.http, "GET", "/goim/nodes/weighted", b"", None).await;
    assert_eq!(
        ans.body["data"]["nodes"],
        json!(["203.0.113.2", "203.0.113.1"])
    );
    let ans = http(logic.http, "GET", "/goim/online/total", b"", None).await;
    assert_eq!(
        ans.body["data"],
        json!({"conn_count": 1000, "ip_count": 890})
    );
    let ans = http(logic.http, "GET", "/goim/nodes/instances", b"", None).await;
    let instances = ans.body["data"].as_array().unwrap();
    assert_eq!(instances.len(), 3);
    assert_eq!(instances[2]["metadata"]["offline"], "true");
    assert_eq!(instances[0]["addrs"], json!(["grpc://127.0.0.12:3109"]));

    let mut client = logic.grpc().await;
    let reply = client
        .nodes(herald_protocol::pb::goim::logic::NodesReq {
            platform: "web".to_owned(),
            client_ip: "198.51.100.1".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.nodes, vec!["b.example.com", "a.example.com"]);

    // comet-b starts draining: it disappears from answers after a reload.
    std::fs::write(&file, node_list(2, true).to_string()).unwrap();
    eventually("reload with comet-b draining", || async {
        let ans = http(
            logic.http,
            "GET",
            "/goim/nodes/weighted?platform=web",
            b"",
            None,
        )
        .await;
        (ans.body["data"]["nodes"] == json!(["a.example.com"])).then_some(())
    })
    .await;
    // A broken write keeps the previous list; an empty list is not an error.
    std::fs::write(&file, "{not json").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let ans = http(
        logic.http,
        "GET",
        "/goim/nodes/weighted?platform=web",
        b"",
        None,
    )
    .await;
    assert_eq!(ans.body["data"]["nodes"], json!(["a.example.com"]));
    std::fs::write(&file, r#"{"generation":3,"nodes":[]}"#).unwrap();
    eventually("reload with no nodes", || async {
        let ans = http(
            logic.http,
            "GET",
            "/goim/nodes/weighted?platform=web",
            b"",
            None,
        )
        .await;
        (ans.status == 200 && ans.body["data"]["nodes"] == json!([])).then_some(())
    })
    .await;
    logic.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_node_list_file_that_appears_later_is_picked_up() {
    let dir = std::env::temp_dir().join(unique("logic-nodes-late"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("nodes.json");
    let mut cfg = config(&unique("unused"));
    cfg.node_list = Some(herald_runtime::nodes::Source::File {
        path: file.clone(),
        poll: Duration::from_millis(100),
    });
    let logic = Logic::start(cfg).await;
    let ans = http(
        logic.http,
        "GET",
        "/goim/nodes/weighted?platform=web",
        b"",
        None,
    )
    .await;
    assert_eq!((ans.status, &ans.body["data"]["nodes"]), (200, &json!([])));
    std::fs::write(&file, node_list(1, false).to_string()).unwrap();
    eventually("node list loaded", || async {
        let ans = http(logic.http, "GET", "/goim/online/total", b"", None).await;
        (ans.body["data"]["conn_count"] == 1000).then_some(())
    })
    .await;
    logic.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
