//! `fmboost-loadtest`: load and fault-injection harness for an fmboost cluster.
//!
//! Modules: [`args`] (flags), [`spec`] (the submitted job spec), [`cluster`] (a local cluster
//! as processes), [`client`] (gRPC), [`arrival`] (open-loop schedules), [`driver`] (the jobs'
//! lifecycle), [`faults`] (fault injection), [`record`]/[`stats`]/[`report`] (what was seen,
//! its statistics, the JSON and markdown report).

pub mod args;
pub mod arrival;
pub mod client;
pub mod cluster;
pub mod driver;
pub mod faults;
pub mod record;
pub mod redis_usage;
pub mod report;
pub mod spec;
pub mod stats;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use fmboost_core::stage::StageKind;
use fmboost_proto::v1 as pb;
use rand::Rng;

use crate::args::{Args, Load};
use crate::client::{endpoint_uri, Clients, ErrorTally};
use crate::cluster::{ClusterConfig, LocalCluster};
use crate::driver::{DriverConfig, Slots};
use crate::faults::{FaultTimeline, FaultRecord};
use crate::report::{Report, ReportInput, RunInfo};

/// Aborts a spawned task when dropped (an interrupted run leaves nothing running).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where the local cluster's files go: `--log-dir` (kept) or a temporary directory (removed).
enum RunDir {
    Kept(PathBuf),
    Temporary(tempfile::TempDir),
}

impl RunDir {
    fn path(&self) -> PathBuf {
        match self {
            RunDir::Kept(path) => path.clone(),
            RunDir::Temporary(dir) => dir.path().to_path_buf(),
        }
    }
}

fn load_name(load: Load) -> String {
    match load {
        Load::Open { rate, kind } => format!("open {rate}/s {}", format!("{kind:?}").to_lowercase()),
        Load::Closed { concurrency } => format!("closed {concurrency}"),
    }
}

