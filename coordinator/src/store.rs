//! Job records in Redis and the atomic transitions on them (Lua scripts), so two coordinator
//! replicas, workers and Cancel never race a job into an inconsistent state.
//!
//! Record `{ns}:job:{id}` (hash): `spec` (admitted `JobSpec`, protobuf), `state`, `stage`,
//! `hop` (where it is queued or running), `task_stream`/`task_entry` (its queued task),
//! `input_blob` (the current stage's input), `png_blob`/`latent_blob` (results), `png_bytes`
//! (the PNG's length), `error`, `created_ms`, `updated_ms`. Terminal records expire after `--result-ttl-ms`.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use fmboost_core::blob::BlobStore;
use fmboost_core::keys::Keys;
use fmboost_core::spec::JobSpec;
use fmboost_core::stage::{StageKind, StageRef};
use fmboost_proto::{internal as ipb, v1 as pb};
use prost::Message;
use redis::aio::ConnectionManager;

use crate::error::ApiError;

pub(crate) static SUBMIT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
-- KEYS: active, job, idem, queue
-- ARGV: job_id, max_queued, now, spec, task, use_idem, idem_ttl, upload blob (written before,
--       through the blob store; '' for none), stage, hop,
--       fingerprint (the idempotency key keeps 'job_id fingerprint')
if ARGV[6] == '1' then
  local existing = redis.call('GET', KEYS[3])
  if existing then
    local id, fingerprint = string.match(existing, '^(%S+) (%S+)$')
    if not id then return {'existing', existing} end
    if fingerprint == ARGV[11] then return {'existing', id} end
    return {'conflict', id}
  end
end
local active = redis.call('ZCARD', KEYS[1])
if active >= tonumber(ARGV[2]) then return {'full', tostring(active)} end
local input = ARGV[8]
local entry = redis.call('XADD', KEYS[4], '*', 'task', ARGV[5])
redis.call('HSET', KEYS[2], 'spec', ARGV[4], 'state', 'queued', 'stage', ARGV[9], 'hop', ARGV[10],
  'task_stream', KEYS[4], 'task_entry', entry, 'input_blob', input, 'created_ms', ARGV[3], 'updated_ms', ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
if ARGV[6] == '1' then redis.call('SET', KEYS[3], ARGV[1] .. ' ' .. ARGV[11], 'PX', ARGV[7]) end
return {'created', ARGV[1]}
",
    )
});

/// Moves a job at (stage, hop) on: queues the next task, or completes it when `task` is empty.
/// Returns `{outcome}` or `{'advanced', next task entry}`.
pub(crate) static ADVANCE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
-- KEYS: job, next queue, active
-- ARGV: stage, hop, now, next task, next stage, next hop, output blob, job_id, result_ttl,
--       output bytes (the PNG's length when completing)
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'running' then return {'stale'} end
if redis.call('HGET', KEYS[1], 'stage') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'hop') ~= ARGV[2] then return {'stale'} end
if ARGV[4] == '' then
  local latent = redis.call('HGET', KEYS[1], 'input_blob')
  redis.call('HSET', KEYS[1], 'state', 'completed', 'png_blob', ARGV[7], 'png_bytes', ARGV[10],
    'latent_blob', latent, 'task_stream', '', 'task_entry', '', 'updated_ms', ARGV[3])
  redis.call('ZREM', KEYS[3], ARGV[8])
  redis.call('PEXPIRE', KEYS[1], ARGV[9])
  redis.call('PEXPIRE', ARGV[7], ARGV[9])
  if latent and latent ~= '' then redis.call('PEXPIRE', latent, ARGV[9]) end
  return {'completed'}
end
local entry = redis.call('XADD', KEYS[2], '*', 'task', ARGV[4])
redis.call('HSET', KEYS[1], 'state', 'queued', 'stage', ARGV[5], 'hop', ARGV[6], 'task_stream', KEYS[2],
  'task_entry', entry, 'input_blob', ARGV[7], 'updated_ms', ARGV[3])
-- The new entry id, so the caller knows the queued record without reading it back.
return {'advanced', entry}
",
    )
});

