//! Command-line flags of `fmboost-loadtest` and their checks. Flags that act on the local
//! cluster conflict with `--target`, so none is accepted and ignored against a remote cluster.
//!
//! Value syntaxes: durations `500ms`, `10s`, `2m`; `--workers diffusion=1,cfm=2,decoder=1`;
//! `--kill STAGE:every=D` or `STAGE:at=D`; `--restart-coordinator at=D[,down=D]` (same for
//! `--restart-redis`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use fmboost_core::stage::StageKind;

use crate::spec::SpecFlags;

#[derive(Debug, Parser)]
#[command(
    name = "fmboost-loadtest",
    version,
    about = "Load and fault-injection harness for an fmboost cluster: drives jobs, reports throughput, latency, errors, lost jobs and output checksums"
)]
pub struct Args {
    /// Address of a running coordinator (`host:port` or `http://host:port`).
    #[arg(long, required_unless_present = "local", conflicts_with = "local")]
    pub target: Option<String>,
    /// Start a cluster on loopback: redis-server, the coordinator and `--workers`, as processes.
    #[arg(long)]
    pub local: bool,
    /// Worker processes per stage (local mode).
    #[arg(long, default_value = "diffusion=1,cfm=2,decoder=1", value_parser = parse_workers, conflicts_with = "target")]
    pub workers: WorkerCounts,
    /// Directory holding fmboost-coordinator and fmboost-worker-*; default: this binary's directory.
    #[arg(long, conflicts_with = "target")]
    pub bin_dir: Option<PathBuf>,
    /// The redis-server executable (local mode).
    #[arg(long, default_value = "redis-server", conflicts_with = "target")]
    pub redis_server: PathBuf,
    /// `--profile` given to the workers (local mode), e.g. `sleep:20`; default: the job's profile.
    #[arg(long, conflicts_with = "target")]
    pub worker_profile: Option<String>,
    /// Workers' `--max-batch` (local mode).
    #[arg(long, default_value_t = 1, conflicts_with = "target")]
    pub max_batch: u32,
    /// Workers' `--batch-wait-ms` (local mode).
    #[arg(long, default_value_t = 0, conflicts_with = "target")]
    pub batch_wait_ms: u64,
    /// Workers' `--idle-timeout-ms`: how soon a killed worker's task is reclaimed (local mode).
    #[arg(long, default_value_t = 3000, conflicts_with = "target")]
    pub worker_idle_timeout_ms: u64,
    /// Coordinator's `--max-queued` (local mode).
    #[arg(long, default_value_t = 1000, conflicts_with = "target")]
    pub max_queued: u64,
    /// How long the local cluster may take to become ready (models load in this time).
    #[arg(long, default_value = "60s", value_parser = parse_duration, conflicts_with = "target")]
    pub startup_timeout: Duration,
    /// Keep the local processes' logs (and Redis files) here instead of a deleted temp dir.
    #[arg(long, conflicts_with = "target")]
    pub log_dir: Option<PathBuf>,
    /// Bearer token file: sent with every call; in local mode also given to the coordinator.
    #[arg(long)]
    pub auth_token_file: Option<PathBuf>,

    /// Submit this many jobs.
    #[arg(long, required_unless_present = "duration", conflicts_with = "duration")]
    pub jobs: Option<u64>,
    /// Submit jobs for this long.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Open loop: jobs per second, sent on schedule whatever the server does.
    #[arg(long, required_unless_present = "concurrency", conflicts_with = "concurrency")]
    pub rate: Option<f64>,
    /// Open-loop arrival process.
    #[arg(long, value_enum, default_value_t = ArrivalKind::Poisson)]
    pub arrival: ArrivalKind,
    /// Closed loop: this many jobs in flight, each sent when one finishes.
    #[arg(long)]
    pub concurrency: Option<u32>,
    /// gRPC connections to spread calls over (a server caps streams per connection).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// After the last submission, how long to wait for jobs to finish; unfinished ones are lost.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// How long a submission is retried (same idempotency key) while the cluster is unavailable.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub submit_retry_for: Duration,
    /// Seed of the arrival process and of the fault injector's choices.
    #[arg(long, default_value_t = 1)]
    pub rng_seed: u64,

