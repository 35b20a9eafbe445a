use super::*;
use crate::record::StageSample;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn accepted(index: u64, id: &str, intended: u64) -> JobRecord {
    let mut record = JobRecord::new(index, index % 2, ms(intended));
    record.submit = SubmitOutcome::Accepted { id: id.to_string() };
    record
}

fn completed(index: u64, id: &str, intended: u64, done: u64) -> JobRecord {
    let mut record = accepted(index, id, intended);
    record.terminal = Some((Terminal::Completed { png_bytes: 10 }, ms(done)));
    record
}

#[test]
fn a_job_without_a_terminal_state_is_lost() {
    let mut vanished = accepted(2, "c", 0);
    vanished.terminal = Some((Terminal::Vanished, ms(50)));
    let mut failed = accepted(3, "d", 0);
    failed.terminal = Some((Terminal::Failed { reason: "dead-lettered".into() }, ms(70)));
    let mut shed = JobRecord::new(4, 0, ms(0));
    shed.submit = SubmitOutcome::Shed;
    let mut unanswered = JobRecord::new(5, 0, ms(0));
    unanswered.submit = SubmitOutcome::Unacknowledged { code: "UNAVAILABLE".into() };
    let records = vec![completed(0, "a", 0, 100), accepted(1, "b", 0), vanished, failed, shed, unanswered];
    let counts = counts(&records);
    assert_eq!(
        counts,
        Counts {
            attempted: 6,
            submitted: 4,
            completed: 1,
            failed: 1,
            cancelled: 0,
            lost: 2,
            shed: 1,
            rejected: 0,
            unacknowledged: 1,
            duplicates: 0
        }
    );
    assert_eq!(failure_reasons(&records).get("dead-lettered"), Some(&1));
    assert_eq!(records[0].latency(), Some(ms(100)));
    assert_eq!(records[3].latency(), None, "only completed jobs have a latency");
}

#[test]
fn duplicates_count_shared_ids_and_failed_probes() {
    let same_as_other = accepted(1, "c", 0);
    let shares = accepted(2, "c", 0);
    let mut probed = accepted(3, "d", 0);
    probed.probe = Some(ProbeOutcome::DifferentId("e".into()));
    let mut fine = accepted(4, "f", 0);
    fine.probe = Some(ProbeOutcome::SameId);
    let shares_too = accepted(5, "c", 0);
    assert_eq!(counts(&[same_as_other, shares, probed, fine, shares_too]).duplicates, 3);
}

#[test]
fn checksums_must_agree_within_a_seed() {
    let with = |index: u64, checksum: u32| {
        let mut record = completed(index, &format!("j{index}"), 0, 10);
        record.checksum = Some(checksum);
        record.png_len = Some(if index == 3 { 11 } else { 10 });
        record
    };
    // Seeds alternate 0, 1 (index % 2). Seed 0: 7, 7, 9 → one mismatch; seed 1: 5, 5.
    let records = vec![with(0, 7), with(1, 5), with(2, 7), with(3, 5), with(4, 9)];
    assert_eq!(checksums(&records), Checksums { fetched: 5, groups_compared: 2, mismatches: 1, fetch_errors: 0, size_mismatches: 1 });
    assert_eq!(checksums(&records[..4]).mismatches, 0);
}

#[test]
fn distribution_percentiles_in_milliseconds() {
    let d = distribution((1..=100).map(ms));
    assert_eq!((d.count, d.max), (100, 100.0));
    for (value, expected) in [(d.p50, 50.0), (d.p95, 95.0), (d.p99, 99.0), (d.mean, 50.5)] {
        assert!((value - expected).abs() <= expected * 0.001, "{value} vs {expected}");
    }
    let json = serde_json::to_value(d).unwrap();
    assert_eq!(json["p95"], d.p95);
    assert_eq!(json["max"], 100.0);
    assert_eq!(distribution(std::iter::empty()).count, 0);
}

#[test]
fn stage_hops_follow_the_pipeline() {
    let mut record = completed(0, "a", 0, 100);
    record.accepted_unix_ms = Some(1000);
    let sample = |kind, hop, finished| StageSample { kind, hop, queue_wait_ms: 1, service_ms: 12, finished_unix_ms: finished };
    // hops = 2: diffusion, cfm 1, cfm 2, decoder; cfm 1 was missed.
    record.stages = vec![sample(StageKind::Diffusion, 0, 1020), sample(StageKind::Cfm, 2, 1070), sample(StageKind::Decoder, 0, 1090)];
    let timings = stage_timings(&[record.clone()], 2);
    assert_eq!(timings["diffusion"].hop_ms.p50, 20.0);
    assert_eq!(timings["cfm"].hop_ms.count, 0, "cfm 2 has no observed predecessor");
    assert_eq!(timings["cfm"].service_ms.count, 1);
    assert_eq!(timings["decoder"].hop_ms.p50, 20.0);
    // Overhead only for jobs with every stage seen.
    assert_eq!(routing_overhead(&[record.clone()], 4).count, 0);
    assert_eq!(routing_overhead(&[record], 3).p50, 64.0, "100 ms end to end less 3 × 12 ms of service");
}

#[test]
fn recovery_after_a_fault() {
    // One completion every 100 ms until 5 s, a gap until 7 s (the fault at 5 s), then again.
    let mut records: Vec<JobRecord> =
        (0..100).filter(|i| !(50..70).contains(i)).map(|i| completed(i, &format!("j{i}"), (i * 100).saturating_sub(50), i * 100)).collect();
    // Two jobs in flight at the fault, done at 7.0 and 7.3 s.
    records.push(completed(200, "x", 4900, 7000));
    records.push(completed(201, "y", 4950, 7300));
    let recovery = recovery(&records, ms(5000));
    assert_eq!(recovery.jobs_in_flight, 2);
    assert_eq!(recovery.next_completion_ms, Some(2000.0));
    assert_eq!(recovery.in_flight_done_ms, Some(2300.0));
    // Baseline 10/s over the 5 s before; 1 s windows need 5 completions: [6.4 s, 7.4 s) has
    // 7.0 (twice), 7.1, 7.2, 7.3 (twice).
    assert_eq!(recovery.throughput_ms, Some(1400.0));

    // A job still unfinished: the in-flight jobs never all completed.
    records.push(accepted(202, "z", 4990));
    assert_eq!(super::recovery(&records, ms(5000)).in_flight_done_ms, None);
}

#[test]
fn p99_inflation_compares_jobs_spanning_a_fault() {
    // Latencies that are exact histogram buckets: 8 ms and 1024 ms.
    let mut records: Vec<JobRecord> = (0..100).map(|i| completed(i, &format!("j{i}"), i * 100, i * 100 + 8)).collect();
    records.retain(|r| r.intended != ms(5000));
    records.push(completed(100, "slow", 4990, 4990 + 1024));
    let impact = fault_impact(&records, &[(ms(5000), ms(5000))]);
    assert_eq!(impact.jobs_during_faults, 1);
    assert_eq!(impact.latency_during_faults_ms.p99, 1024.0);
    assert_eq!(impact.latency_other_ms.p99, 8.0);
    assert_eq!(impact.p99_inflation, Some(128.0));
    // A window (a restart's downtime) also takes in the jobs sent during it.
    let impact = fault_impact(&records, &[(ms(5000), ms(5150))]);
    assert_eq!(impact.jobs_during_faults, 2, "the slow job and the one sent at 5.1 s");
}
