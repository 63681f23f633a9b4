//! The client-facing listener (`--client-addr`, docs/protocol.md §7): the node
//! list and room counts without the push API key, nothing else routed there,
//! `--client-auth token` checking a client token like op 7 does, and CORS for
//! browsers. Logic runs on the test bed's Redis and Kafka.

mod common;

use common::*;
use herald_logic::{ClientAuth, TokenMode};
use herald_runtime::nodes::{Node, NodeList, Source};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;

const API_KEY: &str = "push-everyone-key";
const JWT_SECRET: &str = "client-jwt-secret";

fn nodes() -> Source {
    let node = |name: &str, host: &str| Node {
        name: name.to_owned(),
        grpc: "127.0.0.12:3109".to_owned(),
        hosts: vec![host.to_owned()],
        addrs: vec![host.to_owned()],
        tcp_port: 3101,
        ws_port: 3102,
        weight: 10,
        ..Node::default()
    };
    Source::Memory(NodeList {
        generation: 3,
        updated: String::new(),
        nodes: vec![
            node("comet-a", "a.example.com"),
            node("comet-b", "b.example.com"),
        ],
        drain: None,
    })
}

/// Logic with an API key on its push API and the node list above.
async fn start(client_auth: ClientAuth, token_mode: TokenMode) -> Logic {
    let mut cfg = config(&unique("unused"));
    cfg.http.api_key = Some(API_KEY.into());
    cfg.node_list = Some(nodes());
    cfg.client_auth = client_auth;
    cfg.token_mode = token_mode;
    if cfg.token_mode == TokenMode::Jwt {
        cfg.jwt_secret = Some(JWT_SECRET.into());
    }
    Logic::start(cfg).await
}

fn jwt(secret: &str, exp_from_now: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let exp = i64::try_from(now).expect("seconds fit i64") + exp_from_now;
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"mid": 42, "key": "browser-1", "room_id": "live://1000", "exp": exp}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("signing")
}

async fn status(addr: std::net::SocketAddr, method: &str, path: &str, auth: Option<&str>) -> u16 {
    let headers: Vec<(&str, String)> = auth
        .map(|a| ("authorization", format!("Bearer {a}")))
        .into_iter()
        .collect();
    send_with(addr, method, path, b"x", &headers).await.0
}

/// Every route the privileged API has and the client listener must not.
const PRIVILEGED: [(&str, &str); 8] = [
    ("POST", "/goim/push/keys?operation=1000&keys=k"),
    ("POST", "/goim/push/mids?operation=1000&mids=1"),
    ("POST", "/goim/push/room?operation=1000&type=live&room=1000"),
    ("POST", "/goim/push/all?operation=1000"),
    ("GET", "/goim/nodes/instances"),
    ("GET", "/goim/online/top?type=live&limit=5"),
    ("GET", "/goim/online/total"),
    ("GET", "/metrics"),
];

#[tokio::test]
async fn client_listener_reads_the_node_list_without_the_api_key_and_routes_nothing_else() {
    let logic = start(ClientAuth::None, TokenMode::Goim).await;
    let path = "/goim/nodes/weighted?platform=web";

    // The privileged API still refuses without its key ...
    let refused = http(logic.http, "GET", path, b"", None).await;
    assert_eq!(refused.status, 401, "{refused:?}");
    assert_eq!(refused.body["code"], -401);
    let privileged = http(logic.http, "GET", path, b"", Some(API_KEY)).await;
    assert_eq!(privileged.status, 200, "{privileged:?}");

    // ... while the client listener gives the very same answer with no key.
    let client = http(logic.client, "GET", path, b"", None).await;
    assert_eq!(client.status, 200, "{client:?}");
    assert_eq!(client.body, privileged.body);
    assert_eq!(
        client.body["data"]["nodes"].as_array().map(Vec::len),
        Some(2),
        "{client:?}"
    );
    assert_eq!(client.body["data"]["tcp_port"], 3101);

    // Room counts: the same handler and envelope as the privileged route.
    let rooms = "/goim/online/room?type=live&rooms=1000&rooms=1001";
    let client = http(logic.client, "GET", rooms, b"", None).await;
    assert_eq!(client.status, 200, "{client:?}");
    let privileged = http(logic.http, "GET", rooms, b"", Some(API_KEY)).await;
    assert_eq!(client.body, privileged.body);
    let missing = http(
        logic.client,
        "GET",
        "/goim/online/room?type=live",
        b"",
        None,
    )
    .await;
    assert_eq!(missing.status, 400, "{missing:?}");

    // Pushes, topology, totals and metrics are not there, key or no key.
    for (method, route) in PRIVILEGED {
        for auth in [None, Some(API_KEY)] {
            assert_eq!(
                status(logic.client, method, route, auth).await,
                404,
                "{method} {route} with {auth:?}"
            );
        }
        // Sanity: the privileged API does serve the route (without the
        // query it answers at once, with no Kafka record written).
        let bare = route.split('?').next().unwrap_or(route);
        assert_ne!(
            status(logic.http, method, bare, Some(API_KEY)).await,
            404,
            "{method} {bare}"
        );
    }
    logic.stop().await;
}

