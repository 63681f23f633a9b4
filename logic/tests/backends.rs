//! The same `SessionStore` contract checked on Redis (real test bed) and on
//! the in-memory store, plus logic served on in-memory backends end to end
//! (what `herald standalone` will run).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use herald_logic::queue::memory::MemoryQueue;
use herald_logic::store::memory::MemoryStore;
use herald_logic::store::redis::{RedisConfig, RedisStore, unix_now};
use herald_logic::store::{Online, SessionStore};
use herald_logic::{Listeners, run_with};
use herald_protocol::pb::{ConnectReq, push_msg};
use tokio::net::TcpListener;

// A test helper, not a #[test]: clippy does not treat it as test code.
#[allow(clippy::unwrap_used)]
async fn conformance(store: &dyn SessionStore) {
    let mid = unique_mid();
    let (k1, k2) = (unique("k1"), unique("k2"));
    store.add_mapping(mid, &k1, "c-old").await.unwrap();
    store.add_mapping(mid, &k2, "c-2").await.unwrap();
    // Reconnect of k1 elsewhere, then the old comet's late disconnect.
    store.add_mapping(mid, &k1, "c-new").await.unwrap();
    assert!(!store.del_mapping(mid, &k1, "c-old").await.unwrap());
    let servers = store
        .servers_by_keys(&[k1.clone(), "nobody".to_owned(), k2.clone()])
        .await
        .unwrap();
    assert_eq!(
        servers,
        vec![Some("c-new".to_owned()), None, Some("c-2".to_owned())]
    );
    let mut routes = store.keys_by_mids(&[mid, -1]).await.unwrap();
    routes.sort();
    let mut want = vec![
        (k1.clone(), "c-new".to_owned()),
        (k2.clone(), "c-2".to_owned()),
    ];
    want.sort();
    assert_eq!(routes, want);

    assert!(store.expire_mapping(mid, &k1, "c-new").await.unwrap());
    assert!(store.del_mapping(mid, &k1, "c-new").await.unwrap());
    assert_eq!(
        store
            .servers_by_keys(std::slice::from_ref(&k1))
            .await
            .unwrap(),
        vec![None]
    );
    // Heartbeat after the route vanished recreates it (and the mid field).
    assert!(!store.expire_mapping(mid, &k1, "c-new").await.unwrap());
    assert_eq!(
        store
            .servers_by_keys(std::slice::from_ref(&k1))
            .await
            .unwrap(),
        vec![Some("c-new".to_owned())]
    );
    assert_eq!(store.keys_by_mids(&[mid]).await.unwrap().len(), 2);

    let server = unique("c-ol");
    let typ = unique("conf");
    let report = |rooms: &[(&str, i32)]| Online {
        server: server.clone(),
        room_count: rooms
            .iter()
            .map(|(r, n)| (format!("{typ}://{r}"), *n))
            .collect(),
        updated: unix_now(),
    };
    store
        .add_server_online(&report(&[("a", 1), ("b", 2)]))
        .await
        .unwrap();
    store.add_server_online(&report(&[("b", 3)])).await.unwrap();
    let onlines = store
        .server_onlines(Duration::from_secs(300))
        .await
        .unwrap();
    let mine: Vec<&Online> = onlines.iter().filter(|o| o.server == server).collect();
    assert_eq!(mine.len(), 1);
    assert_eq!(
        mine[0].room_count,
        HashMap::from([(format!("{typ}://b"), 3)])
    );
    store.add_server_online(&report(&[])).await.unwrap();
    let onlines = store
        .server_onlines(Duration::from_secs(300))
        .await
        .unwrap();
    assert!(onlines.iter().all(|o| o.server != server));
}

#[tokio::test]
async fn redis_store_meets_the_contract() {
    let store = RedisStore::new(RedisConfig::new(
        redis_url(),
        Duration::from_secs(60),
        Duration::from_secs(2),
    ))
    .unwrap();
    conformance(&store).await;
}

#[tokio::test]
async fn memory_store_meets_the_contract_and_expires() {
    let store = MemoryStore::new(Duration::from_secs(60));
    conformance(&store).await;

    let short = MemoryStore::new(Duration::from_millis(100));
    short.add_mapping(7, "k", "c").await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        short.servers_by_keys(&["k".to_owned()]).await.unwrap(),
        vec![None]
    );
    assert!(short.keys_by_mids(&[7]).await.unwrap().is_empty());
}

#[tokio::test]
async fn logic_runs_on_memory_backends() {
    let store = Arc::new(MemoryStore::new(Duration::from_secs(60)));
    let (queue, mut records) = MemoryQueue::new(16);
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (http_addr, grpc_addr) = (http.local_addr().unwrap(), grpc.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // Backends are ignored by run_with; these URLs are never dialled.
    let cfg = herald_logic::Config::new("redis://127.0.0.1:1/", "127.0.0.1:1", "unused");
    let handle = tokio::spawn(run_with(
        cfg,
        store,
        Arc::new(queue),
        Listeners {
            http,
            grpc,
            client: None,
        },
        async move {
            let _ = stopped.await;
        },
    ));

    let channel = tonic::transport::Channel::from_shared(format!("http://{grpc_addr}"))
        .unwrap()
        .timeout(WAIT)
        .connect()
        .await
        .unwrap();
    herald_protocol::pb::LogicClient::new(channel)
        .connect(ConnectReq {
            server: "solo".to_owned(),
            cookie: String::new(),
            token: br#"{"mid":1,"key":"only"}"#.to_vec().into(),
        })
        .await
        .unwrap();
    let ans = common::http(
        http_addr,
        "POST",
        "/goim/push/mids?operation=1000&mids=1",
        b"hey",
        None,
    )
    .await;
    assert_eq!(ans.status, 200, "{ans:?}");
    let (key, msg) = tokio::time::timeout(WAIT, records.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(key, "only");
    assert_eq!(msg.r#type(), push_msg::Type::Push);
    assert_eq!(
        (msg.server.as_str(), msg.keys.as_slice()),
        ("solo", &["only".to_owned()][..])
    );
    assert_eq!(&msg.msg[..], b"hey");

    // The consumer going away turns pushes into 503s, not silent drops.
    drop(records);
    let ans = common::http(http_addr, "POST", "/goim/push/all?operation=1", b"x", None).await;
    assert_eq!(ans.status, 503, "{ans:?}");

    let _ = stop.send(());
    tokio::time::timeout(WAIT, handle)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
