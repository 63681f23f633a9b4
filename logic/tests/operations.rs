//! What an operator of logic relies on: message ids that name the Kafka
//! record, probes and metrics, recovery from a Redis restart without
//! restarting logic, upstream messages to their own topic, and the node
//! list watched in a ConfigMap on the real API server.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use herald_protocol::pb::goim::logic::ReceiveReq;
use herald_protocol::pb::{ConnectReq, Proto};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use prost::Message as _;
use rdkafka::message::Message as _;
use serde_json::json;

#[tokio::test]
async fn push_answers_carry_the_kafka_record_as_message_id() {
    let topic = unique("msg-id");
    create_topic(&topic).await;
    let consumer = consumer(&topic);
    let logic = Logic::start(config(&topic)).await;

    let mut ids = Vec::new();
    for room in ["1", "2", "3"] {
        let ans = http(
            logic.http,
            "POST",
            &format!("/goim/push/room?operation=1000&type=live&room={room}"),
            room.as_bytes(),
            None,
        )
        .await;
        assert_eq!(ans.status, 200, "{ans:?}");
        assert_eq!(ans.body["code"], 0);
        let id = ans.body["data"]["msg_id"]
            .as_str()
            .expect("msg_id")
            .to_owned();
        assert_eq!(ans.body["data"]["records"], json!([id.clone()]));
        ids.push(id);
    }
    for id in &ids {
        let msg = tokio::time::timeout(WAIT, consumer.recv())
            .await
            .expect("record")
            .expect("kafka");
        assert_eq!(*id, format!("{}-{}", msg.partition(), msg.offset()));
    }
    // A mids push that finds no connection writes nothing: no id.
    let ans = http(
        logic.http,
        "POST",
        &format!("/goim/push/mids?operation=1&mids={}", unique_mid()),
        b"x",
        None,
    )
    .await;
    assert_eq!(ans.body["data"], json!({"msg_id": null, "records": []}));
    logic.stop().await;
}

