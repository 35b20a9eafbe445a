//! grpc.health.v1 for the coordinator and the workers: readiness follows Redis, liveness does
//! not.
//!
//! - Readiness: the empty service name `""` (what a probe without `service` asks) and any
//!   names given to [`Health::new`] are SERVING only while the process has started, is not
//!   draining, and Redis answers a PING within the probe timeout. Kubernetes stops routing to
//!   (and rollouts wait for) a replica that cannot reach Redis.
//! - Liveness: [`LIVENESS_SERVICE`] is SERVING from the end of startup until exit, draining
//!   included, and never looks at Redis: a Redis outage must not make Kubernetes restart
//!   processes that are healthy and will carry on once Redis is back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// The health service name liveness probes ask for (`livenessProbe.grpc.service`).
pub const LIVENESS_SERVICE: &str = "liveness";

/// How often Redis is probed.
pub const PROBE_PERIOD: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct Flags {
    started: bool,
    draining: bool,
    redis_up: bool,
}

/// The process's health, published on grpc.health.v1.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    readiness_services: Arc<Vec<String>>,
    /// Held while publishing, so concurrent updates publish in order.
    flags: Arc<tokio::sync::Mutex<Flags>>,
    /// Mirrors `flags.redis_up` for lock-free reads on every RPC.
    redis_up: Arc<AtomicBool>,
    /// Why the last probe failed, for error messages while Redis is down.
    redis_error: Arc<Mutex<String>>,
}

impl Health {
    /// Everything NOT_SERVING until [`Health::started`]. `readiness_services` are served like
    /// `""` (the coordinator names its Pipeline service).
    pub async fn new(reporter: HealthReporter, readiness_services: &[&str]) -> Health {
        let health = Health {
            reporter,
            readiness_services: Arc::new(readiness_services.iter().map(|s| s.to_string()).collect()),
            flags: Arc::default(),
            redis_up: Arc::default(),
            redis_error: Arc::new(Mutex::new("not probed yet".into())),
        };
        health.update(|_| {}).await;
        health
    }

    /// Startup is over (model loaded, Redis set up): liveness SERVING for good.
    pub async fn started(&self) {
        self.update(|f| f.started = true).await;
    }

    /// Draining after SIGTERM: not ready, still alive.
    pub async fn draining(&self) {
        self.update(|f| f.draining = true).await;
    }

    /// Whether the last probe reached Redis.
    pub fn redis_up(&self) -> bool {
        self.redis_up.load(Ordering::SeqCst)
    }

    /// Why the last probe failed (meaningful while [`Health::redis_up`] is false).
    pub fn redis_error(&self) -> String {
        self.redis_error.lock().expect("health lock").clone()
    }

    async fn update(&self, change: impl FnOnce(&mut Flags)) {
        let mut flags = self.flags.lock().await;
        change(&mut flags);
        let (ready, alive) = (flags.started && !flags.draining && flags.redis_up, flags.started);
        let status = |on: bool| if on { ServingStatus::Serving } else { ServingStatus::NotServing };
        self.reporter.set_service_status(LIVENESS_SERVICE, status(alive)).await;
        self.reporter.set_service_status("", status(ready)).await;
        for service in self.readiness_services.iter() {
            self.reporter.set_service_status(service, status(ready)).await;
        }
    }

    /// Records a probe's result; `announce` logs a change (not done for the first probe).
    async fn set_redis(&self, result: Result<(), String>, announce: bool) {
        let up = result.is_ok();
        if let Err(reason) = result {
            *self.redis_error.lock().expect("health lock") = reason;
        }
        let was_up = self.redis_up.swap(up, Ordering::SeqCst);
        if announce && was_up != up {
            if up {
                tracing::info!("Redis answers again: ready");
            } else {
                tracing::warn!("Redis unreachable ({}): not ready", self.redis_error());
            }
        }
        self.update(|f| f.redis_up = up).await;
    }

    /// Probes Redis every [`PROBE_PERIOD`] with a PING on a connection of its own (so a queue
    /// of slow commands on the shared connection does not hide a healthy server), counting
    /// it down when no answer comes within `timeout`. Probes once before returning, so the
    /// state is known when the process starts serving.
    pub async fn watch_redis(&self, client: redis::Client, timeout: Duration) {
        let mut prober = Prober { client, timeout, conn: None };
        let first = prober.ping().await;
        if let Err(reason) = &first {
            tracing::warn!("Redis unreachable ({reason}): not ready");
        }
        self.set_redis(first, false).await;
        let health = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_PERIOD).await;
                health.set_redis(prober.ping().await, true).await;
            }
        });
    }
}

struct Prober {
    client: redis::Client,
    timeout: Duration,
    conn: Option<redis::aio::MultiplexedConnection>,
}

impl Prober {
    async fn ping(&mut self) -> Result<(), String> {
        let result = tokio::time::timeout(self.timeout, self.ping_unbounded()).await;
        let result = result.unwrap_or_else(|_| Err(format!("no answer to PING within {} ms", self.timeout.as_millis())));
        if result.is_err() {
            // A stalled connection may hold stale replies: the next probe starts afresh.
            self.conn = None;
        }
        result
    }

    async fn ping_unbounded(&mut self) -> Result<(), String> {
        if self.conn.is_none() {
            let config = redis::AsyncConnectionConfig::new().set_connection_timeout(Some(self.timeout)).set_response_timeout(Some(self.timeout));
            let conn = self.client.get_multiplexed_async_connection_with_config(&config).await.map_err(|e| format!("connecting: {e}"))?;
            self.conn = Some(conn);
        }
        let conn = self.conn.as_mut().expect("connected above");
        let pong: String = redis::cmd("PING").query_async(conn).await.map_err(|e| format!("PING: {e}"))?;
        if pong != "PONG" {
            return Err(format!("PING answered {pong:?}"));
        }
        Ok(())
    }
}
