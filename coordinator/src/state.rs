//! The job state machine, driven by the workers' stage events. Events are read through the
//! `coordinators` consumer group, so replicas share them; entries left pending by a dead
//! replica are reclaimed after `--event-claim-idle-ms`. Every transition is a script that
//! checks the job is still at the event's stage, so duplicate or late events change nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use fmboost_core::keys::COORDINATOR_GROUP;
use fmboost_core::now_unix_ms;
use fmboost_core::reason::client_reason;
use fmboost_core::stage::{StageKind, StageRef};
use fmboost_proto::{internal as ipb, v1 as pb};
use prost::Message;
use redis::aio::ConnectionManager;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};

use crate::error::ApiError;
use crate::metrics::CoordinatorMetrics;
use crate::status;
use crate::store::{JobStore, Transition};

pub struct StateMachine {
    pub store: JobStore,
    pub metrics: CoordinatorMetrics,
    pub consumer: String,
    pub claim_idle_ms: u64,
}

impl StateMachine {
    /// Consumes events until `stop` is raised.
    pub async fn run(self: Arc<Self>, mut blocking: ConnectionManager, stop: Arc<AtomicBool>) {
        let events = self.store.keys.events();
        let mut next_claim = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            let entries = if Instant::now() >= next_claim {
                next_claim = Instant::now() + Duration::from_millis(self.claim_idle_ms / 2);
                self.reclaim(&events).await
            } else {
                self.read(&mut blocking, &events).await
            };
            match entries {
                Ok(entries) => {
                    for entry in entries {
                        self.handle_entry(&events, entry).await;
                    }
                }
                Err(err) => {
                    tracing::error!("reading events: {err:#}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn read(&self, blocking: &mut ConnectionManager, events: &str) -> anyhow::Result<Vec<StreamId>> {
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(COORDINATOR_GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(100)
            .arg("BLOCK")
            .arg(500)
            .arg("STREAMS")
            .arg(events)
            .arg(">")
            .query_async(blocking)
            .await
            .context("XREADGROUP events")?;
        Ok(reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids).collect())
    }

    /// Events another (dead) replica, or this one after an error, left unacknowledged.
    async fn reclaim(&self, events: &str) -> anyhow::Result<Vec<StreamId>> {
        let mut conn = self.store.conn.clone();
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(events)
            .arg(COORDINATOR_GROUP)
            .arg(&self.consumer)
            .arg(self.claim_idle_ms)
            .arg("0-0")
            .arg("COUNT")
            .arg(100)
            .query_async(&mut conn)
            .await
            .context("XAUTOCLAIM events")?;
        if !reply.claimed.is_empty() {
            tracing::info!(count = reply.claimed.len(), "reclaimed unacknowledged events");
        }
        Ok(reply.claimed)
    }

    async fn handle_entry(&self, events: &str, entry: StreamId) {
        let event = match entry.map.get("event") {
            Some(redis::Value::BulkString(bytes)) => ipb::StageEvent::decode(bytes.as_slice()).map_err(|e| e.to_string()),
            _ => Err("no `event` field".to_string()),
        };
        let handled = match event {
            Ok(event) => self.handle(event).await,
            Err(reason) => {
                tracing::error!(entry = %entry.id, "dropping an undecodable event: {reason}");
                Ok(())
            }
        };
        match handled {
            Ok(()) => {
                let mut conn = self.store.conn.clone();
                let mut pipe = redis::pipe();
                pipe.cmd("XACK").arg(events).arg(COORDINATOR_GROUP).arg(&entry.id).ignore();
                pipe.cmd("XDEL").arg(events).arg(&entry.id).ignore();
                if let Err(err) = pipe.query_async::<()>(&mut conn).await {
                    tracing::warn!(entry = %entry.id, "acknowledging an event: {err}");
                }
            }
            // Left pending: reclaimed and handled again after the claim timeout.
            Err(err) => tracing::error!(entry = %entry.id, "handling an event: {err}"),
        }
    }

    async fn handle(&self, event: ipb::StageEvent) -> Result<(), ApiError> {
        use ipb::stage_event::Kind;
        let Some(kind) = StageKind::from_proto(event.stage) else {
            tracing::error!(job = %event.job_id, "event with unknown stage {}", event.stage);
            return Ok(());
        };
        let at = StageRef { kind, hop: event.hop };
        let now = now_unix_ms();
        let stage_label = [kind.name()];
        match event.kind {
            Some(Kind::Started(_)) => {
                if self.store.start(&event.job_id, at, now).await? == Transition::Applied {
                    let started = pb::StageStarted { at: Some(at.to_proto()), worker: event.worker, attempt: event.attempt };
                    self.publish(&event.job_id, pb::job_event::Event::StageStarted(started)).await;
                }
            }
            Some(Kind::Done(done)) => {
                let Some(record) = self.store.get(&event.job_id).await? else {
                    tracing::warn!(job = %event.job_id, "done event for an expired job");
                    return Ok(());
                };
                let next = record.spec.next_stage(at);
                if self.store.advance(&record, at, next, &done.output_blob, done.output_bytes, now).await? == Transition::Stale {
                    return Ok(());
                }
                self.metrics.queue_wait_seconds.with_label_values(&stage_label).observe(done.queue_wait_ms as f64 / 1000.0);
                self.metrics.service_seconds.with_label_values(&stage_label).observe(done.service_ms as f64 / 1000.0);
                self.metrics.batch_size.with_label_values(&stage_label).observe(done.batch_size as f64);
                let finished = pb::StageFinished {
                    at: Some(at.to_proto()),
                    queue_wait_ms: done.queue_wait_ms,
                    service_ms: done.service_ms,
                    batch_size: done.batch_size,
                };
                self.publish(&event.job_id, pb::job_event::Event::StageFinished(finished)).await;
                match next {
                    Some(next) => {
                        let position = match self.store.get(&event.job_id).await? {
                            Some(record) => status::queue_position(&self.store, &record).await?,
                            None => 0,
                        };
                        let queued = pb::Queued { at: Some(next.to_proto()), position };
                        self.publish(&event.job_id, pb::job_event::Event::Queued(queued)).await;
                    }
                    None => {
                        self.metrics.jobs.with_label_values(&["completed"]).inc();
                        let completed = pb::Completed { png_bytes: done.output_bytes };
                        self.publish(&event.job_id, pb::job_event::Event::Completed(completed)).await;
                    }
                }
            }
            Some(Kind::Failed(failed)) => {
                // Workers send one line already; older ones may not.
                let reason = client_reason(&failed.reason);
                if self.store.fail(&event.job_id, at, &reason, now).await? == Transition::Applied {
                    tracing::warn!(job = %event.job_id, "job failed: {reason}");
                    self.metrics.jobs.with_label_values(&["failed"]).inc();
                    self.publish(&event.job_id, pb::job_event::Event::Failed(pb::Failed { reason })).await;
                }
            }
            // The Cancel call already moved the job to cancelled; the worker only confirms.
            Some(Kind::Cancelled(_)) => tracing::info!(job = %event.job_id, "worker stopped a cancelled task at {at}"),
            None => tracing::error!(job = %event.job_id, "event without a kind"),
        }
        Ok(())
    }

    async fn publish(&self, job_id: &str, event: pb::job_event::Event) {
        publish(&self.store, job_id, event).await;
    }
}

/// Sends a `JobEvent` to the job's watchers (on every replica). Watchers also poll the record,
/// so a lost message delays an update but never loses a terminal state.
pub async fn publish(store: &JobStore, job_id: &str, event: pb::job_event::Event) {
    let message = pb::JobEvent { job_id: job_id.to_string(), time_unix_ms: now_unix_ms(), event: Some(event) };
    let mut conn = store.conn.clone();
    let published: redis::RedisResult<()> =
        redis::cmd("PUBLISH").arg(store.keys.watch_channel(job_id)).arg(message.encode_to_vec()).query_async(&mut conn).await;
    if let Err(err) = published {
        tracing::warn!(job = %job_id, "publishing a job event: {err}");
    }
}
