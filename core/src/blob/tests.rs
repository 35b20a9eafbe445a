//! The Redis blob store against real redis-server processes (the routing one and a blob-only
//! one), started on free loopback ports; these tests fail, never skip, without redis-server.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

/// A redis-server killed on drop.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start() -> Server {
        let port = crate::net::free_loopback_port().expect("a free port");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("starting redis-server (install Debian's redis-server; ./scripts/test.sh does)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { child, url: format!("redis://127.0.0.1:{port}") }
    }

    async fn conn(&self) -> redis::aio::ConnectionManager {
        crate::redis_conn::commands(&crate::redis_conn::client(&self.url).unwrap()).await.unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn pttl(conn: &mut redis::aio::ConnectionManager, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query_async(conn).await.unwrap()
}

/// What every store must do, checked through the trait.
async fn exercise(store: &dyn BlobStore, mut direct: redis::aio::ConnectionManager) {
    let ttl = Duration::from_secs(60);
    assert_eq!(store.get("b:missing").await.unwrap(), None);
    assert_eq!(store.len("b:missing").await.unwrap(), None);
    assert_eq!(store.get_range("b:missing", 0, 10).await.unwrap(), Vec::<u8>::new());
    let bytes: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    store.put("b:one", bytes.clone(), ttl).await.unwrap();
    assert_eq!(store.get("b:one").await.unwrap().as_deref(), Some(bytes.as_slice()));
    assert_eq!(store.len("b:one").await.unwrap(), Some(100_000));
    assert_eq!(store.get_range("b:one", 1000, 5).await.unwrap(), &bytes[1000..1005]);
    assert_eq!(store.get_range("b:one", 99_998, 10).await.unwrap(), &bytes[99_998..], "a range past the end is cut short");
    assert_eq!(store.get_range("b:one", 5, 0).await.unwrap(), Vec::<u8>::new());
    let left = pttl(&mut direct, "b:one").await;
    assert!(left > 50_000 && left <= 60_000, "TTL of the write: {left} ms");
    store.expire(&["b:one".to_string(), String::new(), "b:missing".to_string()], Duration::from_secs(3600)).await.unwrap();
    let left = pttl(&mut direct, "b:one").await;
    assert!(left > 3_500_000, "TTL after expire: {left} ms");
    let missing = pttl(&mut direct, "b:missing").await;
    assert_eq!(missing, -2, "expire creates nothing");
    store.delete("b:one").await.unwrap();
    store.delete("b:one").await.unwrap();
    assert_eq!(store.get("b:one").await.unwrap(), None);
}

#[tokio::test]
async fn the_routing_redis_store_does_what_the_trait_says() {
    let server = Server::start();
    let conn = server.conn().await;
    let store = RedisBlobStore::routing(conn.clone());
    assert!(store.in_routing_redis());
    exercise(&store, conn).await;
}

#[tokio::test]
async fn a_blob_only_redis_does_the_same_and_keeps_blobs_off_the_routing_one() {
    let (routing, blobs) = (Server::start(), Server::start());
    let mut routing_conn = routing.conn().await;
    let config = BlobStoreConfig::parse(&blobs.url).unwrap();
    let store = open(&config, &routing_conn).await.unwrap();
    assert!(!store.in_routing_redis());
    assert!(store.describe().contains(&blobs.url));
    exercise(store.as_ref(), blobs.conn().await).await;

    // put_with writes at once; the routing pipeline carries only its own commands.
    let mut pipe = redis::pipe();
    pipe.atomic();
    store.put_with(&mut pipe, "b:two", vec![7; 10], Duration::from_secs(60)).await.unwrap();
    assert_eq!(store.get("b:two").await.unwrap(), Some(vec![7; 10]), "written before the pipeline runs");
    pipe.cmd("SET").arg("event").arg("1").ignore();
    pipe.query_async::<()>(&mut routing_conn).await.unwrap();
    let on_routing: bool = redis::cmd("EXISTS").arg("b:two").query_async(&mut routing_conn).await.unwrap();
    assert!(!on_routing);
}

#[tokio::test]
async fn in_the_routing_redis_put_with_joins_the_pipeline() {
    let server = Server::start();
    let mut conn = server.conn().await;
    let store = open(&BlobStoreConfig::Routing, &conn).await.unwrap();
    let mut pipe = redis::pipe();
    pipe.atomic();
    store.put_with(&mut pipe, "b:three", vec![1, 2, 3], Duration::from_secs(60)).await.unwrap();
    assert_eq!(store.get("b:three").await.unwrap(), None, "nothing is written before the pipeline runs");
    pipe.query_async::<()>(&mut conn).await.unwrap();
    assert_eq!(store.get("b:three").await.unwrap(), Some(vec![1, 2, 3]));
    assert!(pttl(&mut conn, "b:three").await > 50_000);
}

#[tokio::test]
async fn an_unreachable_blob_redis_is_unavailable() {
    let server = Server::start();
    let blobs = Server::start();
    let store = open(&BlobStoreConfig::parse(&blobs.url).unwrap(), &server.conn().await).await.unwrap();
    drop(blobs);
    match store.get("b:x").await {
        Err(BlobError::Unavailable(err)) => assert!(format!("{err:#}").contains("GET b:x"), "{err:#}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[test]
fn the_flag_value_is_checked_with_errors_naming_it() {
    assert_eq!(BlobStoreConfig::parse("redis"), Ok(BlobStoreConfig::Routing));
    assert_eq!(BlobStoreConfig::parse("redis://10.0.0.5:6380/2"), Ok(BlobStoreConfig::Redis("redis://10.0.0.5:6380/2".into())));
    let s3 = BlobStoreConfig::parse("s3://bucket?endpoint=http://127.0.0.1:9000").unwrap_err();
    assert!(s3.contains("--blob-store") && s3.contains("not built") && s3.contains("docs/architecture.md"), "{s3}");
    let bad = BlobStoreConfig::parse("memcached://x").unwrap_err();
    assert!(bad.contains("--blob-store \"memcached://x\"") && bad.contains("`redis`"), "{bad}");
    let url = BlobStoreConfig::parse("redis://:99999999").unwrap_err();
    assert!(url.contains("not a valid Redis URL"), "{url}");
}
