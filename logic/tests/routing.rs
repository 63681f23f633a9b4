//! gRPC `goim.logic.Logic` against the real Redis: routing entries (docs/protocol.md §9),
//! Disconnect's reconnect-race fix, Heartbeat recreation, `ol_` shards and
//! the cluster-wide count aggregation.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use herald_protocol::cityhash::city_hash32;
use herald_protocol::pb::goim::logic::{DisconnectReq, HeartbeatReq, NodesReq, OnlineReq};
use herald_protocol::pb::{ConnectReq, LogicClient};
use prost::Message;
use redis::AsyncCommands;
use tonic::Code;
use tonic::transport::Channel;

async fn connect(
    client: &mut LogicClient<Channel>,
    server: &str,
    token: &str,
) -> herald_protocol::pb::ConnectReply {
    client
        .connect(ConnectReq {
            server: server.to_owned(),
            cookie: String::new(),
            token: token.as_bytes().to_vec().into(),
        })
        .await
        .expect("connect")
        .into_inner()
}

#[tokio::test]
async fn connect_writes_exactly_the_goim_routes_with_ttl() {
    let mut r = redis().await;
    let _: () = r.del(&["mid_123", "key_k1"]).await.unwrap();
    let logic = Logic::start(config(&unique("unused"))).await;
    let mut client = logic.grpc().await;

    let reply = connect(
        &mut client,
        "comet-01",
        r#"{"mid":123,"key":"k1","room_id":"live://1000","platform":"web","accepts":[1000,1001,1002],"x":1}"#,
    )
    .await;
    // T13: the reply encodes exactly as goim's.
    let hex: Vec<String> = reply
        .encode_to_vec()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        hex.join(" "),
        "08 7b 12 02 6b 31 1a 0b 6c 69 76 65 3a 2f 2f 31 30 30 30 22 06 e8 07 e9 07 ea 07 28 80 80 eb 91 fc 0d"
    );

    let mid: HashMap<String, String> = r.hgetall("mid_123").await.unwrap();
    assert_eq!(
        mid,
        HashMap::from([("k1".to_owned(), "comet-01".to_owned())])
    );
    let key: String = r.get("key_k1").await.unwrap();
    assert_eq!(key, "comet-01");
    for name in ["mid_123", "key_k1"] {
        let ttl: i64 = r.ttl(name).await.unwrap();
        assert!(ttl > 0 && ttl <= 600, "{name} ttl {ttl}");
    }
    let _: () = r.del(&["mid_123", "key_k1"]).await.unwrap();
    logic.stop().await;
}

