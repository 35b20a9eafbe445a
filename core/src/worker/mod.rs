//! The generic stage worker: reads its stage's tasks from Redis, runs them in batches on a
//! [`StageExecutor`], and reports events back. Shared by the three worker binaries, whose
//! `main` is one call to [`run_worker`].
//!
//! Fault handling: tasks stay in the consumer group's pending list until acknowledged; a
//! worker touches its in-flight entries every heartbeat (so they never look idle), and idle
//! workers reclaim (XAUTOCLAIM) entries idle past `--idle-timeout-ms` (their worker died).
//! After `--max-deliveries` deliveries a task is dead-lettered and its job fails with the
//! reason. SIGTERM drains: no new reads, in-flight work finishes and is acknowledged, exit 0.

mod cancel;
mod queue;
mod runner;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use prometheus::{HistogramVec, IntCounterVec, Registry};

use crate::health::Health;
use crate::keys::Keys;
use crate::stage::{StageExecutor, StageKind};
use crate::{metrics, now_unix_ms, redis_conn};

/// A health probe that gets no PONG within this counts Redis down (readiness NOT_SERVING).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Flags shared by the three worker binaries.
#[derive(Debug, Clone, clap::Parser)]
pub struct WorkerFlags {
    /// Redis URL.
    #[arg(long, env = "FMBOOST_REDIS", default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    /// Key namespace in Redis (all cluster members must agree).
    #[arg(long, env = "FMBOOST_NAMESPACE", default_value = "fmboost")]
    pub namespace: String,
    /// Model profile: a built-in name (`tiny`, `sleep[:STEP_MS]` for load tests) or a TOML file.
    #[arg(long, env = "FMBOOST_PROFILE", default_value = "tiny")]
    pub profile: String,
    /// Compute device: `cpu` or `cuda:N`.
    #[arg(long, env = "FMBOOST_DEVICE", default_value = "cpu", value_parser = parse_device)]
    pub device: String,
    /// Most tasks run together in one batch.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub max_batch: u32,
    /// How long to wait for more tasks to fill a batch once one arrived.
    #[arg(long, default_value_t = 0)]
    pub batch_wait_ms: u64,
    /// Deliveries of a task (first try + reclaims) before it is dead-lettered.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_deliveries: u32,
    /// Pending tasks idle longer than this are reclaimed from their (dead) worker.
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(100..))]
    pub idle_timeout_ms: u64,
    /// Heartbeat period: liveness registration and touching in-flight tasks.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(10..))]
    pub heartbeat_ms: u64,
    /// Time to live of output blobs.
    #[arg(long, default_value_t = 3_600_000, value_parser = clap::value_parser!(u64).range(1000..))]
    pub blob_ttl_ms: u64,
    /// Where stage outputs are read and written: `redis` (the `--redis` one) or
    /// `redis://HOST:PORT[/DB]` (a Redis for blobs only); the coordinator's must be the same.
    #[arg(long, env = "FMBOOST_BLOB_STORE", default_value = "redis", value_parser = crate::blob::BlobStoreConfig::parse)]
    pub blob_store: crate::blob::BlobStoreConfig,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve grpc.health.v1 at ADDR: service "" is readiness (model loaded, Redis answering,
    /// not draining), service "liveness" stays SERVING from startup to exit.
    #[arg(long)]
    pub health_listen: Option<SocketAddr>,
    /// Consumer name in Redis; default `{hostname}-{pid}-{random}`.
    #[arg(long)]
    pub worker_id: Option<String>,
    /// Run a batch as one tensor batch: faster on GPUs, but a job's output then depends in
    /// the last bits on which jobs share its batch. Off by default, so the cluster's output
    /// equals `fmboost generate`'s bit for bit.
    #[arg(long)]
    pub stack_batches: bool,
}

fn parse_device(value: &str) -> Result<String, String> {
    let ok = value == "cpu" || value.strip_prefix("cuda:").is_some_and(|n| n.parse::<u32>().is_ok());
    if ok {
        Ok(value.to_string())
    } else {
        Err(format!("expected `cpu` or `cuda:N`, got {value:?}"))
    }
}

impl WorkerFlags {
    fn check(&self) -> anyhow::Result<()> {
        if self.heartbeat_ms * 3 > self.idle_timeout_ms {
            bail!(
                "--heartbeat-ms {} must be at most a third of --idle-timeout-ms {} (in-flight tasks are touched every heartbeat)",
                self.heartbeat_ms,
                self.idle_timeout_ms
            );
        }
        if let Some(why) = Keys::check_namespace(&self.namespace) {
            bail!("--namespace {:?}: {why}", self.namespace);
        }
        Ok(())
    }
}

