//! Pure computations over the job records: counts (lost, duplicates, checksum mismatches),
//! latency distributions (hdrhistogram), per-stage timings, and the impact of faults.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use fmboost_core::stage::StageKind;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::record::{JobRecord, ProbeOutcome, SubmitOutcome, Terminal};

/// A latency distribution in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Distribution {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

/// Collects values in microseconds (1 µs to 1 h, 3 significant digits); percentiles are the
/// lower bound of their bucket (within 0.1%), the maximum is exact.
pub struct Recorder {
    histogram: Histogram<u64>,
    max_us: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder { histogram: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"), max_us: 0 }
    }
}

impl Recorder {
    pub fn record(&mut self, value: Duration) {
        let us = (value.as_micros() as u64).max(1);
        self.histogram.saturating_record(us);
        self.max_us = self.max_us.max(us);
    }

    pub fn record_ms(&mut self, ms: u64) {
        self.record(Duration::from_millis(ms));
    }

    pub fn summary(&self) -> Distribution {
        let h = &self.histogram;
        if h.is_empty() {
            return Distribution { count: 0, mean: 0.0, p50: 0.0, p95: 0.0, p99: 0.0, max: 0.0 };
        }
        let at = |q: f64| h.lowest_equivalent(h.value_at_quantile(q)) as f64 / 1000.0;
        Distribution {
            count: h.len(),
            mean: h.mean().round() / 1000.0,
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
            max: self.max_us.min(3_600_000_000) as f64 / 1000.0,
        }
    }
}

pub fn distribution(values: impl IntoIterator<Item = Duration>) -> Distribution {
    let mut recorder = Recorder::default();
    values.into_iter().for_each(|v| recorder.record(v));
    recorder.summary()
}

/// The outcome counts of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Jobs the harness tried to submit.
    pub attempted: u64,
    /// Admitted (the cluster answered a job id).
    pub submitted: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// Admitted and never seen finished before the drain timeout (or their record vanished).
    pub lost: u64,
    /// RESOURCE_EXHAUSTED answers to Submit.
    pub shed: u64,
    /// Submit refused with another non-retryable status.
    pub rejected: u64,
    /// Submit never answered within the retry window (unknown whether admitted).
    pub unacknowledged: u64,
    /// One job id answered to several submissions, or an idempotency probe (the key sent again
    /// after the job finished) answered with another id.
    pub duplicates: u64,
}

pub fn counts(records: &[JobRecord]) -> Counts {
    let mut counts = Counts { attempted: records.len() as u64, ..Counts::default() };
    for record in records {
        match &record.submit {
            SubmitOutcome::Accepted { .. } => counts.submitted += 1,
            SubmitOutcome::Shed => counts.shed += 1,
            SubmitOutcome::Rejected { .. } => counts.rejected += 1,
            SubmitOutcome::Unacknowledged { .. } | SubmitOutcome::Pending => counts.unacknowledged += 1,
        }
        if record.is_lost() {
            counts.lost += 1;
        }
        match record.terminal.as_ref().map(|(t, _)| t) {
            Some(Terminal::Completed { .. }) => counts.completed += 1,
            Some(Terminal::Failed { .. }) => counts.failed += 1,
            Some(Terminal::Cancelled) => counts.cancelled += 1,
            Some(Terminal::Vanished) | None => {}
        }
    }
    counts.duplicates = duplicates(records);
    counts
}

fn duplicates(records: &[JobRecord]) -> u64 {
    let mut owners: HashMap<&str, u64> = HashMap::new();
    let mut extra = 0;
    for record in records {
        if let Some(id) = record.job_id() {
            *owners.entry(id).or_default() += 1;
        }
        if matches!(record.probe, Some(ProbeOutcome::DifferentId(_))) {
            extra += 1;
        }
    }
    extra + owners.values().map(|&n| n - 1).sum::<u64>()
}

/// Output checksums of jobs sharing a seed (the spec is the same for all jobs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Checksums {
    /// Completed jobs whose PNG was fetched and hashed.
    pub fetched: u64,
    /// Seeds with at least two fetched outputs.
    pub groups_compared: u64,
    /// Jobs whose PNG differs from the most common PNG of their seed.
    pub mismatches: u64,
    pub fetch_errors: u64,
    /// Completed events whose `png_bytes` differs from the fetched PNG's length.
    pub size_mismatches: u64,
}