/// With a shared gRPC token set, a comet's `Connect` without it or with
/// another is refused (`Unauthenticated`, counted by reason, no route
/// written); with it, the route is written. `/metrics` needs no token.
#[tokio::test]
async fn connect_wants_the_shared_grpc_token_when_one_is_set() {
    use herald_runtime::grpc_auth::{self, TokenSource};

    let mut r = redis().await;
    let key = unique("k-grpc-token");
    let token = format!(r#"{{"mid":124,"key":"{key}","room_id":"live://1000"}}"#);
    let mut config = config(&unique("unused"));
    config.grpc_token = TokenSource::literal("logic-grpc-token");
    let logic = Logic::start(config).await;
    let request = || ConnectReq {
        server: "comet-01".to_owned(),
        cookie: String::new(),
        token: token.as_bytes().to_vec().into(),
    };
    let refusals = |reason: &str| {
        let series = format!("herald_logic_grpc_auth_refusals_total{{reason=\"{reason}\"}}");
        async move { sample(&get_text(logic.http, "/metrics").await.1, &series) }
    };

    let refused = logic.grpc().await.connect(request()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(grpc_auth::is_refusal(&refused), "{refused:?}");
    let channel = Channel::from_shared(format!("http://{}", logic.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let wrong = TokenSource::literal("another-token").start().unwrap();
    let refused = LogicClient::new(wrong.channel(channel.clone()))
        .connect(request())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(
        !refused.message().contains("logic-grpc-token"),
        "{refused:?}"
    );
    assert_eq!(refusals("missing").await, Some(1.0));
    assert_eq!(refusals("wrong").await, Some(1.0));
    let routed: Option<String> = r.get(format!("key_{key}")).await.unwrap();
    assert_eq!(routed, None, "a refused call writes no route");

    let right = TokenSource::literal("logic-grpc-token").start().unwrap();
    let reply = LogicClient::new(right.channel(channel))
        .connect(request())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.key, key);
    let routed: String = r.get(format!("key_{key}")).await.unwrap();
    assert_eq!(routed, "comet-01");
    assert_eq!(refusals("missing").await, Some(1.0), "nothing more refused");
    let _: () = r
        .del(&["mid_124".to_owned(), format!("key_{key}")])
        .await
        .unwrap();
    logic.stop().await;
}

#[tokio::test]
async fn connect_invents_a_uuid_key_and_rejects_non_json() {
    let logic = Logic::start(config(&unique("unused"))).await;
    let mut client = logic.grpc().await;
    let server = unique("comet");
    let reply = connect(&mut client, &server, r#"{"mid":0,"room_id":""}"#).await;
    assert_eq!(
        uuid::Uuid::parse_str(&reply.key).unwrap().get_version_num(),
        4
    );
    let mut r = redis().await;
    let stored: String = r.get(format!("key_{}", reply.key)).await.unwrap();
    assert_eq!(stored, server);

    let err = client
        .connect(ConnectReq {
            server: server.clone(),
            cookie: String::new(),
            token: b"not json".to_vec().into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    logic.stop().await;
}

#[tokio::test]
async fn jwt_mode_accepts_signed_tokens_only() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let mut cfg = config(&unique("unused"));
    cfg.token_mode = herald_logic::TokenMode::Jwt;
    cfg.jwt_secret = Some("s3cret".into());
    let logic = Logic::start(cfg).await;
    let mut client = logic.grpc().await;
    let key = unique("jwt");
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 60;
    let token = encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({"mid": 5, "key": key, "accepts": [1], "exp": exp}),
        &EncodingKey::from_secret(b"s3cret"),
    )
    .unwrap();
    let reply = connect(&mut client, "c", &token).await;
    assert_eq!((reply.mid, reply.key.as_str()), (5, key.as_str()));
    assert!(!reply.herald_redirect, "no herald claim, no redirect");
    // The op-18 opt-in travels as a claim; logic hands it to comet, which
    // cannot read a JWT itself.
    let asking = encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({"mid": 5, "key": key, "exp": exp, "herald": {"redirect": true}}),
        &EncodingKey::from_secret(b"s3cret"),
    )
    .unwrap();
    assert!(connect(&mut client, "c", &asking).await.herald_redirect);
    let err = client
        .connect(ConnectReq {
            server: "c".to_owned(),
            cookie: String::new(),
            token: format!(r#"{{"mid":5,"key":"{key}"}}"#).into_bytes().into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    logic.stop().await;
}

#[tokio::test]
async fn rs256_tokens_are_verified_with_the_configured_public_key() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut cfg = config(&unique("unused"));
    cfg.token_mode = herald_logic::TokenMode::Jwt;
    cfg.jwt_public_key = Some(fixtures.join("jwt-test-rs256.pub"));
    cfg.jwt_checks.audience = Some("chat".to_owned());
    let logic = Logic::start(cfg).await;
    let mut client = logic.grpc().await;
    let key = unique("rs");
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 60;
    let claims = serde_json::json!({"mid": 6, "key": key, "exp": exp, "aud": "chat"});
    let sign = |file: &str| {
        let pem = std::fs::read(fixtures.join(file)).unwrap();
        encode(
            &Header::new(Algorithm::RS256),
            &claims,
            &EncodingKey::from_rsa_pem(&pem).unwrap(),
        )
        .unwrap()
    };
    let reply = connect(&mut client, "c", &sign("jwt-test-rs256.key")).await;
    assert_eq!((reply.mid, reply.key.as_str()), (6, key.as_str()));
    let err = client
        .connect(ConnectReq {
            server: "c".to_owned(),
            cookie: String::new(),
            token: sign("jwt-other-rs256.key").into_bytes().into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    logic.stop().await;
}

#[tokio::test]
async fn disconnect_from_a_stale_server_keeps_the_new_route() {
    let logic = Logic::start(config(&unique("unused"))).await;
    let mut client = logic.grpc().await;
    let mid = unique_mid();
    let key = unique("k");
    let token = format!(r#"{{"mid":{mid},"key":"{key}"}}"#);
    connect(&mut client, "comet-old", &token).await;
    connect(&mut client, "comet-new", &token).await;

    let has = client
        .disconnect(DisconnectReq {
            mid,
            key: key.clone(),
            server: "comet-old".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .has;
    assert!(!has);
    let mut r = redis().await;
    let stored: String = r.get(format!("key_{key}")).await.unwrap();
    assert_eq!(stored, "comet-new");
    let field: String = r.hget(format!("mid_{mid}"), &key).await.unwrap();
    assert_eq!(field, "comet-new");

    let has = client
        .disconnect(DisconnectReq {
            mid,
            key: key.clone(),
            server: "comet-new".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .has;
    assert!(has);
    let exists: bool = r.exists(format!("key_{key}")).await.unwrap();
    assert!(!exists);
    let field: Option<String> = r.hget(format!("mid_{mid}"), &key).await.unwrap();
    assert_eq!(field, None);
    logic.stop().await;
}

#[tokio::test]
async fn heartbeat_refreshes_and_recreates_deleted_routes() {
    let logic = Logic::start(config(&unique("unused"))).await;
    let mut client = logic.grpc().await;
    let mid = unique_mid();
    let key = unique("k");
    connect(
        &mut client,
        "comet-h",
        &format!(r#"{{"mid":{mid},"key":"{key}"}}"#),
    )
    .await;
    let mut r = redis().await;
    let _: () = r.expire(format!("key_{key}"), 5).await.unwrap();
    let _: () = r.del(format!("mid_{mid}")).await.unwrap();

    client
        .heartbeat(HeartbeatReq {
            mid,
            key: key.clone(),
            server: "comet-h".to_owned(),
        })
        .await
        .unwrap();
    let ttl: i64 = r.ttl(format!("key_{key}")).await.unwrap();
    assert!(ttl > 5 && ttl <= 600, "key ttl {ttl}");
    let field: String = r.hget(format!("mid_{mid}"), &key).await.unwrap();
    assert_eq!(field, "comet-h");

    let _: () = r.del(format!("key_{key}")).await.unwrap();
    client
        .heartbeat(HeartbeatReq {
            mid,
            key: key.clone(),
            server: "comet-h".to_owned(),
        })
        .await
        .unwrap();
    let stored: String = r.get(format!("key_{key}")).await.unwrap();
    assert_eq!(stored, "comet-h");
    let ttl: i64 = r.ttl(format!("mid_{mid}")).await.unwrap();
    assert!(ttl > 0 && ttl <= 600, "mid ttl {ttl}");
    logic.stop().await;
}

#[tokio::test]
async fn renew_online_writes_cityhash_shards_and_clears_empty_ones() {
    let logic = Logic::start(config(&unique("unused"))).await;
    let mut client = logic.grpc().await;
    let server = unique("comet-ol");
    let ol = format!("ol_{server}");
    let mut r = redis().await;

    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let reply = client
        .renew_online(OnlineReq {
            server: server.clone(),
            room_count: HashMap::from([
                ("live://1000".to_owned(), 3),
                ("live://1001".to_owned(), 1),
            ]),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.all_room_count["live://1000"] >= 3);

    let shards: HashMap<String, String> = r.hgetall(&ol).await.unwrap();
    // T14: live://1000 → shard 43, live://1001 → shard 7.
    let mut fields: Vec<&str> = shards.keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(fields, vec!["43", "7"]);
    assert_eq!(city_hash32(b"live://1000") % 64, 43);
    let raw = &shards["43"];
    assert!(
        raw.starts_with(&format!(
            r#"{{"server":"{server}","room_count":{{"live://1000":3}},"updated":"#
        )),
        "{raw}"
    );
    let v: serde_json::Value = serde_json::from_str(raw).unwrap();
    let updated = v["updated"].as_i64().unwrap();
    assert!((before..before + 30).contains(&updated));
    let ttl: i64 = r.ttl(&ol).await.unwrap();
    assert!(ttl > 0 && ttl <= 600);

    // live://1001 left: its shard disappears.
    client
        .renew_online(OnlineReq {
            server: server.clone(),
            room_count: HashMap::from([("live://1000".to_owned(), 2)]),
        })
        .await
        .unwrap();
    let shards: HashMap<String, String> = r.hgetall(&ol).await.unwrap();
    assert_eq!(shards.keys().collect::<Vec<_>>(), vec!["43"]);
    assert!(shards["43"].contains(r#""live://1000":2"#));

    // No rooms at all: the key goes.
    client
        .renew_online(OnlineReq {
            server: server.clone(),
            room_count: HashMap::new(),
        })
        .await
        .unwrap();
    let exists: bool = r.exists(&ol).await.unwrap();
    assert!(!exists);
    logic.stop().await;
}

#[tokio::test]
async fn room_counts_aggregate_across_comets_and_logic_replicas() {
    let mut cfg = config(&unique("unused"));
    cfg.online_interval = Duration::from_millis(200);
    let a = Logic::start(cfg.clone()).await;
    let b = Logic::start(cfg).await;
    let mut ca = a.grpc().await;
    let cb = b.grpc().await;
    let typ = unique("agg");
    let room = format!("{typ}://r1");
    let other = format!("{typ}://r2");

    ca.renew_online(OnlineReq {
        server: unique("comet-a"),
        room_count: HashMap::from([(room.clone(), 2), (other.clone(), 1)]),
    })
    .await
    .unwrap();
    // Logic B learns comet A's counts from Redis within an aggregation tick,
    // and merges comet B's fresh counts into its answer.
    let server_b = unique("comet-b");
    eventually("cluster-wide count on replica b", || {
        let mut cb = cb.clone();
        let (room, server_b) = (room.clone(), server_b.clone());
        async move {
            let all = cb
                .renew_online(OnlineReq {
                    server: server_b,
                    room_count: HashMap::from([(room.clone(), 5)]),
                })
                .await
                .ok()?
                .into_inner()
                .all_room_count;
            (all.get(&room) == Some(&7)).then_some(())
        }
    })
    .await;

    // The HTTP online views read the same aggregation.
    let top = eventually("online/top on replica a", || {
        let typ = typ.clone();
        async move {
            let ans = http(
                a.http,
                "GET",
                &format!("/goim/online/top?type={typ}&limit=10"),
                b"",
                None,
            )
            .await;
            let data = ans.body["data"].clone();
            (data[0]["count"] == 7 && data.as_array().map(Vec::len) == Some(2)).then_some(data)
        }
    })
    .await;
    assert_eq!(
        top,
        serde_json::json!([{"room_id": "r1", "count": 7}, {"room_id": "r2", "count": 1}])
    );
    // Exact type match: `agg…x` is not a prefix match of `agg…`.
    let ans = http(
        a.http,
        "GET",
        &format!("/goim/online/top?type={}&limit=10", &typ[..typ.len() - 1]),
        b"",
        None,
    )
    .await;
    assert_eq!(ans.body["data"], serde_json::json!([]));
    let ans = http(
        a.http,
        "GET",
        &format!("/goim/online/room?type={typ}&rooms=r1&rooms=nope"),
        b"",
        None,
    )
    .await;
    assert_eq!(ans.status, 200);
    assert_eq!(ans.body["data"], serde_json::json!({"r1": 7, "nope": 0}));
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn redis_down_fails_fast_with_unavailable() {
    let mut cfg = config(&unique("unused"));
    cfg.redis.url = format!("redis://127.0.0.1:{}/", closed_port().await);
    let logic = Logic::start(cfg).await;
    let mut client = logic.grpc().await;
    let started = std::time::Instant::now();
    let err = client
        .connect(ConnectReq {
            server: "c".to_owned(),
            cookie: String::new(),
            token: br#"{"mid":1,"key":"k"}"#.to_vec().into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // Nodes needs no backend and still answers.
    let nodes = client
        .nodes(NodesReq {
            platform: "web".to_owned(),
            client_ip: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(nodes.nodes.is_empty());
    assert_eq!((nodes.heartbeat, nodes.heartbeat_max), (240, 2));
    logic.stop().await;
}

#[tokio::test]
async fn stale_online_entries_are_ignored_and_deleted() {
    let mut cfg = config(&unique("unused"));
    cfg.online_interval = Duration::from_millis(100);
    let typ = unique("stale");
    let room = format!("{typ}://1");
    let stale_server = unique("comet-stale");
    let fresh_server = unique("comet-fresh");
    let mut r = redis().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let shard = (city_hash32(room.as_bytes()) % 64).to_string();
    // Written as another (goim) logic would: six minutes old, and fresh.
    for (server, updated, n) in [(&stale_server, now - 360, 40), (&fresh_server, now, 2)] {
        let json =
            serde_json::json!({"server": server, "room_count": {&room: n}, "updated": updated});
        let _: () = r
            .hset(format!("ol_{server}"), &shard, json.to_string())
            .await
            .unwrap();
        let _: () = r.expire(format!("ol_{server}"), 600).await.unwrap();
    }
    let logic = Logic::start(cfg).await;
    eventually("stale ol_ key deleted", || {
        let mut r = r.clone();
        let key = format!("ol_{stale_server}");
        async move { (!r.exists::<_, bool>(&key).await.ok()?).then_some(()) }
    })
    .await;
    let ans = eventually("fresh count only", || {
        let typ = typ.clone();
        let addr = logic.http;
        async move {
            let ans = http(
                addr,
                "GET",
                &format!("/goim/online/room?type={typ}&rooms=1"),
                b"",
                None,
            )
            .await;
            (ans.body["data"]["1"] == 2).then_some(ans)
        }
    })
    .await;
    assert_eq!(ans.body["data"], serde_json::json!({"1": 2}));
    let fresh: bool = r.exists(format!("ol_{fresh_server}")).await.unwrap();
    assert!(fresh);
    let _: () = r.del(format!("ol_{fresh_server}")).await.unwrap();
    logic.stop().await;
}

#[tokio::test]
async fn renew_online_accepts_gzip_like_goim_comets() {
    let logic = Logic::start(config(&unique("unused"))).await;
    let mut client = logic
        .grpc()
        .await
        .send_compressed(tonic::codec::CompressionEncoding::Gzip);
    let server = unique("comet-gz");
    let room = format!("{}://1", unique("gz"));
    let reply = client
        .renew_online(OnlineReq {
            server: server.clone(),
            room_count: HashMap::from([(room.clone(), 4)]),
        })
        .await
        .expect("gzip RenewOnline")
        .into_inner();
    assert_eq!(reply.all_room_count.get(&room), Some(&4));
    let mut r = redis().await;
    let _: () = r.del(format!("ol_{server}")).await.unwrap();
    logic.stop().await;
}
