//! `fmboost-coordinator`: the gRPC front door (Pipeline, grpc.health.v1 and reflection v1 and
//! v1alpha on one port), the job state machine driven by worker events, and Prometheus
//! metrics. Health: `""` and `fmboost.v1.Pipeline` are readiness (SERVING while Redis
//! answers), `liveness` stays SERVING while the process runs (fmboost_core::health).

mod auth;
#[cfg(test)]
mod cluster_tests;
mod error;
mod message_size;
mod idempotency;
mod metrics;
mod redis_guard;
mod result_stream;
mod server;
mod state;
mod status;
mod store;
mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use fmboost_core::health::Health;
use fmboost_core::keys::{Keys, COORDINATOR_GROUP, WORKER_GROUP};
use fmboost_core::redis_conn;
use fmboost_core::profile::ProfileInfo;
use fmboost_core::spec::Limits;
use fmboost_core::stage::StageKind;
use fmboost_proto::v1::pipeline_server::PipelineServer;
use tonic::server::NamedService;

#[derive(Debug, Parser)]
#[command(name = "fmboost-coordinator", version, about = "fmboost job coordinator: gRPC API and job state machine")]
struct Flags {
    /// gRPC listen address (Pipeline, health, reflection).
    #[arg(long, env = "FMBOOST_LISTEN", default_value = "0.0.0.0:50051")]
    listen: SocketAddr,
    /// Redis URL.
    #[arg(long, env = "FMBOOST_REDIS", default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Key namespace in Redis (all cluster members must agree).
    #[arg(long, env = "FMBOOST_NAMESPACE", default_value = "fmboost")]
    namespace: String,
    /// Jobs admitted and unfinished before Submit answers RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    max_queued: u64,
    /// Model profiles jobs may name (comma-separated): `tiny`, `sleep` or a profile TOML file
    /// (its `name`, `[defaults]` and `[capabilities]` are read). Workers must serve them.
    #[arg(long, env = "FMBOOST_PROFILES", default_value = "tiny", value_delimiter = ',')]
    profiles: Vec<String>,
    /// Largest uploaded latent or image, in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    max_upload_bytes: usize,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// File holding the bearer token clients must send; auth is off without it.
    #[arg(long)]
    auth_token_file: Option<PathBuf>,
    /// How long finished jobs and their results are kept.
    #[arg(long, default_value_t = 24 * 3600 * 1000, value_parser = clap::value_parser!(u64).range(1000..))]
    result_ttl_ms: u64,
    /// Time to live of uploaded payload blobs.
    #[arg(long, default_value_t = 3600 * 1000, value_parser = clap::value_parser!(u64).range(1000..))]
    blob_ttl_ms: u64,
    /// Where blobs (uploads, stage outputs, results) live: `redis` (the `--redis` one) or
    /// `redis://HOST:PORT[/DB]` (a Redis for blobs only); the workers' must be the same.
    #[arg(long, env = "FMBOOST_BLOB_STORE", default_value = "redis", value_parser = fmboost_core::blob::BlobStoreConfig::parse)]
    blob_store: fmboost_core::blob::BlobStoreConfig,
    /// Events left unacknowledged this long (their replica died) are taken over.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..))]
    event_claim_idle_ms: u64,
    /// Consumer name in the events group; default `{hostname}-{pid}`.
    #[arg(long)]
    replica_id: Option<String>,
    /// Longest an RPC waits for Redis before answering (UNAVAILABLE, or DEADLINE_EXCEEDED for
    /// a Submit whose write went out unanswered); also the health probe's PING timeout.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    redis_timeout_ms: u64,
}

