//! Running delivered tasks: checks before the start (cancelled, expired, wrong profile, input
//! blob missing or corrupt), batches on a blocking thread with step progress and cancellation,
//! and the report of each task (output blob with a TTL + event + XACK in one transaction).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use fmboost_proto::{internal as ipb, v1 as pb};
use prost::Message;

use super::queue::Delivery;
use super::WorkerContext;
use crate::keys::WORKER_GROUP;
use crate::now_unix_ms;
use crate::reason::client_reason;
use crate::spec::JobSpec;
use crate::stage::{StageError, StageInput, StageKind, StageOutput, StageRef, StageTask};
use crate::tensor::WireTensor;

/// A task ready to run.
struct Prepared {
    stream: String,
    entry_id: String,
    attempt: u32,
    at: StageRef,
    queue_wait_ms: u64,
    task: StageTask,
}

/// Runs a batch of deliveries: each is checked, groups with equal batch keys run together.
pub(crate) async fn process(ctx: &Arc<WorkerContext>, deliveries: Vec<Delivery>) {
    let mut ready = Vec::new();
    for delivery in deliveries {
        let (stream, entry_id) = (delivery.stream.clone(), delivery.entry_id.clone());
        match prepare(ctx, delivery).await {
            Ok(Some(prepared)) => ready.push(prepared),
            Ok(None) => {}
            Err(err) => {
                // Left pending and untracked: it goes idle and is reclaimed and retried.
                tracing::error!(%stream, entry = %entry_id, "preparing a task: {err:#}");
                untrack(ctx, &stream, &entry_id);
            }
        }
    }
    let mut groups: Vec<(String, Vec<Prepared>)> = Vec::new();
    for prepared in ready {
        let key = ctx.executor.batch_key(&prepared.task);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, group)) => group.push(prepared),
            None => groups.push((key, vec![prepared])),
        }
    }
    for (_, group) in groups {
        run_group(ctx, group).await;
    }
}

/// Checks a delivery; Ok(None) when it was settled without running (and acknowledged).
async fn prepare(ctx: &Arc<WorkerContext>, delivery: Delivery) -> anyhow::Result<Option<Prepared>> {
    let task = match &delivery.task {
        Ok(task) => task.clone(),
        Err(reason) => {
            dead_letter(ctx, &delivery, reason).await?;
            return Ok(None);
        }
    };
    let at = StageRef { kind: ctx.kind, hop: task.hop };
    let settle = |kind: ipb::stage_event::Kind| settle(ctx, &delivery.stream, &delivery.entry_id, &task.job_id, at, delivery.attempt, kind, None);
    let failed = |reason: String| ipb::stage_event::Kind::Failed(ipb::TaskFailed { reason: client_reason(&reason) });
    if StageKind::from_proto(task.stage) != Some(ctx.kind) {
        settle(failed(format!("task for stage {} in the {} queue", task.stage, ctx.kind))).await?;
        return Ok(None);
    }
    let spec = match task.spec.clone().map(JobSpec::from_admitted) {
        Some(Ok(spec)) => spec,
        Some(Err(err)) => return settle(failed(format!("task spec: {err}"))).await.map(|_| None),
        None => return settle(failed("task without a spec".into())).await.map(|_| None),
    };
    if spec.profile != ctx.executor.profile() {
        let reason = format!("job needs profile {:?}, this {} worker serves {:?}", spec.profile, ctx.kind, ctx.executor.profile());
        return settle(failed(reason)).await.map(|_| None);
    }
    let mut conn = ctx.conn.clone();
    let cancelled: bool = redis::cmd("EXISTS").arg(ctx.keys.cancel_flag(&task.job_id)).query_async(&mut conn).await?;
    if cancelled {
        ctx.metrics.tasks.with_label_values(&[ctx.kind.name(), "skipped_cancelled"]).inc();
        return settle(ipb::stage_event::Kind::Cancelled(ipb::TaskCancelled {})).await.map(|_| None);
    }
    if spec.deadline_unix_ms.is_some_and(|deadline| deadline <= now_unix_ms()) {
        ctx.metrics.tasks.with_label_values(&[ctx.kind.name(), "skipped_expired"]).inc();
        return settle(failed(format!("deadline passed before the {at} stage started"))).await.map(|_| None);
    }
    let input = match load_input(ctx, &task.input_blob).await? {
        Ok(input) => input,
        Err(reason) => return settle(failed(reason)).await.map(|_| None),
    };
    let queue_wait_ms = now_unix_ms().saturating_sub(task.enqueued_unix_ms);
    ctx.metrics.queue_wait_seconds.with_label_values(&[ctx.kind.name()]).observe(queue_wait_ms as f64 / 1000.0);
    let started = ipb::stage_event::Kind::Started(ipb::Started { queue_wait_ms });
    let event = stage_event(ctx, &task.job_id, at, delivery.attempt, started);
    let _: String = redis::cmd("XADD").arg(ctx.keys.events()).arg("*").arg("event").arg(event).query_async(&mut conn).await?;
    let job_id = task.job_id.clone();
    Ok(Some(Prepared {
        stream: delivery.stream,
        entry_id: delivery.entry_id,
        attempt: delivery.attempt,
        at,
        queue_wait_ms,
        task: StageTask { job_id, spec, hop: task.hop, input },
    }))
}

