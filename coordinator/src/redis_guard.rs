//! Bounds what an RPC waits for Redis: refused at once while the health probe finds Redis
//! unreachable, UNAVAILABLE after `--redis-timeout-ms` otherwise. Both are right only where
//! nothing was written, or the write is safe to repeat (Cancel); Submit's write has its own
//! rule (`JobStore::submit`).

use std::future::Future;
use std::time::Duration;

use fmboost_core::health::Health;

use crate::error::ApiError;

#[derive(Clone)]
pub struct RedisGuard {
    pub health: Health,
    pub timeout: Duration,
}

impl RedisGuard {
    /// UNAVAILABLE while the last health probe failed: fail fast rather than queue behind a
    /// stalled connection.
    pub fn check(&self) -> Result<(), ApiError> {
        if self.health.redis_up() {
            Ok(())
        } else {
            Err(ApiError::Unavailable(anyhow::anyhow!("unreachable ({}); nothing was done", self.health.redis_error())))
        }
    }

    /// Runs `work` (Redis reads, or idempotent writes) within the timeout.
    pub async fn bounded<T>(&self, work: impl Future<Output = Result<T, ApiError>>) -> Result<T, ApiError> {
        self.check()?;
        match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(ApiError::Unavailable(anyhow::anyhow!("no answer within {} ms (--redis-timeout-ms)", self.timeout.as_millis()))),
        }
    }
}