    #[command(flatten)]
    pub spec: SpecFlags,

    /// Skip fetching results (no checksums are compared then).
    #[arg(long)]
    pub no_verify_output: bool,
    /// Re-submit every Nth job's idempotency key after it finished and expect the same id; 0: never.
    #[arg(long, default_value_t = 10)]
    pub idempotency_probe_every: u64,

    /// SIGKILL a random worker of STAGE and start a new one: `STAGE:every=D` or `STAGE:at=D` (local mode).
    #[arg(long, value_parser = parse_kill, conflicts_with = "target")]
    pub kill: Vec<KillSpec>,
    /// SIGKILL the coordinator at T and start it again after `down` (default 1s): `at=T[,down=D]`.
    #[arg(long, value_parser = parse_restart, conflicts_with = "target")]
    pub restart_coordinator: Vec<RestartSpec>,
    /// SIGKILL redis-server at T and start it again from its AOF (on for the run): `at=T[,down=D]`.
    #[arg(long, value_parser = parse_restart, conflicts_with = "target")]
    pub restart_redis: Vec<RestartSpec>,

    /// Write the JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ArrivalKind {
    /// Exponential inter-arrival times (a Poisson process).
    Poisson,
    /// Equal intervals of 1/rate.
    Fixed,
}

/// Worker processes per stage; every stage present (0 allowed: its jobs then never finish).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerCounts(pub BTreeMap<StageKind, u32>);

impl WorkerCounts {
    pub fn get(&self, kind: StageKind) -> u32 {
        self.0.get(&kind).copied().unwrap_or(0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillWhen {
    Every(Duration),
    At(Duration),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KillSpec {
    pub stage: StageKind,
    pub when: KillWhen,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartSpec {
    pub at: Duration,
    pub down: Duration,
}

/// How jobs arrive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    Open { rate: f64, kind: ArrivalKind },
    Closed { concurrency: u32 },
}

/// When the run stops submitting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    Jobs(u64),
    Duration(Duration),
}

/// Parses `500ms`, `10s`, `1.5s`, `2m`.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let (number, scale) = if let Some(n) = value.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = value.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = value.strip_suffix('m') {
        (n, 60.0)
    } else {
        return Err(format!("{value:?}: expected a duration with a unit, e.g. 500ms, 10s, 2m"));
    };
    let number: f64 = number.parse().map_err(|_| format!("{value:?}: {number:?} is not a number"))?;
    if !number.is_finite() || number < 0.0 {
        return Err(format!("{value:?}: must be a non-negative duration"));
    }
    Ok(Duration::from_secs_f64(number * scale))
}

fn parse_stage(name: &str) -> Result<StageKind, String> {
    StageKind::from_name(name).ok_or_else(|| format!("unknown stage {name:?} (stages: diffusion, cfm, decoder)"))
}

/// Parses `diffusion=1,cfm=2,decoder=1`; every stage must be named once.
pub fn parse_workers(value: &str) -> Result<WorkerCounts, String> {
    let mut counts = BTreeMap::new();
    for part in value.split(',').map(str::trim) {
        let (stage, count) = part.split_once('=').ok_or_else(|| format!("{part:?}: expected STAGE=COUNT"))?;
        let stage = parse_stage(stage.trim())?;
        let count: u32 = count.trim().parse().map_err(|_| format!("{part:?}: {count:?} is not a worker count"))?;
        if count > 64 {
            return Err(format!("{part:?}: at most 64 workers a stage"));
        }
        if counts.insert(stage, count).is_some() {
            return Err(format!("stage {stage} named twice"));
        }
    }
    let missing: Vec<&str> = StageKind::ALL.iter().filter(|k| !counts.contains_key(k)).map(|k| k.name()).collect();
    if !missing.is_empty() {
        return Err(format!("no count for {} (give every stage, 0 allowed)", missing.join(", ")));
    }
    Ok(WorkerCounts(counts))
}

/// Parses `key=value` pairs separated by commas into a map, rejecting unknown or repeated keys.
fn parse_pairs<'a>(value: &'a str, known: &[&str]) -> Result<BTreeMap<&'a str, &'a str>, String> {
    let mut pairs = BTreeMap::new();
    for part in value.split(',').map(str::trim) {
        let (key, val) = part.split_once('=').ok_or_else(|| format!("{part:?}: expected KEY=VALUE"))?;
        if !known.contains(&key) {
            return Err(format!("unknown key {key:?} (known: {})", known.join(", ")));
        }
        if pairs.insert(key, val).is_some() {
            return Err(format!("{key} given twice"));
        }
    }
    Ok(pairs)
}