/// Marks a job at (stage, hop) running.
pub(crate) static START: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
-- KEYS: job  ARGV: stage, hop, now
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'running' then return 'stale' end
if redis.call('HGET', KEYS[1], 'stage') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'hop') ~= ARGV[2] then return 'stale' end
redis.call('HSET', KEYS[1], 'state', 'running', 'task_stream', '', 'task_entry', '', 'updated_ms', ARGV[3])
return 'running'
",
    )
});

/// Fails a job at (stage, hop) with a reason.
pub(crate) static FAIL: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
-- KEYS: job, active  ARGV: stage, hop, now, reason, job_id, result_ttl
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'running' then return 'stale' end
if redis.call('HGET', KEYS[1], 'stage') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'hop') ~= ARGV[2] then return 'stale' end
redis.call('HSET', KEYS[1], 'state', 'failed', 'error', ARGV[4], 'task_stream', '', 'task_entry', '', 'updated_ms', ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return 'failed'
",
    )
});

/// Cancels a job: removes its queued task, raises the flag workers check, tells them at once.
pub(crate) static CANCEL: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
-- KEYS: job, active, cancel flag, cancel channel  ARGV: now, job_id, result_ttl
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state ~= 'queued' and state ~= 'running' then return state end
local stream = redis.call('HGET', KEYS[1], 'task_stream')
local entry = redis.call('HGET', KEYS[1], 'task_entry')
if stream and stream ~= '' and entry and entry ~= '' then redis.call('XDEL', stream, entry) end
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'task_stream', '', 'task_entry', '', 'updated_ms', ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('SET', KEYS[3], '1', 'PX', ARGV[3])
redis.call('PUBLISH', KEYS[4], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 'cancelled'
",
    )
});

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "completed" => JobState::Completed,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Completed | JobState::Failed | JobState::Cancelled)
    }

    pub fn to_proto(self) -> pb::JobState {
        match self {
            JobState::Queued => pb::JobState::Queued,
            JobState::Running => pb::JobState::Running,
            JobState::Completed => pb::JobState::Completed,
            JobState::Failed => pb::JobState::Failed,
            JobState::Cancelled => pb::JobState::Cancelled,
        }
    }
}

/// A job record as read from Redis.
#[derive(Debug, Clone)]
pub struct JobRecord {
    pub job_id: String,
    pub spec: JobSpec,
    pub state: JobState,
    pub at: StageRef,
    pub task_stream: String,
    pub task_entry: String,
    /// The current stage's input blob (at the decoder: the final latent).
    pub input_blob: String,
    pub png_blob: String,
    /// The PNG's length (None in records completed by a coordinator older than the field).
    pub png_bytes: Option<u64>,
    pub latent_blob: String,
    pub error: String,
    pub created_ms: u64,
    pub updated_ms: u64,
}

/// Outcome of `advance`.
pub enum Advanced {
    /// The job was no longer at the event's stage: nothing changed.
    Stale,
    Completed,
    /// The next stage's task is queued; the record as it now is in Redis.
    Queued(JobRecord),
}

/// Outcome of a submission.
pub enum Submitted {
    Created(String),
    Existing(String),
    /// The idempotency key belongs to this job, whose spec differs.
    Conflict(String),
    Full { active: u64 },
}

/// Outcome of a transition script.
#[derive(Debug, PartialEq, Eq)]
pub enum Transition {
    Applied,
    /// The job already moved on (duplicate or late event): nothing changed.
    Stale,
}

#[derive(Clone)]
pub struct JobStore {
    pub keys: Keys,
    pub conn: ConnectionManager,
    /// Where blobs live (`--blob-store`): every blob read and write goes through it.
    pub blobs: Arc<dyn BlobStore>,
    pub result_ttl_ms: u64,
    pub blob_ttl_ms: u64,
    /// How long a Submit waits for Redis (`--redis-timeout-ms`).
    pub timeout: Duration,
}

pub struct NewJob<'a> {
    pub job_id: &'a str,
    pub spec: &'a JobSpec,
    pub upload: Option<ipb::BlobPayload>,
    pub max_queued: u64,
}

