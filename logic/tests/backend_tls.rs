//! Logic against the test bed's Redis TLS port (an ACL user, the test bed's
//! CA) and Kafka's SASL_SSL listener (SCRAM-SHA-256): what works, and that a
//! wrong password or an untrusted CA is refused with an answer that says so.
//! The whole path over both (job consuming too) is in
//! `herald/tests/full_path.rs`.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use herald_logic::queue::PushQueue;
use herald_logic::queue::kafka::{KafkaConfig, KafkaQueue};
use herald_logic::store::SessionStore;
use herald_logic::store::redis::{RedisConfig, RedisStore};
use herald_protocol::pb::{ConnectReq, PushMsg, push_msg};
use herald_runtime::kafka_security::{KafkaSecurity, SaslMechanism, SecurityProtocol};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

/// Settings for the TLS port as the test bed's ACL user.
fn tls_redis() -> RedisConfig {
    RedisConfig {
        username: Some(testbed("HERALD_REDIS_TLS_USER")),
        password: Some(testbed("HERALD_REDIS_TLS_PASSWORD")),
        ca_file: Some(PathBuf::from(testbed("HERALD_REDIS_TLS_CA"))),
        ..RedisConfig::new(
            testbed("HERALD_REDIS_TLS_URL"),
            Duration::from_secs(60),
            Duration::from_secs(3),
        )
    }
}

/// SASL_SSL with SCRAM-SHA-256 as the test bed's user.
fn sasl_ssl(password: String) -> KafkaSecurity {
    KafkaSecurity {
        protocol: SecurityProtocol::SaslSsl,
        mechanism: SaslMechanism::ScramSha256,
        username: Some(testbed("HERALD_KAFKA_SASL_USER")),
        password: Some(password),
        ca_file: Some(PathBuf::from(testbed("HERALD_KAFKA_TLS_CA"))),
    }
}

/// Logic's test config with both backends on their secure listeners.
fn secure_config(topic: &str, kafka_password: String) -> herald_logic::Config {
    let mut c = config(topic);
    c.redis = RedisConfig {
        ttl: c.redis.ttl,
        ..tls_redis()
    };
    c.kafka.brokers = testbed("HERALD_KAFKA_SASL_SSL_BROKERS");
    c.kafka.security = sasl_ssl(kafka_password);
    c
}

#[tokio::test]
async fn redis_over_tls_as_an_acl_user_writes_and_reads_routes() {
    let store = RedisStore::new(tls_redis()).expect("store");
    store.ping().await.expect("PING over TLS as the ACL user");
    let key = unique("tls-key");
    store
        .add_mapping(unique_mid(), &key, "comet-tls")
        .await
        .expect("route written");
    assert_eq!(
        store.servers_by_keys(&[key]).await.expect("route read"),
        vec![Some("comet-tls".to_owned())]
    );
}

/// The URL may carry the user and password itself (`rediss://user:pass@`).
#[tokio::test]
async fn credentials_in_the_url_work_too() {
    let url = testbed("HERALD_REDIS_TLS_URL").replacen(
        "rediss://",
        &format!(
            "rediss://{}:{}@",
            testbed("HERALD_REDIS_TLS_USER"),
            testbed("HERALD_REDIS_TLS_PASSWORD")
        ),
        1,
    );
    let store = RedisStore::new(RedisConfig {
        ca_file: Some(PathBuf::from(testbed("HERALD_REDIS_TLS_CA"))),
        ..RedisConfig::new(url, Duration::from_secs(60), Duration::from_secs(3))
    })
    .expect("store");
    store
        .ping()
        .await
        .expect("PING with credentials in the URL");
}

#[tokio::test]
async fn a_wrong_redis_password_is_refused_and_readyz_says_redis_auth_failed() {
    let store = RedisStore::new(RedisConfig {
        password: Some("not-the-password".to_owned()),
        ..tls_redis()
    })
    .expect("store");
    let err = store.ping().await.expect_err("a wrong password must fail");
    let chain = herald_runtime::error_chain(&err);
    assert!(
        chain.contains("WRONGPASS") || chain.to_lowercase().contains("auth"),
        "{chain}"
    );

    let topic = unique("tls-wrongpass");
    create_topic(&topic).await;
    let mut cfg = secure_config(&topic, testbed("HERALD_KAFKA_SASL_PASSWORD"));
    cfg.redis.password = Some("not-the-password".to_owned());
    let logic = Logic::start(cfg).await;
    let (status, body) = get_text(logic.http, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("RedisAuthFailed: "), "{body}");
    logic.stop().await;
}