#[tokio::test]
async fn probes_bypass_the_api_key_and_metrics_count_requests() {
    let topic = unique("probes");
    create_topic(&topic).await;
    let mut cfg = config(&topic);
    cfg.http.api_key = Some("secret".into());
    let logic = Logic::start(cfg).await;

    assert_eq!(get_text(logic.http, "/healthz").await.0, 200);
    let (status, body) = get_text(logic.http, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    let push = "/goim/push/room?operation=1&type=live&room=1";
    assert_eq!(http(logic.http, "POST", push, b"x", None).await.status, 401);
    for _ in 0..2 {
        let ans = http(logic.http, "POST", push, b"x", Some("secret")).await;
        assert_eq!(ans.status, 200, "{ans:?}");
    }

    let (status, metrics) = get_text(logic.http, "/metrics").await;
    assert_eq!(status, 200);
    let route = r#"route="/goim/push/room""#;
    assert_eq!(
        sample(
            &metrics,
            &format!(r#"herald_logic_http_requests_total{{{route},status="200"}}"#)
        ),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            &format!(r#"herald_logic_http_requests_total{{{route},status="401"}}"#)
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            r#"herald_logic_push_records_total{type="room",outcome="ok"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(&metrics, "herald_logic_produce_seconds_count"),
        Some(2.0)
    );
    logic.stop().await;
}

/// A Redis server of this test's own, so it can be stopped and started.
struct OwnRedis {
    child: tokio::process::Child,
}

impl OwnRedis {
    async fn start(port: u16) -> OwnRedis {
        OwnRedis::start_with(port, &[]).await
    }

    async fn start_with(port: u16, extra: &[&str]) -> OwnRedis {
        // The test bed installs redis-server (e2e/services/redis.sh).
        let child = tokio::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server (installed by e2e/services/redis.sh) must be on PATH");
        eventually("own redis to listen", || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        OwnRedis { child }
    }

    async fn stop(mut self) {
        self.child.kill().await.expect("kill own redis");
    }
}

/// `/readyz` names the dependency that fails (`contract::unready`): the
/// operator reads it from unready pods into the PushCluster's conditions.
#[tokio::test]
async fn readiness_names_the_failing_dependency() {
    // Redis wants a password logic does not send.
    let port = closed_port().await;
    let redis = OwnRedis::start_with(port, &["--requirepass", "s3cret"]).await;
    let mut cfg = config(&unique("unused"));
    cfg.redis.url = format!("redis://127.0.0.1:{port}/");
    let logic = Logic::start(cfg).await;
    let (status, body) = get_text(logic.http, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.starts_with("RedisAuthFailed: "), "{body}");
    logic.stop().await;
    redis.stop().await;
    // Redis answers; the topic does not exist (the test bed's Kafka does
    // not create topics on first use).
    let logic = Logic::start(config(&unique("never-created"))).await;
    let (status, body) = get_text(logic.http, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.starts_with("KafkaTopicMissing: "), "{body}");
    logic.stop().await;
}

#[tokio::test]
async fn redis_stopped_fails_fast_and_recovers_without_a_restart() {
    let topic = unique("redis-restart");
    create_topic(&topic).await;
    let port = closed_port().await;
    let redis = OwnRedis::start(port).await;
    let mut cfg = config(&topic);
    cfg.redis.url = format!("redis://127.0.0.1:{port}/");
    let logic = Logic::start(cfg).await;
    let mut grpc = logic.grpc().await;
    let connect = |key: &str| ConnectReq {
        server: "comet-r".to_owned(),
        cookie: String::new(),
        token: format!(r#"{{"mid":7,"key":"{key}"}}"#).into_bytes().into(),
    };
    grpc.connect(connect("before"))
        .await
        .expect("connect while up");
    let push = "/goim/push/keys?operation=1&keys=before";
    assert_eq!(http(logic.http, "POST", push, b"x", None).await.status, 200);

    redis.stop().await;
    let started = std::time::Instant::now();
    let err = grpc
        .connect(connect("during"))
        .await
        .expect_err("redis is down");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let ans = http(logic.http, "POST", push, b"x", None).await;
    assert_eq!(ans.status, 503, "{ans:?}");
    assert_eq!(ans.body["message"], "session store unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failing took {:?}",
        started.elapsed()
    );
    let (status, body) = get_text(logic.http, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.starts_with("RedisUnreachable: "), "{body}");

    // Same port, empty store: logic reconnects on its own.
    let redis = OwnRedis::start(port).await;
    eventually("connect after redis restart", || {
        let mut grpc = grpc.clone();
        async move { grpc.connect(connect("after")).await.ok().map(|_| ()) }
    })
    .await;
    let ans = http(
        logic.http,
        "POST",
        "/goim/push/keys?operation=1&keys=after",
        b"x",
        None,
    )
    .await;
    assert_eq!(ans.status, 200, "{ans:?}");
    assert_eq!(
        ans.body["data"]["records"].as_array().map(Vec::len),
        Some(1)
    );
    assert_eq!(get_text(logic.http, "/readyz").await.0, 200);
    logic.stop().await;
    redis.stop().await;
}

#[tokio::test]
async fn upstream_messages_go_to_their_topic_keyed_by_mid() {
    let (push_topic, up_topic) = (unique("up-push"), unique("upstream"));
    create_topic(&push_topic).await;
    create_topic(&up_topic).await;
    let consumer = consumer(&up_topic);
    let mut cfg = config(&push_topic);
    cfg.receive_topic = Some(up_topic.clone());
    let logic = Logic::start(cfg).await;
    let proto = Proto {
        ver: 1,
        op: 4,
        seq: 9,
        body: b"hello upstream".to_vec().into(),
    };
    logic
        .grpc()
        .await
        .receive(ReceiveReq {
            mid: 4242,
            proto: Some(proto.clone()),
        })
        .await
        .expect("receive");
    let records = consume(&consumer, 1).await;
    assert_eq!(records[0].0, "4242");
    let got = ReceiveReq::decode(records[0].1.as_slice()).expect("ReceiveReq");
    assert_eq!(got.mid, 4242);
    assert_eq!(got.proto, Some(proto));
    logic.stop().await;
}

fn nodes_json(generation: i64, draining: bool) -> String {
    json!({"generation": generation, "nodes": [
        {"name": "cm-a", "grpc": "127.0.0.21:3109", "hosts": ["a.example.com"],
         "tcp_port": 3101, "ws_port": 3102, "weight": 10, "draining": false},
        {"name": "cm-b", "grpc": "127.0.0.22:3109", "hosts": ["b.example.com"],
         "tcp_port": 3101, "ws_port": 3102, "weight": 10, "connections": 0, "draining": draining}
    ]})
    .to_string()
}

async fn web_nodes(logic: &Logic) -> serde_json::Value {
    let ans = http(
        logic.http,
        "GET",
        "/goim/nodes/weighted?platform=web",
        b"",
        None,
    )
    .await;
    ans.body["data"]["nodes"].clone()
}

#[tokio::test]
async fn node_list_configmap_is_watched() {
    herald_e2e::testbed_var("KUBECONFIG");
    let client = kube::Client::try_default().await.expect("kube client");
    let ns = unique("logic-nodes");
    let namespace: Namespace =
        serde_json::from_value(json!({"metadata": {"name": ns}})).expect("namespace");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .expect("create namespace");
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let name = "chat-nodes";
    let apply = |text: String| {
        let maps = maps.clone();
        async move {
            let cm: ConfigMap = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": name}, "data": {"nodes.json": text}
            }))
            .expect("configmap");
            maps.patch(
                name,
                &PatchParams::apply("logic-test").force(),
                &Patch::Apply(&cm),
            )
            .await
            .expect("apply configmap");
        }
    };

    // Logic starts before the ConfigMap exists: empty list, not an error.
    let mut cfg = config(&unique("unused"));
    cfg.node_list = Some(herald_runtime::nodes::Source::ConfigMap {
        namespace: ns.clone(),
        name: name.to_owned(),
    });
    let logic = Logic::start(cfg).await;
    assert_eq!(web_nodes(&logic).await, json!([]));

    apply(nodes_json(1, false)).await;
    eventually("both nodes", || async {
        (web_nodes(&logic).await.as_array().map(Vec::len) == Some(2)).then_some(())
    })
    .await;

    apply(nodes_json(2, true)).await;
    eventually("cm-b draining", || async {
        (web_nodes(&logic).await == json!(["a.example.com"])).then_some(())
    })
    .await;
    let metrics = get_text(logic.http, "/metrics").await.1;
    assert_eq!(
        sample(&metrics, "herald_logic_node_list_generation"),
        Some(2.0)
    );

    // A bad write and a deletion both keep the last good list.
    apply("{not json".to_owned()).await;
    maps.delete(name, &DeleteParams::default())
        .await
        .expect("delete configmap");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(web_nodes(&logic).await, json!(["a.example.com"]));

    logic.stop().await;
    Api::<Namespace>::all(client)
        .delete(&ns, &DeleteParams::default())
        .await
        .expect("delete namespace");
}