/// Reads the task's input blob. The outer error is Redis failing; the inner one a task failure.
async fn load_input(ctx: &WorkerContext, key: &str) -> anyhow::Result<Result<StageInput, String>> {
    if key.is_empty() {
        return Ok(Ok(StageInput::Text));
    }
    let bytes = ctx.blobs.get(key).await.with_context(|| format!("reading input blob {key} from {}", ctx.blobs.describe()))?;
    let Some(bytes) = bytes else {
        return Ok(Err(format!("input blob {key} is missing (expired or never written)")));
    };
    let payload = match ipb::BlobPayload::decode(bytes.as_slice()) {
        Ok(payload) => payload.payload,
        Err(err) => return Ok(Err(format!("input blob {key}: undecodable: {err}"))),
    };
    Ok(match payload {
        Some(ipb::blob_payload::Payload::Latent(tensor)) => {
            WireTensor::from_proto(tensor).map(StageInput::Latent).map_err(|err| format!("input blob {key}: {err}"))
        }
        Some(ipb::blob_payload::Payload::Image(image)) => Ok(StageInput::Image(image)),
        None => Err(format!("input blob {key} is empty")),
    })
}

async fn run_group(ctx: &Arc<WorkerContext>, group: Vec<Prepared>) {
    let size = group.len();
    let flags: Vec<Arc<AtomicBool>> = group.iter().map(|p| ctx.cancels.register(&p.task.job_id)).collect();
    let tasks: Vec<StageTask> = group.iter().map(|p| p.task.clone()).collect();
    let targets: Vec<(String, StageRef)> = group.iter().map(|p| (p.task.job_id.clone(), p.at)).collect();
    let (progress_tx, progress_rx) = tokio::sync::mpsc::unbounded_channel();
    let publisher = tokio::spawn(publish_progress(ctx.clone(), targets, progress_rx));
    let executor = ctx.executor.clone();
    let started = Instant::now();
    let batch = tokio::task::spawn_blocking(move || {
        let mut progress = |index: usize, step: u32, total: u32| {
            // The receiver lives until the batch ends; a send error only means it was dropped.
            let _ = progress_tx.send((index, step, total));
            !flags[index].load(Ordering::SeqCst)
        };
        executor.run_batch(&tasks, &mut progress)
    })
    .await;
    let service_ms = started.elapsed().as_millis() as u64;
    // The sender was dropped with the closure: the publisher drains and ends.
    if let Err(err) = publisher.await {
        tracing::warn!("progress publisher: {err}");
    }
    let stage = ctx.kind.name();
    ctx.metrics.service_seconds.with_label_values(&[stage]).observe(service_ms as f64 / 1000.0);
    ctx.metrics.batch_size.with_label_values(&[stage]).observe(size as f64);
    let results: Vec<Result<StageOutput, StageError>> = match batch {
        Ok(results) if results.len() == size => results,
        Ok(results) => vec![Err(StageError::Failed(format!("executor returned {} results for {size} tasks", results.len()))); size],
        Err(err) => vec![Err(StageError::Failed(format!("executor panicked: {err}"))); size],
    };
    for (prepared, result) in group.into_iter().zip(results) {
        ctx.cancels.unregister(&prepared.task.job_id);
        if let Err(err) = report(ctx, &prepared, result, service_ms, size as u32).await {
            tracing::error!(job = %prepared.task.job_id, "reporting a result: {err:#}");
            untrack(ctx, &prepared.stream, &prepared.entry_id);
        }
    }
}

async fn report(ctx: &WorkerContext, p: &Prepared, result: Result<StageOutput, StageError>, service_ms: u64, batch_size: u32) -> anyhow::Result<()> {
    use ipb::stage_event::Kind;
    let (outcome, kind, blob) = match result {
        Ok(output) => {
            let (payload, output_bytes) = match output {
                StageOutput::Latent(tensor) => (ipb::blob_payload::Payload::Latent(tensor.to_proto()), tensor.data.len()),
                StageOutput::Image { png } => {
                    let size = png.len();
                    (ipb::blob_payload::Payload::Image(png), size)
                }
            };
            let bytes = ipb::BlobPayload { payload: Some(payload) }.encode_to_vec();
            let key = ctx.keys.output_blob(&p.task.job_id, p.at, p.attempt);
            let done = ipb::Done { output_blob: key.clone(), queue_wait_ms: p.queue_wait_ms, service_ms, batch_size, output_bytes: output_bytes as u64 };
            ("done", Kind::Done(done), Some((key, bytes)))
        }
        Err(StageError::Cancelled) => ("cancelled", Kind::Cancelled(ipb::TaskCancelled {}), None),
        Err(err) => ("failed", Kind::Failed(ipb::TaskFailed { reason: client_reason(&format!("{}: {err}", p.at)) }), None),
    };
    ctx.metrics.tasks.with_label_values(&[ctx.kind.name(), outcome]).inc();
    settle(ctx, &p.stream, &p.entry_id, &p.task.job_id, p.at, p.attempt, kind, blob).await
}