impl JobStore {
    /// A result or stage blob's payload; None when the key is empty or expired.
    pub async fn read_blob(&self, key: &str) -> Result<Option<ipb::blob_payload::Payload>, ApiError> {
        if key.is_empty() {
            return Ok(None);
        }
        let Some(bytes) = self.blobs.get(key).await? else { return Ok(None) };
        let payload = ipb::BlobPayload::decode(bytes.as_slice()).map_err(|e| ApiError::Internal(anyhow::anyhow!("blob {key}: {e}")))?;
        Ok(payload.payload)
    }

    /// Writes the record and queues the first task, atomically, unless the queue is full or
    /// the idempotency key is known.
    ///
    /// Fails fast or finishes, never both: UNAVAILABLE only before anything was sent (a PING
    /// first, so a stalled Redis is found before the write); once the script is sent, its
    /// answer within the timeout is the answer, and no answer is [`ApiError::OutcomeUnknown`]
    /// (the script may still run when Redis resumes; a late outcome is logged).
    pub async fn submit(&self, job: NewJob<'_>, now: u64) -> Result<Submitted, ApiError> {
        let first = job.spec.first_stage();
        let upload_key = self.keys.upload_blob(job.job_id);
        let input_blob = if job.upload.is_some() { upload_key.clone() } else { String::new() };
        let task = self.task(job.job_id, job.spec, first, input_blob.clone(), now);
        let idem = job.spec.idempotency_key.as_deref();
        let fingerprint = crate::idempotency::fingerprint(job.spec, job.upload.as_ref());
        let mut invocation = SUBMIT.key(self.keys.active());
        invocation
            .key(self.keys.job(job.job_id))
            .key(self.keys.idempotency(idem.unwrap_or("-")))
            .key(self.keys.queue(first.kind, job.spec.priority))
            .arg(job.job_id)
            .arg(job.max_queued)
            .arg(now)
            .arg(job.spec.to_proto().encode_to_vec())
            .arg(task)
            .arg(if idem.is_some() { "1" } else { "0" })
            .arg(24 * 3600 * 1000u64)
            .arg(&input_blob)
            .arg(first.kind.name())
            .arg(first.hop)
            .arg(fingerprint);
        self.ping_before_writing().await?;
        if let Some(upload) = &job.upload {
            // Written before the record that names it. A failure here admitted nothing
            // (UNAVAILABLE: safe to retry); a blob left by a refused or unknown-outcome
            // submission expires with its TTL.
            let ttl = Duration::from_millis(self.blob_ttl_ms);
            self.blobs.put(&upload_key, upload.encode_to_vec(), ttl).await.map_err(|err| match ApiError::from(err) {
                ApiError::Unavailable(err) => ApiError::Unavailable(err.context("writing the upload; nothing was admitted")),
                other => other,
            })?;
        }
        let mut conn = self.conn.clone();
        let mut reply = tokio::spawn(async move { invocation.invoke_async::<(String, String)>(&mut conn).await });
        let job_id = job.job_id.to_string();
        let unknown = |reason: String| ApiError::OutcomeUnknown { job_id: job_id.clone(), reason };
        let reply = tokio::select! {
            reply = &mut reply => reply,
            _ = tokio::time::sleep(self.timeout) => {
                let late_job = job_id.clone();
                tokio::spawn(async move {
                    match reply.await {
                        Ok(Ok((outcome, _))) => tracing::warn!(job = %late_job, "the Submit told `outcome unknown` finished late: {outcome}"),
                        Ok(Err(err)) => tracing::warn!(job = %late_job, "the Submit told `outcome unknown` got no answer: {err}"),
                        Err(err) => tracing::error!(job = %late_job, "the Submit task: {err}"),
                    }
                });
                return Err(unknown(format!("Redis did not answer the write within {} ms (--redis-timeout-ms)", self.timeout.as_millis())));
            }
        };
        let (outcome, value) = match reply {
            Ok(Ok(reply)) => reply,
            // Refused connections sent nothing.
            Ok(Err(err)) if err.is_connection_refusal() => return Err(err.into()),
            Ok(Err(err)) if err.is_io_error() || err.is_timeout() || err.is_connection_dropped() => {
                return Err(unknown(format!("the connection to Redis failed during the write: {err}")));
            }
            Ok(Err(err)) => return Err(ApiError::Internal(anyhow::anyhow!("the submit script: {err}"))),
            Err(err) => return Err(ApiError::Internal(anyhow::anyhow!("the submit task: {err}"))),
        };
        if job.upload.is_some() && outcome != "created" {
            // Nothing names this upload: remove it now rather than at its TTL (a failure here
            // leaves it to the TTL, and is logged).
            if let Err(err) = self.blobs.delete(&upload_key).await {
                tracing::warn!(job = %job_id, "removing the upload of a refused submission: {err}");
            }
        }
        Ok(match outcome.as_str() {
            "created" => Submitted::Created(value),
            "existing" => Submitted::Existing(value),
            "conflict" => Submitted::Conflict(value),
            _ => Submitted::Full { active: value.parse().unwrap_or(0) },
        })
    }