fn main() -> anyhow::Result<()> {
    fmboost_core::init_logging();
    let flags = Flags::parse();
    if let Some(why) = Keys::check_namespace(&flags.namespace) {
        anyhow::bail!("--namespace {:?}: {why}", flags.namespace);
    }
    if flags.profiles.iter().any(|p| p.is_empty()) {
        anyhow::bail!("--profiles {:?}: empty profile name", flags.profiles.join(","));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(run(flags))
}

async fn run(flags: Flags) -> anyhow::Result<()> {
    let auth = auth::BearerAuth::from_file(flags.auth_token_file.as_deref())?;
    let client = redis_conn::client(&flags.redis)?;
    let mut conn = redis_conn::commands(&client).await?;
    let keys = Keys::new(&flags.namespace);
    redis_conn::ensure_group(&mut conn, &keys.events(), COORDINATOR_GROUP).await?;
    for kind in StageKind::ALL {
        for stream in keys.queues(kind) {
            redis_conn::ensure_group(&mut conn, &stream, WORKER_GROUP).await?;
        }
    }
    let metrics = metrics::CoordinatorMetrics::new();
    if let Some(addr) = flags.metrics_listen {
        fmboost_core::metrics::serve(addr, metrics.registry.clone()).await?;
    }
    let redis_timeout = Duration::from_millis(flags.redis_timeout_ms);
    let blobs = fmboost_core::blob::open(&flags.blob_store, &conn).await?;
    tracing::info!("blobs in {}", blobs.describe());
    let store = store::JobStore { keys: keys.clone(), conn, blobs, result_ttl_ms: flags.result_ttl_ms, blob_ttl_ms: flags.blob_ttl_ms, timeout: redis_timeout };
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = Health::new(reporter, &[PipelineServer::<server::PipelineService>::NAME]).await;
    health.watch_redis(client.clone(), redis_timeout).await;

    let stop = Arc::new(AtomicBool::new(false));
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "host".into());
    let machine = Arc::new(state::StateMachine {
        store: store.clone(),
        metrics: metrics.clone(),
        consumer: flags.replica_id.clone().unwrap_or_else(|| format!("{host}-{}", std::process::id())),
        claim_idle_ms: flags.event_claim_idle_ms,
    });
    let events = tokio::spawn(machine.run(redis_conn::blocking(&client).await?, stop.clone()));
    tokio::spawn(refresh_gauges(store.clone(), metrics.clone()));

    let profiles = flags
        .profiles
        .iter()
        .map(|p| ProfileInfo::resolve(p).map_err(|e| anyhow::anyhow!("--profiles: {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let limits = Arc::new(Limits::new(profiles, flags.max_upload_bytes));
    let hub = watch::WatchHub::start(client.clone(), flags.namespace.clone());
    let service = server::PipelineService {
        store,
        hub: hub.clone(),
        limits,
        max_queued: flags.max_queued,
        metrics,
        guard: redis_guard::RedisGuard { health: health.clone(), timeout: redis_timeout },
    };
    // Room for the largest upload plus the rest of the spec; results go out in chunks.
    let pipeline = PipelineServer::new(service)
        .max_decoding_message_size(flags.max_upload_bytes + message_size::SPEC_HEADROOM)
        .max_encoding_message_size(result_stream::MAX_CHUNK + (1 << 16));
    let pipeline = tonic::service::interceptor::InterceptedService::new(pipeline, move |request| auth.check(request));
    // Both reflection versions, each listing both: v1alpha is what grpcio-reflection's client
    // and older grpcurl/Postman builds ask for.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(fmboost_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().context("building the reflection service")?;
    let reflection_v1alpha = reflection().build_v1alpha().context("building the v1alpha reflection service")?;

    let listener = tokio::net::TcpListener::bind(flags.listen).await.with_context(|| format!("--listen {}: cannot bind", flags.listen))?;
    tracing::info!(listen = %flags.listen, namespace = %flags.namespace, profiles = ?flags.profiles, "coordinator ready");
    health.started().await;
    let serving_health = health.clone();
    tonic::transport::Server::builder()
        .layer(tower::util::MapResponseLayer::new(message_size::remap_oversized))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(pipeline)
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)), async move {
            shutdown_signal().await;
            serving_health.draining().await;
            hub.stop();
        })
        .await
        .context("gRPC server")?;
    stop.store(true, Ordering::SeqCst);
    events.await.context("event consumer")?;
    tracing::info!("coordinator stopped");
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::error!("cannot listen for SIGTERM: {err}");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("signal received: stopping");
}

/// Keeps the queue-depth, in-flight and live-worker gauges current between scrapes.
async fn refresh_gauges(store: store::JobStore, metrics: metrics::CoordinatorMetrics) {
    loop {
        if let Err(err) = status::cluster_status(&store, &metrics).await {
            tracing::warn!("refreshing gauges: {err}");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
