//! The test bed's Redis is a real server that the `redis` crate can use the
//! way logic will: strings and hashes with expiry (goim's `key_`/`mid_` keys).

use herald_e2e::{testbed_var, unique_name};
use redis::AsyncCommands;

#[tokio::test]
async fn set_get_and_hash_with_expiry() -> anyhow::Result<()> {
    let client = redis::Client::open(testbed_var("HERALD_REDIS_URL"))?;
    let mut redis = client.get_connection_manager().await?;

    let key = format!("key_{}", unique_name("smoke"));
    let () = redis.set_ex(&key, "comet-01", 60).await?;
    let value: String = redis.get(&key).await?;
    assert_eq!(value, "comet-01");
    let ttl: i64 = redis.ttl(&key).await?;
    assert!((1..=60).contains(&ttl), "ttl {ttl}");

    let hash = format!("mid_{}", unique_name("smoke"));
    let () = redis.hset(&hash, "k1", "comet-01").await?;
    let () = redis.hset(&hash, "k2", "comet-02").await?;
    let _: bool = redis.expire(&hash, 60).await?;
    let entries: std::collections::HashMap<String, String> = redis.hgetall(&hash).await?;
    assert_eq!(entries.len(), 2);
    assert_eq!(entries["k2"], "comet-02");

    let removed: i64 = redis.del(&[&key, &hash]).await?;
    assert_eq!(removed, 2);
    let gone: Option<String> = redis.get(&key).await?;
    assert_eq!(gone, None);

    // A real server reports its version; nothing else on this port would.
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut redis)
        .await?;
    assert!(info.contains("redis_version:"), "{info}");
    Ok(())
}
