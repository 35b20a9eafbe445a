//! Queue positions and the cluster's per-stage status.

use fmboost_core::keys::WORKER_GROUP;
use fmboost_core::now_unix_ms;
use fmboost_core::redis_conn::undelivered;
use fmboost_core::spec::Priority;
use fmboost_core::stage::StageKind;
use fmboost_proto::v1 as pb;

use crate::error::ApiError;
use crate::metrics::CoordinatorMetrics;
use crate::store::{JobRecord, JobState, JobStore};

fn internal(err: anyhow::Error) -> ApiError {
    ApiError::Internal(err)
}

/// Tasks ahead of the job's queued task: every undelivered task of higher priority in its
/// stage, plus those before it in its own queue. 0 once a worker has read it.
pub async fn queue_position(store: &JobStore, record: &JobRecord) -> Result<u64, ApiError> {
    if record.state != JobState::Queued || record.task_entry.is_empty() {
        return Ok(0);
    }
    let mut conn = store.conn.clone();
    let mut ahead = 0;
    for priority in Priority::BY_URGENCY.into_iter().filter(|&p| p > record.spec.priority) {
        ahead += undelivered(&mut conn, &store.keys.queue(record.at.kind, priority), WORKER_GROUP).await.map_err(internal)?;
    }
    let info: redis::streams::StreamInfoGroupsReply =
        redis::cmd("XINFO").arg("GROUPS").arg(&record.task_stream).query_async(&mut conn).await?;
    let last_delivered = info.groups.iter().find(|g| g.name == WORKER_GROUP).map(|g| g.last_delivered_id.clone());
    let Some(last_delivered) = last_delivered else { return Ok(ahead) };
    if stream_id_le(&record.task_entry, &last_delivered) {
        return Ok(ahead);
    }
    let before: Vec<redis::Value> = redis::cmd("XRANGE")
        .arg(&record.task_stream)
        .arg(format!("({last_delivered}"))
        .arg(format!("({}", record.task_entry))
        .query_async(&mut conn)
        .await?;
    Ok(ahead + before.len() as u64)
}

/// Compares stream ids `ms-seq` numerically.
fn stream_id_le(a: &str, b: &str) -> bool {
    let parse = |id: &str| {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        (ms.parse::<u64>().unwrap_or(0), seq.parse::<u64>().unwrap_or(0))
    };
    parse(a) <= parse(b)
}

/// Per-stage queue depth, in-flight tasks, live workers and dead letters; updates the gauges.
pub async fn cluster_status(store: &JobStore, metrics: &CoordinatorMetrics) -> Result<Vec<pb::StageStatus>, ApiError> {
    let mut conn = store.conn.clone();
    let now = now_unix_ms();
    let mut stages = Vec::new();
    for kind in StageKind::ALL {
        let mut queued = 0;
        let mut in_flight = 0;
        for stream in store.keys.queues(kind) {
            queued += undelivered(&mut conn, &stream, WORKER_GROUP).await.map_err(internal)?;
            let summary: redis::Value = redis::cmd("XPENDING").arg(&stream).arg(WORKER_GROUP).query_async(&mut conn).await?;
            in_flight += pending_count(&summary);
        }
        let live_workers: u64 = redis::cmd("ZCOUNT").arg(store.keys.workers(kind)).arg(now).arg("+inf").query_async(&mut conn).await?;
        let dead_letters: u64 = redis::cmd("XLEN").arg(store.keys.dead_letters(kind)).query_async(&mut conn).await?;
        let label = [kind.name()];
        metrics.queue_depth.with_label_values(&label).set(queued as i64);
        metrics.in_flight.with_label_values(&label).set(in_flight as i64);
        metrics.live_workers.with_label_values(&label).set(live_workers as i64);
        stages.push(pb::StageStatus { stage: kind.to_proto() as i32, queued, in_flight, live_workers: live_workers as u32, dead_letters });
    }
    metrics.active_jobs.set(store.active_jobs().await? as i64);
    Ok(stages)
}

/// Live workers per stage of each profile the coordinator serves. A stage no live worker
/// serves is reported, not refused: its pool may be scaled from zero on the backlog.
pub async fn profile_status(store: &JobStore, profiles: &[String]) -> Result<Vec<pb::ProfileStatus>, ApiError> {
    let mut conn = store.conn.clone();
    let now = now_unix_ms();
    let mut statuses = Vec::with_capacity(profiles.len());
    for profile in profiles {
        let mut stages = Vec::with_capacity(StageKind::ALL.len());
        for kind in StageKind::ALL {
            let live: u32 = redis::cmd("ZCOUNT").arg(store.keys.profile_workers(kind, profile)).arg(now).arg("+inf").query_async(&mut conn).await?;
            stages.push(pb::ProfileStageStatus { stage: kind.to_proto() as i32, live_workers: live });
        }
        statuses.push(pb::ProfileStatus { profile: profile.clone(), stages });
    }
    Ok(statuses)
}

/// The count in an XPENDING summary reply `[count, min, max, consumers]`.
fn pending_count(summary: &redis::Value) -> u64 {
    match summary {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(count)) => *count as u64,
            _ => 0,
        },
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_stream_ids_numerically() {
        assert!(stream_id_le("9-5", "10-0"));
        assert!(stream_id_le("10-1", "10-1"));
        assert!(!stream_id_le("10-2", "10-1"));
    }
}