/// Builds the stage executor (loads the model); runs on a blocking thread.
pub type ExecutorFactory = fn(StageKind, &WorkerFlags) -> anyhow::Result<Box<dyn StageExecutor>>;

/// Runs a worker of stage `kind` until SIGTERM/SIGINT (drained, Ok) or a startup error.
pub fn run_worker(kind: StageKind, flags: WorkerFlags, factory: ExecutorFactory) -> anyhow::Result<()> {
    crate::init_logging();
    flags.check()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(run(kind, flags, factory))
}

/// Per-worker Prometheus metrics.
#[derive(Clone)]
pub(crate) struct WorkerMetrics {
    pub tasks: IntCounterVec,
    pub service_seconds: HistogramVec,
    pub queue_wait_seconds: HistogramVec,
    pub batch_size: HistogramVec,
}

impl WorkerMetrics {
    fn new(registry: &Registry) -> Self {
        WorkerMetrics {
            tasks: metrics::counter(registry, "fmboost_worker_tasks_total", "Tasks handled, by stage and outcome", &["stage", "outcome"]),
            service_seconds: metrics::histogram(
                registry,
                "fmboost_worker_service_seconds",
                "Compute time of a batch",
                &["stage"],
                metrics::duration_buckets(),
            ),
            queue_wait_seconds: metrics::histogram(
                registry,
                "fmboost_worker_queue_wait_seconds",
                "Time from enqueue to start of a task",
                &["stage"],
                metrics::duration_buckets(),
            ),
            batch_size: metrics::histogram(registry, "fmboost_worker_batch_size", "Tasks per batch", &["stage"], metrics::batch_buckets()),
        }
    }
}

/// What the worker's tasks share.
pub(crate) struct WorkerContext {
    pub kind: StageKind,
    pub id: String,
    pub flags: WorkerFlags,
    pub keys: Keys,
    pub executor: Arc<dyn StageExecutor>,
    pub conn: redis::aio::ConnectionManager,
    pub blobs: Arc<dyn crate::blob::BlobStore>,
    pub metrics: WorkerMetrics,
    pub cancels: cancel::CancelWatch,
    /// (stream, entry id) of tasks read and not yet acknowledged: touched every heartbeat.
    pub in_flight: Mutex<Vec<(String, String)>>,
    pub shutdown: AtomicBool,
}