/// Runs the load test the flags describe and returns its report.
pub async fn run(args: Args) -> anyhow::Result<Report> {
    args.check()?;
    let template = args.spec.template()?;
    let (load, bound) = (args.load()?, args.bound()?);
    let token = args.auth_token()?;
    let run_id = format!("{:08x}", rand::rng().random::<u32>());
    let namespace = format!("lt-{run_id}");
    let worker_profile = args.worker_profile.clone().unwrap_or_else(|| template.spec.profile.clone());

    // `_run_dir` keeps a temporary directory until the end of the run.
    let (cluster, _run_dir) = if args.local {
        let dir = match &args.log_dir {
            Some(path) => {
                std::fs::create_dir_all(path).with_context(|| format!("--log-dir {}", path.display()))?;
                RunDir::Kept(path.clone())
            }
            None => RunDir::Temporary(tempfile::Builder::new().prefix("fmboost-loadtest-").tempdir().context("creating a temp dir")?),
        };
        let bin_dir = match &args.bin_dir {
            Some(dir) => dir.clone(),
            None => std::env::current_exe().context("locating this binary")?.parent().context("this binary's directory")?.to_path_buf(),
        };
        let config = ClusterConfig {
            bin_dir,
            redis_server: args.redis_server.clone(),
            dir: dir.path(),
            namespace: namespace.clone(),
            workers: args.workers.clone(),
            job_profile: template.spec.profile.clone(),
            worker_profile: worker_profile.clone(),
            max_batch: args.max_batch,
            batch_wait_ms: args.batch_wait_ms,
            worker_idle_timeout_ms: args.worker_idle_timeout_ms,
            max_queued: args.max_queued,
            append_only: !args.restart_redis.is_empty(),
            auth_token_file: args.auth_token_file.clone(),
            startup_timeout: args.startup_timeout,
        };
        let started = LocalCluster::start(config).await;
        let started = started.map_err(|e| match &dir {
            RunDir::Temporary(_) => e.context("starting the local cluster (pass --log-dir to keep its logs)"),
            RunDir::Kept(path) => e.context(format!("starting the local cluster (logs in {})", path.display())),
        })?;
        eprintln!("local cluster ready: coordinator {}, redis {}, files in {}", started.coordinator_addr, started.redis_url(), dir.path().display());
        (Some(Arc::new(tokio::sync::Mutex::new(started))), Some(dir))
    } else {
        (None, None)
    };
    let redis_before = match &cluster {
        Some(cluster) => Some(redis_usage::sample(&cluster.lock().await.redis_url()).await.context("reading Redis INFO before the load")?),
        None => None,
    };
    let uri = match (&cluster, &args.target) {
        (Some(cluster), _) => format!("http://{}", cluster.lock().await.coordinator_addr),
        (None, Some(target)) => endpoint_uri(target)?,
        (None, None) => unreachable!("clap requires --target or --local"),
    };
    let clients = Clients::new(&uri, args.connections, token.clone())?;
    let tally = Arc::new(ErrorTally::default());
    let slots = Arc::new(Slots::default());
    let fault_log: Arc<Mutex<Vec<FaultRecord>>> = Arc::default();
    let start = Instant::now();

    let progress = AbortOnDrop(tokio::spawn(report_progress(slots.clone(), fault_log.clone(), start)));
    let timeline = FaultTimeline::new(&args.kill, &args.restart_coordinator, &args.restart_redis);
    let injector = match (&cluster, timeline.is_empty()) {
        (Some(cluster), false) => {
            Some(AbortOnDrop(tokio::spawn(faults::inject(cluster.clone(), timeline, start, args.rng_seed, fault_log.clone()))))
        }
        _ => None,
    };
    let config = DriverConfig {
        template: template.clone(),
        key_prefix: namespace.clone(),
        load,
        bound,
        rng_seed: args.rng_seed,
        drain_timeout: args.drain_timeout,
        submit_retry_for: args.submit_retry_for,
        verify_output: !args.no_verify_output,
        probe_every: args.idempotency_probe_every,
    };
    let drive = driver::drive(clients, tally.clone(), config, start, slots);
    let outcome = match injector {
        Some(mut injector) => {
            // A fault that cannot be carried out (a process that will not restart) ends the run.
            let failed = async {
                match (&mut injector.0).await {
                    Ok(Ok(())) => std::future::pending().await,
                    Ok(Err(err)) => err,
                    Err(join) => anyhow!("the fault injector panicked: {join}"),
                }
            };
            tokio::select! {
                outcome = drive => outcome,
                err = failed => return Err(err.context("fault injection failed")),
            }
        }
        None => drive.await,
    };
    drop(progress);

    let (unexpected_exits, active_jobs_after, redis_after) = match &cluster {
        Some(cluster) => {
            let mut cluster = cluster.lock().await;
            let exits = cluster.unexpected_exits()?;
            let active = active_jobs(&uri, token).await;
            // Read before the shutdown stops the counters (and after a Redis restart they
            // count from that start only: the `redis` section is then left out).
            let url = cluster.redis_url();
            let after = match redis_usage::sample(&url).await {
                Ok(sample) => Some((sample, redis_usage::blobs(&url, &namespace).await.context("counting the run's blobs")?)),
                Err(err) => return Err(err.context("reading Redis INFO after the load")),
            };
            cluster.shutdown().await?;
            (exits, Some(active?), after)
        }
        None => (Vec::new(), None, None),
    };
    let faults_done = fault_log.lock().expect("fault log lock").clone();
    let run = RunInfo {
        cluster: if args.local { "local".into() } else { uri.clone() },
        load: load_name(load),
        profile: template.spec.profile.clone(),
        worker_profile: args.local.then_some(worker_profile),
        workers: args.local.then(|| StageKind::ALL.iter().map(|&k| (k.name().to_string(), args.workers.get(k))).collect::<BTreeMap<_, _>>()),
        hops: template.hops,
        seeds: template.seeds,
        submit_span_s: (outcome.submit_span.as_secs_f64() * 1000.0).round() / 1000.0,
        duration_s: 0.0,
        drain_expired: outcome.drain_expired,
    };
    let mut report = Report::build(ReportInput {
        records: &outcome.records,
        errors: tally.snapshot(),
        faults: &faults_done,
        unexpected_exits,
        active_jobs_after,
        run,
    });
    if let (Some(before), Some((after, blobs)), true) = (redis_before, redis_after, args.restart_redis.is_empty()) {
        report.redis = Some(redis_usage::RedisUsage::between(&before, &after, report.counts.completed, blobs));
    }
    Ok(report)
}

async fn active_jobs(uri: &str, token: Option<String>) -> anyhow::Result<u64> {
    let mut request = tonic::Request::new(pb::ClusterStatusRequest {});
    request.set_timeout(Duration::from_secs(5));
    let status = Clients::new(uri, 1, token)?.get().cluster_status(request).await.context("ClusterStatus after the run")?;
    Ok(status.into_inner().active_jobs)
}

/// A line on stderr every 5 s.
async fn report_progress(slots: Arc<Slots>, faults: Arc<Mutex<Vec<FaultRecord>>>, start: Instant) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.tick().await;
    loop {
        tick.tick().await;
        let (sent, finished) = slots.progress();
        let faults = faults.lock().expect("fault log lock").len();
        eprintln!("[{:>5.0}s] sent {sent}, finished {finished}, faults {faults}", start.elapsed().as_secs_f64());
    }
}

/// Writes the JSON report.
pub fn write_report(report: &Report, path: &std::path::Path) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(report).context("serialising the report")?;
    std::fs::write(path, json + "\n").with_context(|| format!("--report {}", path.display()))
}