/// Parses `cfm:every=10s` or `cfm:at=3s`.
pub fn parse_kill(value: &str) -> Result<KillSpec, String> {
    let (stage, rest) = value.split_once(':').ok_or_else(|| format!("{value:?}: expected STAGE:every=D or STAGE:at=D"))?;
    let stage = parse_stage(stage)?;
    let pairs = parse_pairs(rest, &["every", "at"])?;
    let when = match (pairs.get("every"), pairs.get("at")) {
        (Some(every), None) => {
            let every = parse_duration(every)?;
            if every < Duration::from_millis(100) {
                return Err(format!("{value:?}: every must be at least 100ms"));
            }
            KillWhen::Every(every)
        }
        (None, Some(at)) => KillWhen::At(parse_duration(at)?),
        _ => return Err(format!("{value:?}: give exactly one of every=D, at=D")),
    };
    Ok(KillSpec { stage, when })
}

/// Parses `at=30s` or `at=30s,down=2s`.
pub fn parse_restart(value: &str) -> Result<RestartSpec, String> {
    let pairs = parse_pairs(value, &["at", "down"])?;
    let at = pairs.get("at").ok_or_else(|| format!("{value:?}: at=T is required"))?;
    let down = pairs.get("down").map(|d| parse_duration(d)).transpose()?.unwrap_or(Duration::from_secs(1));
    Ok(RestartSpec { at: parse_duration(at)?, down })
}

impl Args {
    pub fn load(&self) -> anyhow::Result<Load> {
        match (self.rate, self.concurrency) {
            (Some(rate), None) => {
                if !rate.is_finite() || rate <= 0.0 {
                    bail!("--rate {rate}: must be a positive number of jobs per second");
                }
                Ok(Load::Open { rate, kind: self.arrival })
            }
            (None, Some(0)) => bail!("--concurrency 0: must be at least 1"),
            (None, Some(concurrency)) => Ok(Load::Closed { concurrency }),
            _ => bail!("give exactly one of --rate, --concurrency"),
        }
    }

    pub fn bound(&self) -> anyhow::Result<Bound> {
        match (self.jobs, self.duration) {
            (Some(0), None) => bail!("--jobs 0: must be at least 1"),
            (Some(jobs), None) => Ok(Bound::Jobs(jobs)),
            (None, Some(d)) if d.is_zero() => bail!("--duration 0: must be positive"),
            (None, Some(d)) => Ok(Bound::Duration(d)),
            _ => bail!("give exactly one of --jobs, --duration"),
        }
    }

    /// Checks what clap cannot: fault targets, ranges.
    pub fn check(&self) -> anyhow::Result<()> {
        self.load()?;
        self.bound()?;
        if self.connections == 0 {
            bail!("--connections 0: must be at least 1");
        }
        for kill in &self.kill {
            if self.workers.get(kill.stage) == 0 {
                bail!("--kill {}: --workers starts no {} worker to kill", kill.stage, kill.stage);
            }
        }
        if self.max_batch == 0 {
            bail!("--max-batch 0: must be at least 1");
        }
        if self.worker_idle_timeout_ms < 400 {
            bail!("--worker-idle-timeout-ms {}: must be at least 400 (workers heartbeat 4 times within it)", self.worker_idle_timeout_ms);
        }
        Ok(())
    }

    /// The bearer token, read from `--auth-token-file`.
    pub fn auth_token(&self) -> anyhow::Result<Option<String>> {
        let Some(path) = &self.auth_token_file else { return Ok(None) };
        let token = std::fs::read_to_string(path).with_context(|| format!("--auth-token-file {}", path.display()))?;
        let token = token.trim();
        if token.is_empty() {
            bail!("--auth-token-file {}: the file is empty", path.display());
        }
        Ok(Some(token.to_string()))
    }
}

#[cfg(test)]
#[path = "args_tests.rs"]
mod tests;