pub fn checksums(records: &[JobRecord]) -> Checksums {
    let mut by_seed: BTreeMap<u64, HashMap<u32, u64>> = BTreeMap::new();
    let mut result = Checksums::default();
    for record in records {
        if let Some(checksum) = record.checksum {
            *by_seed.entry(record.seed).or_default().entry(checksum).or_default() += 1;
            result.fetched += 1;
        }
        if record.result_error.is_some() {
            result.fetch_errors += 1;
        }
        if let (Some((Terminal::Completed { png_bytes }, _)), Some(len)) = (&record.terminal, record.png_len) {
            if *png_bytes != len {
                result.size_mismatches += 1;
            }
        }
    }
    for counts in by_seed.values() {
        let total: u64 = counts.values().sum();
        if total >= 2 {
            result.groups_compared += 1;
        }
        result.mismatches += total - counts.values().max().copied().unwrap_or(0);
    }
    result
}

/// Failure reasons and how often each occurred.
pub fn failure_reasons(records: &[JobRecord]) -> BTreeMap<String, u64> {
    let mut reasons = BTreeMap::new();
    for record in records {
        if let Some((Terminal::Failed { reason }, _)) = &record.terminal {
            let short: String = reason.chars().take(200).collect();
            *reasons.entry(short).or_default() += 1;
        }
    }
    reasons
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageTimings {
    /// From the worker: enqueue to start.
    pub queue_wait_ms: Distribution,
    /// From the worker: compute time of the batch.
    pub service_ms: Distribution,
    /// From the previous stage's end to this stage's end (the events' server timestamps; for
    /// the first stage, from the client's receipt of Submit's answer): queue wait + service +
    /// the coordinator's routing. Only where both ends were seen.
    pub hop_ms: Distribution,
}

/// The stage after `(kind, hop)` in a job with `hops` CFM hops.
fn successor(kind: StageKind, hop: u32, hops: u32) -> Option<(StageKind, u32)> {
    match kind {
        StageKind::Diffusion if hops > 0 => Some((StageKind::Cfm, 1)),
        StageKind::Diffusion => Some((StageKind::Decoder, 0)),
        StageKind::Cfm if hop < hops => Some((StageKind::Cfm, hop + 1)),
        StageKind::Cfm => Some((StageKind::Decoder, 0)),
        StageKind::Decoder => None,
    }
}

/// Per-stage timings from the StageFinished events (CFM hops together).
pub fn stage_timings(records: &[JobRecord], hops: u32) -> BTreeMap<String, StageTimings> {
    let mut recorders: BTreeMap<StageKind, [Recorder; 3]> = BTreeMap::new();
    for record in records {
        for sample in &record.stages {
            let [wait, service, hop] = recorders.entry(sample.kind).or_default();
            wait.record_ms(sample.queue_wait_ms);
            service.record_ms(sample.service_ms);
            let previous_end = if sample.kind == StageKind::Diffusion {
                record.accepted_unix_ms
            } else {
                record.stages.iter().find(|p| successor(p.kind, p.hop, hops) == Some((sample.kind, sample.hop))).map(|p| p.finished_unix_ms)
            };
            if let Some(previous_end) = previous_end {
                hop.record_ms(sample.finished_unix_ms.saturating_sub(previous_end));
            }
        }
    }
    recorders
        .into_iter()
        .map(|(kind, [wait, service, hop])| {
            (kind.name().to_string(), StageTimings { queue_wait_ms: wait.summary(), service_ms: service.summary(), hop_ms: hop.summary() })
        })
        .collect()
}

/// End-to-end latency minus the stages' service times, for jobs whose every stage was seen
/// (`stages_per_job` events): what the routing plane added.
pub fn routing_overhead(records: &[JobRecord], stages_per_job: usize) -> Distribution {
    distribution(records.iter().filter(|r| r.stages.len() == stages_per_job).filter_map(|r| {
        let service: u64 = r.stages.iter().map(|s| s.service_ms).sum();
        Some(r.latency()?.saturating_sub(Duration::from_millis(service)))
    }))
}

/// How the cluster came back after one fault.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recovery {
    /// Accepted jobs sent before the fault and unfinished at it.
    pub jobs_in_flight: u64,
    /// Fault to the next completed job.
    pub next_completion_ms: Option<f64>,
    /// Fault to the start of the first window (long enough for 10 completions at the rate
    /// before the fault) with at least half that rate; 0 when throughput never dipped that low
    /// (None: never back, within the run).
    pub throughput_ms: Option<f64>,
    /// Fault to the last completion of the jobs in flight at it (None: some never finished).
    pub in_flight_done_ms: Option<f64>,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

pub fn recovery(records: &[JobRecord], fault_at: Duration) -> Recovery {
    let mut completions: Vec<Duration> = records.iter().filter_map(JobRecord::completed_at).collect();
    completions.sort();
    let in_flight: Vec<&JobRecord> = records
        .iter()
        .filter(|r| r.is_accepted() && r.intended <= fault_at && r.terminal.as_ref().is_none_or(|(_, at)| *at > fault_at))
        .collect();
    let in_flight_done = in_flight
        .iter()
        .map(|r| r.terminal.as_ref().filter(|(t, _)| *t != Terminal::Vanished).map(|(_, at)| *at))
        .collect::<Option<Vec<Duration>>>()
        .map(|ends| ends.into_iter().max().map_or(0.0, |end| ms(end - fault_at)));
    let next_completion = completions.iter().find(|&&at| at > fault_at).map(|&at| ms(at - fault_at));
    Recovery {
        jobs_in_flight: in_flight.len() as u64,
        next_completion_ms: next_completion,
        throughput_ms: throughput_back(&completions, fault_at),
        in_flight_done_ms: in_flight_done,
    }
}

/// Sliding windows (100 ms steps) from the fault on; the baseline is the completion rate over
/// the 10 s (at most) before the fault. Windows expect 10 completions and pass at 5, so the
/// randomness of arrivals alone rarely fails one (Poisson(10) < 5 has 3% odds) while a
/// stalled pipeline always does. Without a baseline, the next completion counts.
fn throughput_back(completions: &[Duration], fault_at: Duration) -> Option<f64> {
    let count_in = |from: Duration, to: Duration| completions.iter().filter(|&&c| c >= from && c < to).count() as f64;
    let lookback = fault_at.min(Duration::from_secs(10));
    let baseline = if lookback >= Duration::from_secs(1) { count_in(fault_at - lookback, fault_at) / lookback.as_secs_f64() } else { 0.0 };
    if baseline <= 0.0 {
        return completions.iter().find(|&&c| c > fault_at).map(|&c| ms(c - fault_at));
    }
    let window = Duration::from_secs_f64((10.0 / baseline).max(1.0));
    let last = *completions.last()?;
    let mut start = fault_at;
    while start + window <= last {
        if count_in(start, start + window) >= 0.5 * baseline * window.as_secs_f64() {
            return Some(ms(start - fault_at));
        }
        start += Duration::from_millis(100);
    }
    None
}

/// Latency of completed jobs in flight during some fault (its window: from the kill until the
/// cluster recovered) against the others.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultImpact {
    pub jobs_during_faults: u64,
    pub latency_during_faults_ms: Distribution,
    pub latency_other_ms: Distribution,
    /// p99 during faults / p99 of the others (None without both).
    pub p99_inflation: Option<f64>,
}

/// `faults`: (start, end) of each fault's window.
pub fn fault_impact(records: &[JobRecord], faults: &[(Duration, Duration)]) -> FaultImpact {
    let (mut during, mut other) = (Vec::new(), Vec::new());
    for record in records {
        let (Some(latency), Some(end)) = (record.latency(), record.completed_at()) else { continue };
        if faults.iter().any(|&(from, to)| record.intended <= to && from <= end) {
            during.push(latency);
        } else {
            other.push(latency);
        }
    }
    let (during, other) = (distribution(during), distribution(other));
    let p99_inflation = (during.count > 0 && other.count > 0 && other.p99 > 0.0).then(|| ((during.p99 / other.p99) * 100.0).round() / 100.0);
    FaultImpact { jobs_during_faults: during.count, latency_during_faults_ms: during, latency_other_ms: other, p99_inflation }
}

#[cfg(test)]
#[path = "stats_tests.rs"]
mod tests;
