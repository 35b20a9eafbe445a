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
use crate::store::{Advanced, JobStore, Transition};

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
                Ok(entries) => self.handle_batch(&events, entries).await,
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

    /// Handles a read batch: events of different jobs run concurrently, each job's events one
    /// at a time in stream order (so a job's Started is never applied after its Done), and
    /// every handled entry is acknowledged in one pipelined XACK + XDEL. Duplicates are
    /// harmless because every transition re-checks the job's stage in its script; across
    /// replicas the same holds, since a replica only sees the entries delivered to it.
    async fn handle_batch(&self, events: &str, entries: Vec<StreamId>) {
        if entries.is_empty() {
            return;
        }
        let mut by_job: Vec<(String, Vec<(String, ipb::StageEvent)>)> = Vec::new();
        let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        let mut handled_ids: Vec<String> = Vec::new();
        for entry in entries {
            let event = match entry.map.get("event") {
                Some(redis::Value::BulkString(bytes)) => ipb::StageEvent::decode(bytes.as_slice()).map_err(|e| e.to_string()),
                _ => Err("no `event` field".to_string()),
            };
            match event {
                Ok(event) => {
                    let slot = *index.entry(event.job_id.clone()).or_insert_with(|| {
                        by_job.push((event.job_id.clone(), Vec::new()));
                        by_job.len() - 1
                    });
                    by_job[slot].1.push((entry.id, event));
                }
                Err(reason) => {
                    tracing::error!(entry = %entry.id, "dropping an undecodable event: {reason}");
                    handled_ids.push(entry.id);
                }
            }
        }
        let per_job = by_job.into_iter().map(|(_, job_events)| async move {
            let mut done = Vec::with_capacity(job_events.len());
            for (id, event) in job_events {
                match self.handle(event).await {
                    Ok(()) => done.push(id),
                    Err(err) => {
                        // Left pending (reclaimed and handled again after the claim timeout);
                        // the job's later events wait for it, so its order holds.
                        tracing::error!(entry = %id, "handling an event: {err}");
                        break;
                    }
                }
            }
            done
        });
        for done in futures::future::join_all(per_job).await {
            handled_ids.extend(done);
        }
        self.acknowledge(events, &handled_ids).await;
    }

    async fn acknowledge(&self, events: &str, ids: &[String]) {
        if ids.is_empty() {
            return;
        }
        let mut conn = self.store.conn.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("XACK").arg(events).arg(COORDINATOR_GROUP).arg(ids).ignore();
        pipe.cmd("XDEL").arg(events).arg(ids).ignore();
        if let Err(err) = pipe.query_async::<()>(&mut conn).await {
            tracing::warn!(count = ids.len(), "acknowledging events: {err}");
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
                let advanced = self.store.advance(&record, at, next, &done.output_blob, done.output_bytes, now).await?;
                if matches!(advanced, Advanced::Stale) {
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
                let follow_up = match advanced {
                    // The script returned the new entry: no read back of the record.
                    Advanced::Queued(queued_record) => {
                        let position = status::queue_position(&self.store, &queued_record).await?;
                        let at = queued_record.at;
                        pb::job_event::Event::Queued(pb::Queued { at: Some(at.to_proto()), position })
                    }
                    Advanced::Completed => {
                        self.metrics.jobs.with_label_values(&["completed"]).inc();
                        pb::job_event::Event::Completed(pb::Completed { png_bytes: done.output_bytes })
                    }
                    Advanced::Stale => unreachable!("returned above"),
                };
                // Both messages in one pipelined round trip, in order.
                publish_all(&self.store, &event.job_id, vec![pb::job_event::Event::StageFinished(finished), follow_up]).await;
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
    publish_all(store, job_id, vec![event]).await;
}

/// Publishes `events` in order, in one pipelined round trip.
pub async fn publish_all(store: &JobStore, job_id: &str, events: Vec<pb::job_event::Event>) {
    let channel = store.keys.watch_channel(job_id);
    let time_unix_ms = now_unix_ms();
    let mut pipe = redis::pipe();
    for event in events {
        let message = pb::JobEvent { job_id: job_id.to_string(), time_unix_ms, event: Some(event) };
        pipe.cmd("PUBLISH").arg(&channel).arg(message.encode_to_vec()).ignore();
    }
    let mut conn = store.conn.clone();
    if let Err(err) = pipe.query_async::<()>(&mut conn).await {
        tracing::warn!(job = %job_id, "publishing job events: {err}");
    }
}