#[tokio::test]
async fn client_auth_token_wants_a_verified_client_token_never_the_api_key() {
    let logic = start(ClientAuth::Token, TokenMode::Jwt).await;
    let path = "/goim/nodes/weighted";
    let expired = jwt(JWT_SECRET, -600);
    let forged = jwt("another-secret", 600);
    for auth in [
        None,
        Some(API_KEY),
        Some(forged.as_str()),
        Some(expired.as_str()),
        Some(r#"{"mid":42,"key":"k"}"#),
        Some(""),
    ] {
        let ans = http(logic.client, "GET", path, b"", auth).await;
        assert_eq!(ans.status, 401, "{auth:?}: {ans:?}");
        assert_eq!(
            ans.body,
            json!({"code": -401, "message": "unauthorized"}),
            "{auth:?}"
        );
    }
    let good = jwt(JWT_SECRET, 600);
    let ans = http(logic.client, "GET", path, b"", Some(&good)).await;
    assert_eq!(ans.status, 200, "{ans:?}");
    assert_eq!(
        ans.body,
        http(logic.http, "GET", path, b"", Some(API_KEY)).await.body
    );
    // A good client token opens nothing else, and not the push API.
    assert_eq!(
        status(
            logic.client,
            "POST",
            "/goim/push/all?operation=1000",
            Some(&good)
        )
        .await,
        404
    );
    assert_eq!(
        status(
            logic.http,
            "POST",
            "/goim/push/all?operation=1000",
            Some(&good)
        )
        .await,
        401
    );
    logic.stop().await;
}

#[tokio::test]
async fn client_auth_token_in_goim_mode_takes_goim_token_json() {
    let logic = start(ClientAuth::Token, TokenMode::Goim).await;
    let path = "/goim/nodes/weighted";
    let ans = http(
        logic.client,
        "GET",
        path,
        b"",
        Some(r#"{"mid":7,"key":"k7"}"#),
    )
    .await;
    assert_eq!(ans.status, 200, "{ans:?}");
    for auth in [None, Some("not json"), Some(API_KEY)] {
        let ans = http(logic.client, "GET", path, b"", auth).await;
        assert_eq!(ans.status, 401, "{auth:?}: {ans:?}");
    }
    logic.stop().await;
}

#[tokio::test]
async fn browsers_get_cors_on_the_client_listener() {
    let logic = start(ClientAuth::Token, TokenMode::Jwt).await;
    let origin = ("origin", "https://app.example.com".to_owned());
    let (code, headers, _) = send_with(
        logic.client,
        "OPTIONS",
        "/goim/nodes/weighted",
        b"",
        &[
            origin.clone(),
            ("access-control-request-method", "GET".to_owned()),
            ("access-control-request-headers", "authorization".to_owned()),
        ],
    )
    .await;
    assert_eq!(code, 200, "{headers:?}");
    let header = |headers: &http::HeaderMap, name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase()
    };
    assert_eq!(header(&headers, "access-control-allow-origin"), "*");
    let methods = header(&headers, "access-control-allow-methods");
    assert!(
        methods.contains("get") && methods.contains("options"),
        "{methods}"
    );
    assert!(!methods.contains("post"), "{methods}");
    assert!(
        header(&headers, "access-control-allow-headers").contains("authorization"),
        "{headers:?}"
    );

    // Answers carry the header too, refusals included, so a browser can read them.
    let good = format!("Bearer {}", jwt(JWT_SECRET, 600));
    let (code, headers, _) = send_with(
        logic.client,
        "GET",
        "/goim/nodes/weighted",
        b"",
        &[origin.clone(), ("authorization", good)],
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(header(&headers, "access-control-allow-origin"), "*");
    let (code, headers, _) = send_with(
        logic.client,
        "GET",
        "/goim/nodes/weighted",
        b"",
        std::slice::from_ref(&origin),
    )
    .await;
    assert_eq!(code, 401);
    assert_eq!(header(&headers, "access-control-allow-origin"), "*");

    // The privileged API stays without CORS: browsers get no way into it.
    let (_, headers, _) = send_with(
        logic.http,
        "OPTIONS",
        "/goim/nodes/weighted",
        b"",
        &[origin, ("access-control-request-method", "GET".to_owned())],
    )
    .await;
    assert!(
        headers.get("access-control-allow-origin").is_none(),
        "{headers:?}"
    );
    logic.stop().await;
}