#[tokio::test]
async fn a_redis_certificate_from_an_untrusted_ca_is_refused() {
    for ca in [Some(testbed("HERALD_REDIS_TLS_OTHER_CA")), None] {
        let store = RedisStore::new(RedisConfig {
            ca_file: ca.clone().map(PathBuf::from),
            ..tls_redis()
        })
        .expect("store");
        let err = store
            .ping()
            .await
            .expect_err("the test bed's certificate must not be trusted");
        let chain = herald_runtime::error_chain(&err);
        assert!(
            chain.contains("certificate") || chain.contains("UnknownIssuer"),
            "CA {ca:?}: {chain}"
        );
    }
    // A CA file that does not exist is a start-up error naming it.
    let err = RedisStore::new(RedisConfig {
        ca_file: Some(PathBuf::from("/nonexistent/ca.pem")),
        ..tls_redis()
    })
    .expect_err("missing CA file");
    assert!(
        herald_runtime::error_chain(&err).contains("/nonexistent/ca.pem"),
        "{err}"
    );
}

/// Logic on both secure listeners is ready, writes a route, and a push by
/// key reads it and lands on the topic, read back over SASL_SSL with the
/// same settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logic_routes_over_tls_and_pushes_over_sasl_ssl() {
    let topic = unique("tls-push");
    create_topic(&topic).await;
    let logic = Logic::start(secure_config(&topic, testbed("HERALD_KAFKA_SASL_PASSWORD"))).await;
    eventually("logic ready on TLS Redis and SASL_SSL Kafka", || async {
        let (status, body) = get_text(logic.http, "/readyz").await;
        (status == 200).then_some(()).or_else(|| {
            eprintln!("readyz: {status} {body}");
            None
        })
    })
    .await;
    let key = unique("tls-client");
    logic
        .grpc()
        .await
        .connect(ConnectReq {
            server: "comet-tls".to_owned(),
            cookie: String::new(),
            token: format!(r#"{{"mid":0,"key":"{key}"}}"#).into_bytes().into(),
        })
        .await
        .expect("connect (route written over TLS)");
    let push = format!("/goim/push/keys?operation=1000&keys={key}");
    let ans = http(logic.http, "POST", &push, b"over-tls", None).await;
    assert_eq!(ans.status, 200, "{ans:?}");

    let mut consumer = ClientConfig::new();
    for (k, v) in sasl_ssl(testbed("HERALD_KAFKA_SASL_PASSWORD")).client_settings() {
        consumer.set(k, v);
    }
    let consumer: StreamConsumer = consumer
        .set(
            "bootstrap.servers",
            testbed("HERALD_KAFKA_SASL_SSL_BROKERS"),
        )
        .set("group.id", unique("tls-test"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Beginning)
        .expect("partition");
    consumer.assign(&tpl).expect("assign");
    let msg = tokio::time::timeout(WAIT, consumer.recv())
        .await
        .expect("no record within the wait")
        .expect("recv over SASL_SSL");
    let record =
        <PushMsg as prost::Message>::decode(msg.payload().unwrap_or_default()).expect("a PushMsg");
    assert_eq!(record.r#type, push_msg::Type::Push as i32);
    assert_eq!(record.server, "comet-tls");
    assert_eq!(record.keys, vec![key]);
    assert_eq!(&record.msg[..], b"over-tls");
    logic.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_sasl_password_is_refused_and_readyz_says_so() {
    let topic = unique("tls-wrongsasl");
    create_topic(&topic).await;
    let queue = KafkaQueue::new(KafkaConfig {
        brokers: testbed("HERALD_KAFKA_SASL_SSL_BROKERS"),
        topic: topic.clone(),
        message_timeout: Duration::from_secs(3),
        linger: Duration::ZERO,
        busy_linger: Duration::ZERO,
        busy_in_flight: 8,
        security: sasl_ssl("not-the-password".to_owned()),
    })
    .expect("producer config");
    let msg = PushMsg {
        keys: vec!["k".to_owned()],
        ..PushMsg::default()
    };
    let err = queue.push("k", &msg).await.expect_err("push must fail");
    eprintln!(
        "push with a wrong SASL password: {}",
        herald_runtime::error_chain(&err)
    );

    let logic = Logic::start(secure_config(&topic, "not-the-password".to_owned())).await;
    let (status, body) = get_text(logic.http, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("KafkaAuthFailed: "), "{body}");
    assert!(body.contains("SASL authentication error"), "{body}");
    logic.stop().await;
}
