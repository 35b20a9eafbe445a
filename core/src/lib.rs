//! The serving plane's shared pieces, knowing nothing of candle: wire tensors, job specs and
//! their validation (bounds, and each profile's capabilities), the Redis key layout and
//! connections, the stage-executor contract, the generic worker runtime, the `sleep`
//! load-test executor, metrics/health endpoints, and loopback ports for the servers that
//! tests and the load harness start.

pub mod health;
pub mod blob;
pub mod capabilities;
pub mod keys;
pub mod metrics;
pub mod net;
pub mod profile;
pub mod reason;
pub mod redis_conn;
pub mod sleep;
pub mod spec;
pub mod stage;
pub mod tensor;
pub mod worker;

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Installs the `tracing` subscriber used by every binary (`RUST_LOG` filters, default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