/// Writes the output blob (if any) and the event, and acknowledges and deletes the entry, in
/// one transaction (a blob store outside the routing Redis writes the blob first): the
/// coordinator never sees an event without its blob, and an entry is never acknowledged
/// without its event.
#[allow(clippy::too_many_arguments)]
async fn settle(
    ctx: &WorkerContext,
    stream: &str,
    entry_id: &str,
    job_id: &str,
    at: StageRef,
    attempt: u32,
    kind: ipb::stage_event::Kind,
    blob: Option<(String, Vec<u8>)>,
) -> anyhow::Result<()> {
    let mut pipe = redis::pipe();
    pipe.atomic();
    if let Some((key, bytes)) = blob {
        let ttl = std::time::Duration::from_millis(ctx.flags.blob_ttl_ms);
        ctx.blobs.put_with(&mut pipe, &key, bytes, ttl).await.with_context(|| format!("writing output blob {key}"))?;
    }
    pipe.cmd("XADD").arg(ctx.keys.events()).arg("*").arg("event").arg(stage_event(ctx, job_id, at, attempt, kind)).ignore();
    pipe.cmd("XACK").arg(stream).arg(WORKER_GROUP).arg(entry_id).ignore();
    pipe.cmd("XDEL").arg(stream).arg(entry_id).ignore();
    let mut conn = ctx.conn.clone();
    pipe.query_async::<()>(&mut conn).await.context("settling a task")?;
    untrack(ctx, stream, entry_id);
    Ok(())
}

/// Moves an entry to the stage's dead-letter stream with the reason and fails its job.
pub(crate) async fn dead_letter(ctx: &WorkerContext, delivery: &Delivery, reason: &str) -> anyhow::Result<()> {
    tracing::error!(stream = %delivery.stream, entry = %delivery.entry_id, "dead-lettering: {reason}");
    ctx.metrics.tasks.with_label_values(&[ctx.kind.name(), "dead_lettered"]).inc();
    let mut pipe = redis::pipe();
    pipe.atomic();
    let mut dlq = redis::cmd("XADD");
    dlq.arg(ctx.keys.dead_letters(ctx.kind)).arg("*").arg("reason").arg(reason).arg("stream").arg(&delivery.stream);
    dlq.arg("entry").arg(&delivery.entry_id);
    if let Ok(task) = &delivery.task {
        dlq.arg("task").arg(task.encode_to_vec());
        let at = StageRef { kind: ctx.kind, hop: task.hop };
        let failed = ipb::stage_event::Kind::Failed(ipb::TaskFailed { reason: client_reason(&format!("{at}: {reason}")) });
        pipe.cmd("XADD").arg(ctx.keys.events()).arg("*").arg("event").arg(stage_event(ctx, &task.job_id, at, delivery.attempt, failed)).ignore();
    }
    pipe.add_command(dlq).ignore();
    pipe.cmd("XACK").arg(&delivery.stream).arg(WORKER_GROUP).arg(&delivery.entry_id).ignore();
    pipe.cmd("XDEL").arg(&delivery.stream).arg(&delivery.entry_id).ignore();
    let mut conn = ctx.conn.clone();
    pipe.query_async::<()>(&mut conn).await.context("dead-lettering")?;
    untrack(ctx, &delivery.stream, &delivery.entry_id);
    Ok(())
}

fn stage_event(ctx: &WorkerContext, job_id: &str, at: StageRef, attempt: u32, kind: ipb::stage_event::Kind) -> Vec<u8> {
    ipb::StageEvent {
        job_id: job_id.to_string(),
        stage: at.kind.to_proto() as i32,
        hop: at.hop,
        worker: ctx.id.clone(),
        attempt,
        kind: Some(kind),
    }
    .encode_to_vec()
}

fn untrack(ctx: &WorkerContext, stream: &str, entry_id: &str) {
    ctx.in_flight.lock().expect("in-flight lock").retain(|(s, e)| !(s == stream && e == entry_id));
}

/// Publishes step progress on each job's watch channel as it happens.
async fn publish_progress(
    ctx: Arc<WorkerContext>,
    targets: Vec<(String, StageRef)>,
    mut steps: tokio::sync::mpsc::UnboundedReceiver<(usize, u32, u32)>,
) {
    let mut conn = ctx.conn.clone();
    while let Some((index, step, total)) = steps.recv().await {
        let Some((job_id, at)) = targets.get(index) else { continue };
        let event = pb::JobEvent {
            job_id: job_id.clone(),
            time_unix_ms: now_unix_ms(),
            event: Some(pb::job_event::Event::Step(pb::StepProgress { at: Some(at.to_proto()), step, total })),
        };
        let published: redis::RedisResult<()> =
            redis::cmd("PUBLISH").arg(ctx.keys.watch_channel(job_id)).arg(event.encode_to_vec()).query_async(&mut conn).await;
        if let Err(err) = published {
            tracing::warn!(job = %job_id, "publishing progress: {err}");
        }
    }
}
