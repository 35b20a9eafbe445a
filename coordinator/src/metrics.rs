//! The coordinator's Prometheus metrics.

use fmboost_core::metrics::{batch_buckets, counter, duration_buckets, histogram};
use prometheus::{HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

#[derive(Clone)]
pub struct CoordinatorMetrics {
    pub registry: Registry,
    /// Finished jobs by outcome (completed, failed, cancelled).
    pub jobs: IntCounterVec,
    /// Submissions by result (admitted, duplicate, rejected_invalid, rejected_full).
    pub submissions: IntCounterVec,
    pub queue_depth: IntGaugeVec,
    pub in_flight: IntGaugeVec,
    pub live_workers: IntGaugeVec,
    pub active_jobs: IntGauge,
    pub queue_wait_seconds: HistogramVec,
    pub service_seconds: HistogramVec,
    pub batch_size: HistogramVec,
}

fn gauge_vec(registry: &Registry, name: &str, help: &str) -> IntGaugeVec {
    let gauge = IntGaugeVec::new(Opts::new(name, help), &["stage"]).expect("valid gauge");
    registry.register(Box::new(gauge.clone())).expect("metric registered once");
    gauge
}

impl CoordinatorMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let active_jobs = IntGauge::new("fmboost_active_jobs", "Jobs admitted and not yet finished").expect("valid gauge");
        registry.register(Box::new(active_jobs.clone())).expect("metric registered once");
        CoordinatorMetrics {
            jobs: counter(&registry, "fmboost_jobs_total", "Finished jobs by outcome", &["outcome"]),
            submissions: counter(&registry, "fmboost_submissions_total", "Submit calls by result", &["result"]),
            queue_depth: gauge_vec(&registry, "fmboost_queue_depth", "Tasks waiting for a worker, by stage"),
            in_flight: gauge_vec(&registry, "fmboost_in_flight", "Tasks read by a worker and not yet finished, by stage"),
            live_workers: gauge_vec(&registry, "fmboost_live_workers", "Workers with a recent heartbeat, by stage"),
            active_jobs,
            queue_wait_seconds: histogram(
                &registry,
                "fmboost_stage_queue_wait_seconds",
                "Time from enqueue to the start of a stage task",
                &["stage"],
                duration_buckets(),
            ),
            service_seconds: histogram(
                &registry,
                "fmboost_stage_service_seconds",
                "Compute time of a stage task's batch",
                &["stage"],
                duration_buckets(),
            ),
            batch_size: histogram(&registry, "fmboost_stage_batch_size", "Tasks per worker batch", &["stage"], batch_buckets()),
            registry,
        }
    }
}