    /// UNAVAILABLE unless Redis answers a PING within the timeout; sent on the connection the
    /// write will use, so its answer also means no earlier command there is stuck.
    async fn ping_before_writing(&self) -> Result<(), ApiError> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, redis::cmd("PING").query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(ApiError::Unavailable(anyhow::anyhow!("PING before the write: {err}; nothing was written"))),
            Err(_) => Err(ApiError::Unavailable(anyhow::anyhow!(
                "no answer to PING within {} ms (--redis-timeout-ms); nothing was written",
                self.timeout.as_millis()
            ))),
        }
    }

    /// The prost-encoded task for `at`.
    pub fn task(&self, job_id: &str, spec: &JobSpec, at: StageRef, input_blob: String, now: u64) -> Vec<u8> {
        ipb::StageTask {
            job_id: job_id.to_string(),
            stage: at.kind.to_proto() as i32,
            hop: at.hop,
            spec: Some(spec.to_proto()),
            input_blob,
            enqueued_unix_ms: now,
        }
        .encode_to_vec()
    }

    pub async fn get(&self, job_id: &str) -> Result<Option<JobRecord>, ApiError> {
        let mut conn = self.conn.clone();
        let fields: std::collections::HashMap<String, Vec<u8>> =
            redis::cmd("HGETALL").arg(self.keys.job(job_id)).query_async(&mut conn).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        parse_record(job_id, &fields).map(Some).map_err(|e| ApiError::Internal(anyhow::anyhow!("job record {job_id}: {e}")))
    }

    pub async fn start(&self, job_id: &str, at: StageRef, now: u64) -> Result<Transition, ApiError> {
        let mut conn = self.conn.clone();
        let outcome: String = START.key(self.keys.job(job_id)).arg(at.kind.name()).arg(at.hop).arg(now).invoke_async(&mut conn).await?;
        Ok(transition(&outcome))
    }

    /// Queues `next` with `output_blob` as its input, or completes the job when `next` is None
    /// (`output_bytes`, the PNG's length, is then kept in the record).
    pub async fn advance(
        &self,
        record: &JobRecord,
        from: StageRef,
        next: Option<StageRef>,
        output_blob: &str,
        output_bytes: u64,
        now: u64,
    ) -> Result<Advanced, ApiError> {
        let (queue, task, next_at) = match next {
            Some(next) => (
                self.keys.queue(next.kind, record.spec.priority),
                self.task(&record.job_id, &record.spec, next, output_blob.to_string(), now),
                next,
            ),
            None => (self.keys.queue(StageKind::Decoder, record.spec.priority), Vec::new(), from),
        };
        if next.is_none() && !self.blobs.in_routing_redis() {
            // The script keeps the results for `--result-ttl-ms` only where it can reach them
            // (blobs in the routing Redis); elsewhere it is done here, before the job is
            // completed, so a failure leaves the event to be handled again.
            let results = [output_blob.to_string(), record.input_blob.clone()];
            self.blobs.expire(&results, Duration::from_millis(self.result_ttl_ms)).await?;
        }
        let mut conn = self.conn.clone();
        let outcome: Vec<String> = ADVANCE
            .key(self.keys.job(&record.job_id))
            .key(&queue)
            .key(self.keys.active())
            .arg(from.kind.name())
            .arg(from.hop)
            .arg(now)
            .arg(task)
            .arg(next_at.kind.name())
            .arg(next_at.hop)
            .arg(output_blob)
            .arg(&record.job_id)
            .arg(self.result_ttl_ms)
            .arg(output_bytes)
            .invoke_async(&mut conn)
            .await?;
        match (outcome.first().map(String::as_str), outcome.get(1), next) {
            (Some("stale"), _, _) => Ok(Advanced::Stale),
            (Some("completed"), _, None) => Ok(Advanced::Completed),
            (Some("advanced"), Some(entry), Some(next)) => Ok(Advanced::Queued(JobRecord {
                state: JobState::Queued,
                at: next,
                task_stream: queue,
                task_entry: entry.clone(),
                updated_ms: now,
                ..record.clone()
            })),
            _ => Err(ApiError::Internal(anyhow::anyhow!("unexpected reply of the advance script: {outcome:?}"))),
        }
    }

    pub async fn fail(&self, job_id: &str, at: StageRef, reason: &str, now: u64) -> Result<Transition, ApiError> {
        let mut conn = self.conn.clone();
        let outcome: String = FAIL
            .key(self.keys.job(job_id))
            .key(self.keys.active())
            .arg(at.kind.name())
            .arg(at.hop)
            .arg(now)
            .arg(reason)
            .arg(job_id)
            .arg(self.result_ttl_ms)
            .invoke_async(&mut conn)
            .await?;
        Ok(transition(&outcome))
    }

    /// Cancels a job; returns its state afterwards (a finished job keeps its state).
    pub async fn cancel(&self, job_id: &str, now: u64) -> Result<(JobState, Transition), ApiError> {
        let mut conn = self.conn.clone();
        let outcome: String = CANCEL
            .key(self.keys.job(job_id))
            .key(self.keys.active())
            .key(self.keys.cancel_flag(job_id))
            .key(self.keys.cancel_channel())
            .arg(now)
            .arg(job_id)
            .arg(self.result_ttl_ms)
            .invoke_async(&mut conn)
            .await?;
        match outcome.as_str() {
            "missing" => Err(ApiError::NotFound(job_id.to_string())),
            "cancelled" => Ok((JobState::Cancelled, Transition::Applied)),
            other => JobState::parse(other)
                .map(|state| (state, Transition::Stale))
                .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("job {job_id} has unknown state {other:?}"))),
        }
    }

    pub async fn active_jobs(&self) -> Result<u64, ApiError> {
        let mut conn = self.conn.clone();
        Ok(redis::cmd("ZCARD").arg(self.keys.active()).query_async(&mut conn).await?)
    }
}

