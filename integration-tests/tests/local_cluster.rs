//! CI-sized harness runs against a local cluster of the real binaries (redis-server, the
//! coordinator, the three workers): they must have been built next to `fmboost-loadtest`
//! (`cargo build --workspace --bins`, as scripts/test.sh does), and redis-server must be on
//! PATH. Both are checked up front and missing ones fail the test, never skip it.

use std::path::PathBuf;
use std::process::{Command, ExitStatus};

const CLUSTER_BINARIES: [&str; 4] = ["fmboost-coordinator", "fmboost-worker-diffusion", "fmboost-worker-cfm", "fmboost-worker-decoder"];

fn loadtest() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fmboost-loadtest"))
}

fn require_prerequisites() {
    let bin_dir = loadtest().parent().expect("binary directory").to_path_buf();
    let missing: Vec<&str> = CLUSTER_BINARIES.iter().copied().filter(|b| !bin_dir.join(b).is_file()).collect();
    assert!(
        missing.is_empty(),
        "missing {missing:?} in {}: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        bin_dir.display()
    );
    let redis = Command::new("redis-server").arg("--version").output();
    assert!(redis.is_ok_and(|o| o.status.success()), "redis-server is not on PATH (scripts/test.sh installs it)");
}

struct Run {
    status: ExitStatus,
    report: serde_json::Value,
    output: String,
}

fn run_harness(args: &[&str]) -> Run {
    require_prerequisites();
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let output = Command::new(loadtest())
        .args(["--local", "--report", report_path.to_str().unwrap()])
        .args(args)
        .output()
        .expect("running fmboost-loadtest");
    let output_text = format!("{}\n{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    let report = std::fs::read_to_string(&report_path).unwrap_or_else(|e| panic!("no report at {} ({e}); output:\n{output_text}", report_path.display()));
    Run { status: output.status, report: serde_json::from_str(&report).unwrap(), output: output_text }
}

fn count(report: &serde_json::Value, key: &str) -> u64 {
    report[key].as_u64().unwrap_or_else(|| panic!("report has no count {key:?}: {report:#}"))
}

/// ~20 jobs with one CFM worker SIGKILLed mid-run: nothing may be lost and outputs of the same
/// seed must match. `profile` is what jobs name, `worker_profile` what the workers load.
fn ci_run(profile: &str, worker_profile: &str, spec_args: &[&str]) {
    let mut args = vec![
        "--profile",
        profile,
        "--worker-profile",
        worker_profile,
        "--workers",
        "diffusion=1,cfm=2,decoder=1",
        "--jobs",
        "20",
        "--rate",
        "5",
        "--arrival",
        "fixed",
        "--seeds",
        "4",
        "--kill",
        "cfm:at=2s",
        "--worker-idle-timeout-ms",
        "1000",
        "--drain-timeout",
        "60s",
    ];
    args.extend_from_slice(spec_args);
    let run = run_harness(&args);
    let report = &run.report;
    assert!(run.status.success(), "harness failed ({}):\n{}", run.status, run.output);
    assert_eq!(count(report, "submitted"), 20, "{}", run.output);
    assert_eq!(count(report, "lost"), 0, "{}", run.output);
    assert_eq!(count(report, "checksum_mismatches"), 0, "{}", run.output);
    assert_eq!(count(report, "completed"), 20, "{}", run.output);
    assert_eq!(count(report, "duplicates"), 0, "{}", run.output);
    assert_eq!(report["checksums"]["fetched"], 20, "every output was hashed");
    assert_eq!(report["checksums"]["groups_compared"], 4, "all four seeds were compared");
    let faults = report["faults"].as_array().expect("faults list");
    assert_eq!(faults.len(), 1, "one worker kill: {faults:?}");
    assert_eq!(faults[0]["kind"], "kill-worker");
    assert!(report["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
    assert!(run.output.contains("Result: OK"), "{}", run.output);
}

#[test]
fn sleep_profile_run_with_a_worker_kill_loses_nothing() {
    ci_run("sleep", "sleep:20", &[]);
}

/// The same on the real (embedded) tiny models, with few steps to keep CI short.
#[test]
fn tiny_profile_run_with_a_worker_kill_loses_nothing() {
    ci_run("tiny", "tiny", &["--steps", "4", "--cfm-steps", "2"]);
}

/// The negative control: a pool without workers never finishes its jobs; the harness must
/// count them lost and fail.
#[test]
fn jobs_that_never_finish_are_lost_and_fail_the_run() {
    let run = run_harness(&[
        "--profile",
        "sleep",
        "--workers",
        "diffusion=1,cfm=0,decoder=1",
        "--jobs",
        "3",
        "--rate",
        "10",
        "--drain-timeout",
        "2s",
    ]);
    assert_eq!(run.status.code(), Some(1), "{}", run.output);
    assert_eq!(count(&run.report, "submitted"), 3);
    assert_eq!(count(&run.report, "lost"), 3, "{}", run.output);
    assert_eq!(count(&run.report, "completed"), 0);
    assert!(run.report["problems"][0].as_str().unwrap().contains("3 job(s) lost"));
    assert_eq!(run.report["active_jobs_after"], 3, "the coordinator still holds them");
}

#[test]
fn a_missing_binary_directory_is_a_clear_error() {
    let output = Command::new(loadtest())
        .args(["--local", "--bin-dir", "/nonexistent", "--profile", "sleep", "--jobs", "1", "--rate", "1"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not found in /nonexistent") && stderr.contains("--bin-dir"), "{stderr}");
}
