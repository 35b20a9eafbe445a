//! The run's report: JSON (`--report`) and a markdown summary, built from the job records.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use serde::Serialize;

use crate::faults::{FaultAction, FaultRecord};
use crate::record::{JobRecord, ProbeOutcome};
use crate::stats::{self, Checksums, Counts, Distribution, FaultImpact, Recovery, StageTimings};

/// What the run was.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    /// `local` or the target address.
    pub cluster: String,
    /// e.g. `open 50/s poisson` or `closed 8`.
    pub load: String,
    pub profile: String,
    /// Local mode: the workers' `--profile` and counts.
    pub worker_profile: Option<String>,
    pub workers: Option<BTreeMap<String, u32>>,
    /// CFM hops of the job spec.
    pub hops: u32,
    pub seeds: u64,
    /// Start to the last submission.
    pub submit_span_s: f64,
    /// Start to the last terminal state seen.
    pub duration_s: f64,
    pub drain_expired: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Probes {
    pub sent: u64,
    pub same_id: u64,
    pub different_id: u64,
    pub errors: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FaultReport {
    pub kind: &'static str,
    pub target: String,
    pub at_s: f64,
    pub took_ms: f64,
    pub recovery: Recovery,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub counts: Counts,
    pub checksum_mismatches: u64,
    /// Completed jobs per second of the run (start to the last terminal state).
    pub throughput_jobs_per_s: f64,
    /// Completed jobs, end to end: intended send time to the observed completion.
    pub latency_ms: Distribution,
    /// Every error status received (retried attempts included), by code.
    pub errors: BTreeMap<String, u64>,
    pub errors_by_call: BTreeMap<String, BTreeMap<String, u64>>,
    pub stages: BTreeMap<String, StageTimings>,
    /// End-to-end latency less the stages' service times (jobs with every stage event seen).
    pub routing_overhead_ms: Distribution,
    pub checksums: Checksums,
    pub idempotency_probes: Probes,
    pub failure_reasons: BTreeMap<String, u64>,
    pub faults: Vec<FaultReport>,
    pub fault_impact: Option<FaultImpact>,
    /// Local mode: processes that exited without being stopped.
    pub unexpected_exits: Vec<String>,
    /// Local mode: ClusterStatus.active_jobs after the run (jobs admitted and never finished,
    /// whether or not the harness knows their id).
    pub active_jobs_after: Option<u64>,
    pub run: RunInfo,
    /// Local mode without a Redis restart: Redis' CPU, bytes and the run's blobs (total, per job).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<crate::redis_usage::RedisUsage>,
    /// Why the run fails (exit status 1): nothing admitted, lost jobs, checksum mismatches,
    /// duplicates, crashes.
    pub problems: Vec<String>,
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

pub struct ReportInput<'a> {
    pub records: &'a [JobRecord],
    pub errors: (BTreeMap<String, u64>, BTreeMap<String, BTreeMap<String, u64>>),
    pub faults: &'a [FaultRecord],
    pub unexpected_exits: Vec<String>,
    pub active_jobs_after: Option<u64>,
    pub run: RunInfo,
}

impl Report {
    pub fn build(input: ReportInput<'_>) -> Report {
        let ReportInput { records, errors: (errors, errors_by_call), faults, unexpected_exits, active_jobs_after, mut run } = input;
        let counts = stats::counts(records);
        let checksums = stats::checksums(records);
        let end = records.iter().filter_map(|r| r.terminal.as_ref().map(|(_, at)| *at)).max().unwrap_or_default();
        run.duration_s = secs(end);
        let throughput = if end.is_zero() { 0.0 } else { (counts.completed as f64 / end.as_secs_f64() * 100.0).round() / 100.0 };
        let mut probes = Probes::default();
        for probe in records.iter().filter_map(|r| r.probe.as_ref()) {
            probes.sent += 1;
            match probe {
                ProbeOutcome::SameId => probes.same_id += 1,
                ProbeOutcome::DifferentId(_) => probes.different_id += 1,
                ProbeOutcome::Error(_) => probes.errors += 1,
            }
        }
        let fault_reports: Vec<FaultReport> = faults
            .iter()
            .map(|f| FaultReport {
                kind: f.action.name(),
                target: f.target.clone(),
                at_s: secs(f.at),
                took_ms: secs(f.took) * 1000.0,
                recovery: stats::recovery(records, f.at),
            })
            .collect();
        // A fault lasts until the process is back and the jobs caught in it finished (never, if
        // one was lost); after a restart, also until the next completion (the plane reconnects).
        let fault_windows: Vec<(Duration, Duration)> = faults
            .iter()
            .zip(&fault_reports)
            .map(|(f, report)| {
                let r = &report.recovery;
                let restart = !matches!(f.action, FaultAction::KillWorker(_));
                let recovered_ms = match r.in_flight_done_ms {
                    Some(done) if restart => done.max(r.next_completion_ms.unwrap_or(f64::INFINITY)),
                    Some(done) => done,
                    None => f64::INFINITY,
                };
                let recovered = Duration::try_from_secs_f64(recovered_ms / 1000.0).unwrap_or(Duration::MAX);
                (f.at, f.at.saturating_add(f.took.max(recovered)))
            })
            .collect();
        let mut problems = Vec::new();
        if counts.submitted == 0 {
            problems.push("no job was admitted: the run measured nothing".to_string());
        }
        if counts.lost > 0 {
            problems.push(format!("{} job(s) lost: admitted and never seen finished", counts.lost));
        }
        if checksums.mismatches > 0 {
            problems.push(format!("{} output checksum mismatch(es) between jobs of the same seed", checksums.mismatches));
        }
        if counts.duplicates > 0 {
            problems.push(format!("{} duplicate(s): one job id for several submissions, or a key answered with another id", counts.duplicates));
        }
        problems.extend(unexpected_exits.iter().map(|e| format!("process exited by itself: {e}")));
        Report {
            checksum_mismatches: checksums.mismatches,
            throughput_jobs_per_s: throughput,
            latency_ms: stats::distribution(records.iter().filter_map(JobRecord::latency)),
            errors,
            errors_by_call,
            stages: stats::stage_timings(records, run.hops),
            routing_overhead_ms: stats::routing_overhead(records, run.hops as usize + 2),
            checksums,
            idempotency_probes: probes,
            failure_reasons: stats::failure_reasons(records),
            fault_impact: (!faults.is_empty()).then(|| stats::fault_impact(records, &fault_windows)),
            faults: fault_reports,
            unexpected_exits,
            active_jobs_after,
            counts,
            run,
            redis: None,
            problems,
        }
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let c = &self.counts;
        let _ = writeln!(out, "## fmboost-loadtest: {} jobs, {}, cluster {}\n", c.attempted, self.run.load, self.run.cluster);
        let _ = writeln!(out, "| submitted | completed | failed | lost | shed | rejected | unacknowledged | duplicates | checksum mismatches | jobs/s |");
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} |\n",
            c.submitted,
            c.completed,
            c.failed,
            c.lost,
            c.shed,
            c.rejected,
            c.unacknowledged,
            c.duplicates,
            self.checksum_mismatches,
            self.throughput_jobs_per_s
        );
        let _ = writeln!(out, "| ms | n | p50 | p95 | p99 | max |");
        let _ = writeln!(out, "|---|---|---|---|---|---|");
        let mut row = |name: &str, d: &Distribution| {
            let _ = writeln!(out, "| {name} | {} | {:.1} | {:.1} | {:.1} | {:.1} |", d.count, d.p50, d.p95, d.p99, d.max);
        };
        row("end to end", &self.latency_ms);
        row("routing overhead", &self.routing_overhead_ms);
        for (stage, t) in &self.stages {
            row(&format!("{stage} queue wait"), &t.queue_wait_ms);
            row(&format!("{stage} service"), &t.service_ms);
            row(&format!("{stage} hop"), &t.hop_ms);
        }
        if let Some(impact) = &self.fault_impact {
            row("jobs spanning a fault", &impact.latency_during_faults_ms);
            row("other jobs", &impact.latency_other_ms);
        }
        let ck = &self.checksums;
        let _ = writeln!(
            out,
            "\nOutputs: {} PNGs hashed, {} seeds compared, {} mismatches, {} fetch errors, {} size mismatches (Completed.png_bytes vs PNG). Idempotency probes: {} sent, {} same id.",
            ck.fetched, ck.groups_compared, ck.mismatches, ck.fetch_errors, ck.size_mismatches, self.idempotency_probes.sent, self.idempotency_probes.same_id
        );
        if !self.errors.is_empty() {
            let list: Vec<String> = self.errors.iter().map(|(code, n)| format!("{code} {n}")).collect();
            let _ = writeln!(out, "\nError statuses (all attempts): {}", list.join(", "));
        }
        for (reason, n) in &self.failure_reasons {
            let _ = writeln!(out, "\nFailed ×{n}: {reason}");
        }
        if !self.faults.is_empty() {
            let _ = writeln!(out, "\n| fault | at s | target | in flight | next completion ms | throughput back ms | in-flight done ms |");
            let _ = writeln!(out, "|---|---|---|---|---|---|---|");
            let opt = |v: Option<f64>| v.map_or("never".to_string(), |v| format!("{v:.0}"));
            for f in &self.faults {
                let r = &f.recovery;
                let _ = writeln!(
                    out,
                    "| {} | {:.1} | {} | {} | {} | {} | {} |",
                    f.kind,
                    f.at_s,
                    f.target,
                    r.jobs_in_flight,
                    opt(r.next_completion_ms),
                    opt(r.throughput_ms),
                    opt(r.in_flight_done_ms)
                );
            }
            if let Some(inflation) = self.fault_impact.as_ref().and_then(|i| i.p99_inflation) {
                let _ = writeln!(out, "\np99 inflation (jobs spanning a fault / others): {inflation:.2}×");
            }
        }
        if let Some(redis) = &self.redis {
            out += &redis.markdown();
        }
        if self.problems.is_empty() {
            let _ = writeln!(out, "\nResult: OK");
        } else {
            let _ = writeln!(out, "\nResult: FAILED: {}", self.problems.join("; "));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{SubmitOutcome, Terminal};

    fn run_info() -> RunInfo {
        RunInfo {
            cluster: "local".into(),
            load: "open 10/s fixed".into(),
            profile: "sleep".into(),
            worker_profile: Some("sleep:5".into()),
            workers: None,
            hops: 2,
            seeds: 2,
            submit_span_s: 1.0,
            duration_s: 0.0,
            drain_expired: false,
        }
    }

    #[test]
    fn json_has_the_promised_fields_and_lost_jobs_are_problems() {
        let mut done = JobRecord::new(0, 0, Duration::ZERO);
        done.submit = SubmitOutcome::Accepted { id: "a".into() };
        done.terminal = Some((Terminal::Completed { png_bytes: 3 }, Duration::from_millis(500)));
        let mut lost = JobRecord::new(1, 1, Duration::from_millis(100));
        lost.submit = SubmitOutcome::Accepted { id: "b".into() };
        let records = [done, lost];
        let mut errors = BTreeMap::new();
        errors.insert("UNAVAILABLE".to_string(), 2);
        let report = Report::build(ReportInput {
            records: &records,
            errors: (errors, BTreeMap::new()),
            faults: &[],
            unexpected_exits: vec![],
            active_jobs_after: Some(1),
            run: run_info(),
        });
        let json = serde_json::to_value(&report).unwrap();
        for key in ["submitted", "completed", "failed", "lost", "duplicates", "checksum_mismatches", "throughput_jobs_per_s", "shed"] {
            assert!(json[key].is_number(), "{key} missing in {json}");
        }
        assert_eq!((json["submitted"].as_u64(), json["completed"].as_u64(), json["lost"].as_u64()), (Some(2), Some(1), Some(1)));
        assert_eq!(json["throughput_jobs_per_s"], 2.0);
        for key in ["p50", "p95", "p99", "max"] {
            assert!(json["latency_ms"][key].is_number());
        }
        assert_eq!(json["errors"]["UNAVAILABLE"], 2);
        assert!(json["stages"].is_object());
        assert_eq!(report.problems.len(), 1);
        assert!(report.markdown().contains("FAILED: 1 job(s) lost"));
    }

    fn job(index: u64, sent_ms: u64, done_ms: u64) -> JobRecord {
        let mut record = JobRecord::new(index, 0, Duration::from_millis(sent_ms));
        record.submit = SubmitOutcome::Accepted { id: format!("j{index}") };
        record.terminal = Some((Terminal::Completed { png_bytes: 1 }, Duration::from_millis(done_ms)));
        record
    }

    #[test]
    fn a_fault_window_lasts_until_its_jobs_finished() {
        // Kill at 5 s: job 1 was in flight and finished at 7.3 s; job 2 came during that
        // recovery; jobs 0 and 3 are clear of it.
        let records = [job(0, 0, 100), job(1, 4900, 7300), job(2, 6000, 6100), job(3, 8000, 8100)];
        let kill = FaultRecord {
            action: FaultAction::KillWorker(fmboost_core::stage::StageKind::Cfm),
            target: "w".into(),
            at: Duration::from_secs(5),
            took: Duration::from_millis(10),
        };
        let report = Report::build(ReportInput {
            records: &records,
            errors: (BTreeMap::new(), BTreeMap::new()),
            faults: &[kill],
            unexpected_exits: vec![],
            active_jobs_after: None,
            run: run_info(),
        });
        assert_eq!(report.faults[0].recovery.in_flight_done_ms, Some(2300.0));
        assert_eq!(report.fault_impact.unwrap().jobs_during_faults, 2);
    }

    #[test]
    fn a_run_without_admitted_jobs_fails() {
        let mut shed = JobRecord::new(0, 0, Duration::ZERO);
        shed.submit = SubmitOutcome::Shed;
        let report = Report::build(ReportInput {
            records: &[shed],
            errors: (BTreeMap::new(), BTreeMap::new()),
            faults: &[],
            unexpected_exits: vec![],
            active_jobs_after: None,
            run: run_info(),
        });
        assert_eq!(report.counts.shed, 1);
        assert_eq!(report.problems, ["no job was admitted: the run measured nothing"]);
    }
}