fn transition(outcome: &str) -> Transition {
    if outcome == "stale" {
        Transition::Stale
    } else {
        Transition::Applied
    }
}

fn parse_record(job_id: &str, fields: &std::collections::HashMap<String, Vec<u8>>) -> Result<JobRecord, String> {
    let text = |name: &str| fields.get(name).map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default();
    let number = |name: &str| text(name).parse::<u64>().map_err(|_| format!("field {name} is not a number"));
    let spec_bytes = fields.get("spec").ok_or("no spec")?;
    let spec = pb::JobSpec::decode(spec_bytes.as_slice()).map_err(|e| format!("spec: {e}"))?;
    let spec = JobSpec::from_admitted(spec).map_err(|e| format!("spec: {e}"))?;
    let state = JobState::parse(&text("state")).ok_or_else(|| format!("unknown state {:?}", text("state")))?;
    let kind = StageKind::from_name(&text("stage")).ok_or_else(|| format!("unknown stage {:?}", text("stage")))?;
    Ok(JobRecord {
        job_id: job_id.to_string(),
        spec,
        state,
        at: StageRef { kind, hop: number("hop")? as u32 },
        task_stream: text("task_stream"),
        task_entry: text("task_entry"),
        input_blob: text("input_blob"),
        png_blob: text("png_blob"),
        png_bytes: fields.get("png_bytes").map(|_| number("png_bytes")).transpose()?,
        latent_blob: text("latent_blob"),
        error: text("error"),
        created_ms: number("created_ms")?,
        updated_ms: number("updated_ms")?,
    })
}
