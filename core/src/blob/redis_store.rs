//! Blobs as Redis strings with a TTL (SET PX, GET, GETRANGE, STRLEN, PEXPIRE, DEL).

use std::time::Duration;

use futures::future::BoxFuture;
use redis::aio::ConnectionManager;

use super::{BlobError, BlobResult, BlobStore};

pub struct RedisBlobStore {
    conn: ConnectionManager,
    /// None: the routing Redis; else the blob Redis' URL.
    url: Option<String>,
}

fn classify(what: String) -> impl FnOnce(redis::RedisError) -> BlobError {
    move |err| {
        let unavailable = err.is_io_error() || err.is_timeout() || err.is_connection_dropped() || err.is_connection_refusal();
        let err = anyhow::Error::from(err).context(what);
        if unavailable {
            BlobError::Unavailable(err)
        } else {
            BlobError::Failed(err)
        }
    }
}

fn ttl_ms(ttl: Duration) -> u64 {
    // PX 0 is an error in Redis; a blob always lives at least a millisecond.
    (ttl.as_millis() as u64).max(1)
}

impl RedisBlobStore {
    /// Blobs in the routing Redis.
    pub fn routing(conn: ConnectionManager) -> Self {
        RedisBlobStore { conn, url: None }
    }

    /// Blobs in a Redis of their own (`url` for messages).
    pub fn separate(conn: ConnectionManager, url: &str) -> Self {
        RedisBlobStore { conn, url: Some(url.to_string()) }
    }
}

impl BlobStore for RedisBlobStore {
    fn describe(&self) -> String {
        match &self.url {
            None => "redis (the routing Redis)".into(),
            Some(url) => format!("redis at {url}"),
        }
    }

    fn in_routing_redis(&self) -> bool {
        self.url.is_none()
    }

    fn put<'a>(&'a self, key: &'a str, bytes: Vec<u8>, ttl: Duration) -> BoxFuture<'a, BlobResult<()>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            redis::cmd("SET").arg(key).arg(bytes).arg("PX").arg(ttl_ms(ttl)).query_async::<()>(&mut conn).await.map_err(classify(format!("SET {key}")))
        })
    }

    fn put_with<'a>(&'a self, pipe: &'a mut redis::Pipeline, key: &'a str, bytes: Vec<u8>, ttl: Duration) -> BoxFuture<'a, BlobResult<()>> {
        if self.in_routing_redis() {
            pipe.cmd("SET").arg(key).arg(bytes).arg("PX").arg(ttl_ms(ttl)).ignore();
            return Box::pin(async { Ok(()) });
        }
        self.put(key, bytes, ttl)
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, BlobResult<Option<Vec<u8>>>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            redis::cmd("GET").arg(key).query_async(&mut conn).await.map_err(classify(format!("GET {key}")))
        })
    }

    fn get_range<'a>(&'a self, key: &'a str, offset: u64, len: u64) -> BoxFuture<'a, BlobResult<Vec<u8>>> {
        Box::pin(async move {
            if len == 0 {
                return Ok(Vec::new());
            }
            let mut conn = self.conn.clone();
            redis::cmd("GETRANGE")
                .arg(key)
                .arg(offset)
                .arg(offset + len - 1)
                .query_async(&mut conn)
                .await
                .map_err(classify(format!("GETRANGE {key}")))
        })
    }

    fn len<'a>(&'a self, key: &'a str) -> BoxFuture<'a, BlobResult<Option<u64>>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let len: u64 = redis::cmd("STRLEN").arg(key).query_async(&mut conn).await.map_err(classify(format!("STRLEN {key}")))?;
            // STRLEN is 0 for a missing key; a blob is a non-empty BlobPayload, never 0 bytes.
            Ok((len > 0).then_some(len))
        })
    }

    fn expire<'a>(&'a self, keys: &'a [String], ttl: Duration) -> BoxFuture<'a, BlobResult<()>> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            for key in keys.iter().filter(|k| !k.is_empty()) {
                pipe.cmd("PEXPIRE").arg(key).arg(ttl_ms(ttl)).ignore();
            }
            let mut conn = self.conn.clone();
            pipe.query_async::<()>(&mut conn).await.map_err(classify(format!("PEXPIRE {}", keys.join(" "))))
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, BlobResult<()>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            redis::cmd("DEL").arg(key).query_async::<()>(&mut conn).await.map_err(classify(format!("DEL {key}")))
        })
    }
}
