//! Blob store: the bulk bytes of a job (stage outputs — latents, the PNG — and uploads) behind
//! one trait, so that Redis keeps the job records, queues and events while the bytes can live
//! elsewhere. Every blob read and write of the workers and the coordinator goes through
//! [`BlobStore`]; a blob is named by a reference string (its key, `crate::keys`) that the job
//! record and the stage tasks carry.
//!
//! Implementations: [`RedisBlobStore`], in the routing Redis (`--blob-store redis`, the default)
//! or in a Redis of its own (`--blob-store redis://HOST:PORT[/DB]`), which takes the bulk bytes
//! off the single-threaded routing Redis. An S3-compatible store is designed, not built
//! (docs/architecture.md, "Bulk tensors"): it is refused with that reason.

mod redis_store;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

pub use redis_store::RedisBlobStore;

/// A blob store failure. `Unavailable`: the store could not be reached or did not answer (a
/// retry may succeed); `Failed`: it answered with an error.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob store unavailable: {0:#}")]
    Unavailable(anyhow::Error),
    #[error("blob store: {0:#}")]
    Failed(anyhow::Error),
}

pub type BlobResult<T> = Result<T, BlobError>;

/// Where blobs live; parsed from `--blob-store` (coordinator and workers must agree).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobStoreConfig {
    /// In the routing Redis (`--redis`): writes join the routing transactions.
    Routing,
    /// In the Redis at this URL.
    Redis(String),
}

impl BlobStoreConfig {
    /// Parses a `--blob-store` value; the error names the flag and what it takes.
    pub fn parse(value: &str) -> Result<Self, String> {
        let takes = "takes `redis` (the routing Redis, default) or `redis://HOST:PORT[/DB]` (a Redis for blobs only)";
        if value == "redis" {
            return Ok(BlobStoreConfig::Routing);
        }
        if value.starts_with("redis://") || value.starts_with("rediss://") || value.starts_with("redis+unix://") {
            return match redis::Client::open(value) {
                Ok(_) => Ok(BlobStoreConfig::Redis(value.to_string())),
                Err(err) => Err(format!("--blob-store {value:?}: not a valid Redis URL ({err}); it {takes}")),
            };
        }
        if value.starts_with("s3://") {
            return Err(format!(
                "--blob-store {value:?}: the S3-compatible store is designed (docs/architecture.md, \"Bulk tensors\") but not built; it {takes}"
            ));
        }
        Err(format!("--blob-store {value:?}: unknown store; it {takes}"))
    }
}

/// The operations the routing plane needs on bulk bytes. Futures are boxed so that stores can
/// be chosen at run time (`Arc<dyn BlobStore>`).
pub trait BlobStore: Send + Sync {
    /// For logs: which store this is.
    fn describe(&self) -> String;

    /// True when blobs live in the routing Redis: a transition script may then touch them
    /// itself (the completing ADVANCE extends the results' TTL), so the coordinator need not.
    fn in_routing_redis(&self) -> bool;

    /// Writes a blob that expires after `ttl` (replacing one of that name).
    fn put<'a>(&'a self, key: &'a str, bytes: Vec<u8>, ttl: Duration) -> BoxFuture<'a, BlobResult<()>>;

    /// Writes a blob no later than `pipe` runs on the routing Redis: a store in the routing
    /// Redis adds the write to the pipeline (one round trip, and in the pipeline's MULTI the
    /// blob and the event that names it land together); another store writes it now, before
    /// the pipeline is sent, so an event never names a blob not yet written.
    fn put_with<'a>(&'a self, pipe: &'a mut redis::Pipeline, key: &'a str, bytes: Vec<u8>, ttl: Duration) -> BoxFuture<'a, BlobResult<()>>;

    /// The whole blob; None when it is missing (expired or never written).
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, BlobResult<Option<Vec<u8>>>>;

    /// `len` bytes from `offset`; fewer (possibly none) where the blob ends or is gone.
    fn get_range<'a>(&'a self, key: &'a str, offset: u64, len: u64) -> BoxFuture<'a, BlobResult<Vec<u8>>>;

    /// The blob's length; None when it is missing.
    fn len<'a>(&'a self, key: &'a str) -> BoxFuture<'a, BlobResult<Option<u64>>>;

    /// Sets the remaining time to live of the blobs that exist among `keys`.
    fn expire<'a>(&'a self, keys: &'a [String], ttl: Duration) -> BoxFuture<'a, BlobResult<()>>;

    /// Removes a blob (missing is fine).
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, BlobResult<()>>;
}

/// Opens the configured store; `routing` is the connection of `--redis`.
pub async fn open(config: &BlobStoreConfig, routing: &redis::aio::ConnectionManager) -> anyhow::Result<Arc<dyn BlobStore>> {
    Ok(match config {
        BlobStoreConfig::Routing => Arc::new(RedisBlobStore::routing(routing.clone())),
        BlobStoreConfig::Redis(url) => {
            let client = redis::Client::open(url.as_str()).map_err(|e| anyhow::anyhow!("--blob-store {url}: {e}"))?;
            let conn = crate::redis_conn::commands(&client).await.map_err(|e| anyhow::anyhow!("--blob-store {url}: {e:#}"))?;
            Arc::new(RedisBlobStore::separate(conn, url))
        }
    })
}

#[cfg(test)]
mod tests;
