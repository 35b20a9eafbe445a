//! Reading tasks: strict priority across the stage's queues, batch filling within
//! `--batch-wait-ms`, and reclaiming tasks of dead workers (dead-lettering after
//! `--max-deliveries`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use fmboost_proto::internal as ipb;
use prost::Message;
use redis::aio::ConnectionManager;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamPendingCountReply, StreamReadReply};

use super::WorkerContext;
use crate::keys::WORKER_GROUP;

/// Longest single blocking read, so a drain request is noticed promptly.
const MAX_BLOCK: Duration = Duration::from_millis(500);

/// A task entry read from a queue.
pub(crate) struct Delivery {
    pub stream: String,
    pub entry_id: String,
    /// How many times the entry was delivered (1 for a first read).
    pub attempt: u32,
    /// The decoded task, or why it could not be decoded.
    pub task: Result<ipb::StageTask, String>,
}

pub(crate) struct TaskQueue {
    ctx: Arc<WorkerContext>,
    /// Dedicated connection without response timeout for blocking reads.
    blocking: ConnectionManager,
    streams: Vec<String>,
    next_reclaim: Instant,
}

impl TaskQueue {
    pub fn new(ctx: Arc<WorkerContext>, blocking: ConnectionManager) -> Self {
        let streams = ctx.keys.queues(ctx.kind);
        TaskQueue { ctx, blocking, streams, next_reclaim: Instant::now() }
    }

    /// The next tasks to run (empty when none came within a short wait, or when draining):
    /// reclaimed tasks first, then new ones in priority order.
    pub async fn next_batch(&mut self) -> anyhow::Result<Vec<Delivery>> {
        let max = self.ctx.flags.max_batch as usize;
        if Instant::now() >= self.next_reclaim {
            self.next_reclaim = Instant::now() + Duration::from_millis(self.ctx.flags.idle_timeout_ms / 2);
            let reclaimed = self.reclaim(max).await?;
            if !reclaimed.is_empty() {
                return Ok(reclaimed);
            }
        }
        let mut batch = self.read_by_priority(max).await?;
        if batch.is_empty() {
            if self.ctx.shutdown.load(Ordering::SeqCst) {
                return Ok(batch);
            }
            let wait = MAX_BLOCK.min(self.next_reclaim.saturating_duration_since(Instant::now())).max(Duration::from_millis(1));
            batch = self.read_blocking(max, wait).await?;
            if batch.is_empty() {
                return Ok(batch);
            }
        }
        let deadline = Instant::now() + Duration::from_millis(self.ctx.flags.batch_wait_ms);
        while batch.len() < max && !self.ctx.shutdown.load(Ordering::SeqCst) {
            let more = self.read_by_priority(max - batch.len()).await?;
            if !more.is_empty() {
                batch.extend(more);
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            batch.extend(self.read_blocking(max - batch.len(), left.min(MAX_BLOCK)).await?);
        }
        Ok(batch)
    }

    /// Non-blocking reads, highest priority first, up to `count` entries.
    async fn read_by_priority(&mut self, count: usize) -> anyhow::Result<Vec<Delivery>> {
        let mut out = Vec::new();
        for stream in self.streams.clone() {
            if out.len() >= count {
                break;
            }
            let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(WORKER_GROUP)
                .arg(&self.ctx.id)
                .arg("COUNT")
                .arg(count - out.len())
                .arg("STREAMS")
                .arg(&stream)
                .arg(">")
                .query_async(&mut self.blocking)
                .await
                .with_context(|| format!("XREADGROUP {stream}"))?;
            out.extend(self.deliveries(reply));
        }
        Ok(out)
    }

    /// One blocking read across all priorities; Redis answers with whatever arrives first.
    async fn read_blocking(&mut self, count: usize, wait: Duration) -> anyhow::Result<Vec<Delivery>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP").arg(WORKER_GROUP).arg(&self.ctx.id).arg("COUNT").arg(count).arg("BLOCK").arg(wait.as_millis() as u64);
        cmd.arg("STREAMS").arg(&self.streams);
        for _ in &self.streams {
            cmd.arg(">");
        }
        let reply: Option<StreamReadReply> = cmd.query_async(&mut self.blocking).await.context("XREADGROUP BLOCK")?;
        let mut deliveries = self.deliveries(reply);
        let rank = |d: &Delivery| self.streams.iter().position(|s| *s == d.stream);
        deliveries.sort_by_key(rank);
        deliveries.truncate(count.max(1));
        Ok(deliveries)
    }

    fn deliveries(&self, reply: Option<StreamReadReply>) -> Vec<Delivery> {
        let Some(reply) = reply else { return Vec::new() };
        let mut out = Vec::new();
        for key in reply.keys {
            for entry in key.ids {
                out.push(delivery(&key.key, entry, 1));
            }
        }
        self.track(&out);
        out
    }

    fn track(&self, deliveries: &[Delivery]) {
        let mut in_flight = self.ctx.in_flight.lock().expect("in-flight lock");
        in_flight.extend(deliveries.iter().map(|d| (d.stream.clone(), d.entry_id.clone())));
    }

    /// Claims entries idle past the timeout (their worker died). Those delivered too often
    /// are dead-lettered and their job failed; the rest are returned to run again.
    async fn reclaim(&mut self, count: usize) -> anyhow::Result<Vec<Delivery>> {
        let mut conn = self.ctx.conn.clone();
        let mut out = Vec::new();
        for stream in self.streams.clone() {
            if out.len() >= count {
                break;
            }
            let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(&stream)
                .arg(WORKER_GROUP)
                .arg(&self.ctx.id)
                .arg(self.ctx.flags.idle_timeout_ms)
                .arg("0-0")
                .arg("COUNT")
                .arg(count - out.len())
                .query_async(&mut conn)
                .await
                .with_context(|| format!("XAUTOCLAIM {stream}"))?;
            for entry in reply.claimed {
                let pending: StreamPendingCountReply = redis::cmd("XPENDING")
                    .arg(&stream)
                    .arg(WORKER_GROUP)
                    .arg(&entry.id)
                    .arg(&entry.id)
                    .arg(1)
                    .query_async(&mut conn)
                    .await
                    .context("XPENDING")?;
                let attempt = pending.ids.first().map_or(1, |p| p.times_delivered as u32);
                let delivery = delivery(&stream, entry, attempt);
                tracing::warn!(stream = %stream, entry = %delivery.entry_id, attempt, "reclaimed a task from a dead worker");
                if attempt > self.ctx.flags.max_deliveries {
                    let reason = format!(
                        "dead-lettered after {} deliveries (its workers died or timed out)",
                        self.ctx.flags.max_deliveries
                    );
                    super::runner::dead_letter(&self.ctx, &delivery, &reason).await?;
                } else {
                    out.push(delivery);
                }
            }
        }
        self.track(&out);
        Ok(out)
    }
}

fn delivery(stream: &str, entry: StreamId, attempt: u32) -> Delivery {
    let task = match entry.map.get("task") {
        Some(redis::Value::BulkString(bytes)) => ipb::StageTask::decode(bytes.as_slice()).map_err(|e| format!("undecodable task: {e}")),
        _ => Err("task entry without a `task` field".to_string()),
    };
    Delivery { stream: stream.to_string(), entry_id: entry.id, attempt, task }
}