async fn run(kind: StageKind, flags: WorkerFlags, factory: ExecutorFactory) -> anyhow::Result<()> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = Health::new(reporter, &[]).await;
    if let Some(addr) = flags.health_listen {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--health-listen {addr}: cannot bind"))?;
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        tokio::spawn(async move {
            if let Err(err) = tonic::transport::Server::builder().add_service(health_service).serve_with_incoming(incoming).await {
                tracing::error!("health server: {err}");
            }
        });
    }
    let registry = Registry::new();
    let worker_metrics = WorkerMetrics::new(&registry);
    if let Some(addr) = flags.metrics_listen {
        metrics::serve(addr, registry).await?;
    }

    let factory_flags = flags.clone();
    let executor = tokio::task::spawn_blocking(move || factory(kind, &factory_flags)).await.context("executor factory panicked")??;
    if executor.kind() != kind {
        bail!("the executor serves the {} stage, this is a {kind} worker", executor.kind());
    }
    let client = redis_conn::client(&flags.redis)?;
    let mut conn = redis_conn::commands(&client).await?;
    let keys = Keys::new(&flags.namespace);
    for stream in keys.queues(kind) {
        redis_conn::ensure_group(&mut conn, &stream, crate::keys::WORKER_GROUP).await?;
    }
    let id = flags.worker_id.clone().unwrap_or_else(default_worker_id);
    let blobs = crate::blob::open(&flags.blob_store, &conn).await?;
    let cancels = cancel::CancelWatch::start(client.clone(), conn.clone(), keys.clone());
    let ctx = Arc::new(WorkerContext {
        kind,
        id: id.clone(),
        keys,
        executor: Arc::from(executor),
        conn,
        blobs,
        metrics: worker_metrics,
        cancels,
        in_flight: Mutex::new(Vec::new()),
        shutdown: AtomicBool::new(false),
        flags,
    });
    let heartbeat = tokio::spawn(heartbeat_loop(ctx.clone()));
    spawn_signal_handler(ctx.clone(), health.clone());
    health.watch_redis(client.clone(), PROBE_TIMEOUT).await;
    health.started().await;
    tracing::info!(worker = %id, stage = %kind, profile = ctx.executor.profile(), "worker ready");

    let mut queue = queue::TaskQueue::new(ctx.clone(), redis_conn::blocking(&client).await?);
    while !ctx.shutdown.load(Ordering::SeqCst) {
        match queue.next_batch().await {
            Ok(deliveries) if deliveries.is_empty() => {}
            Ok(deliveries) => runner::process(&ctx, deliveries).await,
            Err(err) => {
                tracing::error!("reading tasks: {err:#}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    heartbeat.abort();
    let mut conn = ctx.conn.clone();
    let mut deregister = redis::pipe();
    deregister.cmd("ZREM").arg(ctx.keys.workers(kind)).arg(&id).ignore();
    deregister.cmd("ZREM").arg(ctx.keys.profile_workers(kind, ctx.executor.profile())).arg(&id).ignore();
    let _: () = deregister.query_async(&mut conn).await.context("deregistering")?;
    tracing::info!(worker = %id, "drained, exiting");
    Ok(())
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "host".into());
    format!("{host}-{}-{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// SIGTERM or SIGINT: not ready, stop reading; the main loop finishes in-flight work and
/// returns.
fn spawn_signal_handler(ctx: Arc<WorkerContext>, health: Health) {
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(err) => {
                tracing::error!("cannot listen for SIGTERM: {err}");
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("signal received: draining");
        ctx.shutdown.store(true, Ordering::SeqCst);
        health.draining().await;
    });
}

/// Registers liveness (score = expiry time) and touches in-flight entries so they are not
/// reclaimed while this worker lives. XCLAIM with JUSTID resets idle time without counting
/// a delivery.
async fn heartbeat_loop(ctx: Arc<WorkerContext>) {
    let period = Duration::from_millis(ctx.flags.heartbeat_ms);
    let mut conn = ctx.conn.clone();
    loop {
        let now = now_unix_ms();
        let entries = ctx.in_flight.lock().expect("in-flight lock").clone();
        let mut pipe = redis::pipe();
        for set in [ctx.keys.workers(ctx.kind), ctx.keys.profile_workers(ctx.kind, ctx.executor.profile())] {
            pipe.cmd("ZADD").arg(&set).arg(now + 5 * ctx.flags.heartbeat_ms).arg(&ctx.id).ignore();
            pipe.cmd("ZREMRANGEBYSCORE").arg(&set).arg("-inf").arg(now).ignore();
        }
        for (stream, entry) in &entries {
            pipe.cmd("XCLAIM").arg(stream).arg(crate::keys::WORKER_GROUP).arg(&ctx.id).arg(0).arg(entry).arg("JUSTID").ignore();
        }
        if let Err(err) = pipe.query_async::<()>(&mut conn).await {
            tracing::warn!("heartbeat: {err}");
        }
        tokio::time::sleep(period).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn parses_flags_and_rejects_bad_device() {
        let flags = WorkerFlags::try_parse_from(["w", "--profile", "sleep:5", "--max-batch", "4", "--device", "cuda:1"]).unwrap();
        assert_eq!((flags.max_batch, flags.device.as_str()), (4, "cuda:1"));
        let err = WorkerFlags::try_parse_from(["w", "--device", "gpu"]).unwrap_err().to_string();
        assert!(err.contains("--device") && err.contains("cuda:N"), "{err}");
        assert!(WorkerFlags::try_parse_from(["w", "--max-batch", "0"]).is_err());
        let err = WorkerFlags::try_parse_from(["w", "--blob-store", "s3://b"]).unwrap_err().to_string();
        assert!(err.contains("--blob-store") && err.contains("not built"), "{err}");
        assert_eq!(WorkerFlags::try_parse_from(["w"]).unwrap().blob_store, crate::blob::BlobStoreConfig::Routing);
    }

    #[test]
    fn heartbeat_must_fit_in_idle_timeout() {
        let flags = WorkerFlags::try_parse_from(["w", "--idle-timeout-ms", "1000", "--heartbeat-ms", "500"]).unwrap();
        assert!(flags.check().unwrap_err().to_string().contains("--heartbeat-ms"));
    }
}
