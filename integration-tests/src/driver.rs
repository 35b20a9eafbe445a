//! Drives the jobs: sends them open-loop (on a schedule) or closed-loop (C in flight), follows
//! each through Watch to its terminal state, fetches and hashes its PNG, and probes its
//! idempotency key. Every observation lands in the job's [`JobRecord`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fmboost_core::now_unix_ms;
use fmboost_core::stage::StageKind;
use fmboost_proto::v1 as pb;
use pb::job_event::Event;
use tokio::task::JoinSet;
use tonic::{Code, Request};

use crate::args::{Bound, Load};
use crate::arrival::Schedule;
use crate::client::{code_name, is_transient, Clients, ErrorTally};
use crate::record::{JobRecord, ProbeOutcome, StageSample, SubmitOutcome, Terminal};
use crate::spec::JobTemplate;

/// Time limit of one unary call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

pub struct DriverConfig {
    pub template: JobTemplate,
    /// Idempotency keys are `{key_prefix}-{index}`: unique per run.
    pub key_prefix: String,
    pub load: Load,
    pub bound: Bound,
    pub rng_seed: u64,
    pub drain_timeout: Duration,
    pub submit_retry_for: Duration,
    pub verify_output: bool,
    pub probe_every: u64,
}

/// The records of all jobs, shared by the job tasks (a task cut off at the drain deadline
/// leaves what it saw so far).
#[derive(Default)]
pub struct Slots(Mutex<Vec<JobRecord>>);

impl Slots {
    fn add(&self, record: JobRecord) -> usize {
        let mut slots = self.0.lock().expect("slots lock");
        slots.push(record);
        slots.len() - 1
    }

    fn update<T>(&self, slot: usize, f: impl FnOnce(&mut JobRecord) -> T) -> T {
        f(&mut self.0.lock().expect("slots lock")[slot])
    }

    /// (sent, finished) so far, for progress lines.
    pub fn progress(&self) -> (usize, usize) {
        let slots = self.0.lock().expect("slots lock");
        (slots.len(), slots.iter().filter(|r| r.terminal.is_some()).count())
    }

    pub fn snapshot(&self) -> Vec<JobRecord> {
        self.0.lock().expect("slots lock").clone()
    }
}

struct Shared {
    clients: Clients,
    tally: Arc<ErrorTally>,
    config: DriverConfig,
    start: Instant,
    slots: Arc<Slots>,
}

/// What the run saw.
pub struct DriveOutcome {
    pub records: Vec<JobRecord>,
    /// From the start to the last submission.
    pub submit_span: Duration,
    /// True when the drain deadline cut unfinished jobs off.
    pub drain_expired: bool,
}

/// Runs the whole load; returns when every job is done or the drain deadline passed.
pub async fn drive(clients: Clients, tally: Arc<ErrorTally>, config: DriverConfig, start: Instant, slots: Arc<Slots>) -> DriveOutcome {
    let shared = Arc::new(Shared { clients, tally, config, start, slots });
    let mut jobs = JoinSet::new();
    match shared.config.load {
        Load::Open { rate, kind } => {
            for (index, offset) in Schedule::new(kind, rate, shared.config.rng_seed).enumerate() {
                let index = index as u64;
                let within = match shared.config.bound {
                    Bound::Jobs(n) => index < n,
                    Bound::Duration(d) => offset < d,
                };
                if !within {
                    break;
                }
                tokio::time::sleep_until((start + offset).into()).await;
                let slot = shared.slots.add(JobRecord::new(index, shared.config.template.seed_of(index), offset));
                jobs.spawn(run_job(shared.clone(), slot));
            }
        }
        Load::Closed { concurrency } => {
            let next = Arc::new(AtomicU64::new(0));
            for _ in 0..concurrency {
                jobs.spawn(closed_loop(shared.clone(), next.clone()));
            }
            // The loops end after their last job; wait for the submissions to stop first.
            while !submissions_over(&shared, next.load(Ordering::SeqCst)) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    let submit_span = start.elapsed();
    let drained = tokio::time::timeout(shared.config.drain_timeout, async {
        while let Some(joined) = jobs.join_next().await {
            if let Err(err) = joined {
                tracing::error!("a job task panicked: {err}");
            }
        }
    })
    .await;
    jobs.abort_all();
    DriveOutcome { records: shared.slots.snapshot(), submit_span, drain_expired: drained.is_err() }
}

fn submissions_over(shared: &Shared, taken: u64) -> bool {
    match shared.config.bound {
        Bound::Jobs(n) => taken >= n,
        Bound::Duration(d) => shared.start.elapsed() >= d,
    }
}

async fn closed_loop(shared: Arc<Shared>, next: Arc<AtomicU64>) {
    loop {
        if let Bound::Duration(d) = shared.config.bound {
            if shared.start.elapsed() >= d {
                return;
            }
        }
        let index = next.fetch_add(1, Ordering::SeqCst);
        if let Bound::Jobs(n) = shared.config.bound {
            if index >= n {
                return;
            }
        }
        let slot = shared.slots.add(JobRecord::new(index, shared.config.template.seed_of(index), shared.start.elapsed()));
        run_job(shared.clone(), slot).await;
    }
}

async fn run_job(shared: Arc<Shared>, slot: usize) {
    let index = shared.slots.update(slot, |r| r.index);
    let spec = shared.config.template.job(index, &shared.config.key_prefix);
    let Some(job_id) = submit(&shared, slot, &spec).await else { return };
    let completed = watch(&shared, slot, &job_id).await;
    if shared.config.verify_output && completed {
        let fetched = fetch_checksum(&shared, &job_id).await;
        shared.slots.update(slot, |r| match fetched {
            Ok((checksum, len)) => (r.checksum, r.png_len) = (Some(checksum), Some(len)),
            Err(err) => r.result_error = Some(err),
        });
    }
    if shared.config.probe_every > 0 && index % shared.config.probe_every == 0 {
        let probe = probe(&shared, &spec, &job_id).await;
        shared.slots.update(slot, |r| r.probe = Some(probe));
    }
}

/// Exponential backoff from 50 ms to 1 s.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(Duration::from_millis(50))
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(1));
    }
}

/// Submits, retrying transient errors with the same idempotency key; the job id, if admitted.
async fn submit(shared: &Shared, slot: usize, spec: &pb::JobSpec) -> Option<String> {
    let first = Instant::now();
    let mut backoff = Backoff::new();
    loop {
        let mut request = Request::new(pb::SubmitRequest { spec: Some(spec.clone()) });
        request.set_timeout(CALL_TIMEOUT);
        let outcome = match shared.clients.get().submit(request).await {
            Ok(response) => {
                let id = response.into_inner().job_id;
                shared.slots.update(slot, |r| r.accepted_unix_ms = Some(now_unix_ms()));
                SubmitOutcome::Accepted { id }
            }
            Err(status) => {
                shared.tally.add("submit", &status);
                let code = code_name(status.code()).to_string();
                if status.code() == Code::ResourceExhausted {
                    SubmitOutcome::Shed
                } else if !is_transient(status.code()) {
                    SubmitOutcome::Rejected { code }
                } else if first.elapsed() >= shared.config.submit_retry_for {
                    SubmitOutcome::Unacknowledged { code }
                } else {
                    backoff.wait().await;
                    continue;
                }
            }
        };
        let id = match &outcome {
            SubmitOutcome::Accepted { id } => Some(id.clone()),
            _ => None,
        };
        shared.slots.update(slot, |r| r.submit = outcome);
        return id;
    }
}

/// Follows the job to its terminal state, re-watching after stream errors (a restarted
/// coordinator answers with the job's current state). True when the job completed.
async fn watch(shared: &Shared, slot: usize, job_id: &str) -> bool {
    let mut backoff = Backoff::new();
    let mut not_found = 0;
    loop {
        let stream = shared.clients.get().watch(pb::WatchRequest { job_id: job_id.to_string() }).await;
        let mut stream = match stream {
            Ok(stream) => stream.into_inner(),
            Err(status) => {
                shared.tally.add("watch", &status);
                if status.code() == Code::NotFound {
                    // Once more, in case Redis was still loading its data.
                    not_found += 1;
                    if not_found >= 3 {
                        let at = shared.start.elapsed();
                        shared.slots.update(slot, |r| r.terminal = Some((Terminal::Vanished, at)));
                        return false;
                    }
                } else if !is_transient(status.code()) {
                    tracing::error!(job = %job_id, "watch refused: {status}");
                    return false;
                }
                backoff.wait().await;
                continue;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(event)) => {
                    if let Some(terminal) = observe(shared, slot, event) {
                        let completed = matches!(terminal, Terminal::Completed { .. });
                        let at = shared.start.elapsed();
                        shared.slots.update(slot, |r| r.terminal = Some((terminal, at)));
                        return completed;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    shared.tally.add("watch", &status);
                    break;
                }
            }
        }
        backoff.wait().await;
    }
}

/// Records a stage event; returns the terminal state, if this is one.
fn observe(shared: &Shared, slot: usize, event: pb::JobEvent) -> Option<Terminal> {
    match event.event? {
        Event::StageFinished(finished) => {
            let at = finished.at.unwrap_or_default();
            if let Some(kind) = StageKind::from_proto(at.stage) {
                let sample = StageSample {
                    kind,
                    hop: at.hop,
                    queue_wait_ms: finished.queue_wait_ms,
                    service_ms: finished.service_ms,
                    finished_unix_ms: event.time_unix_ms,
                };
                shared.slots.update(slot, |r| r.add_stage(sample));
            }
            None
        }
        Event::Completed(completed) => Some(Terminal::Completed { png_bytes: completed.png_bytes }),
        Event::Failed(failed) => Some(Terminal::Failed { reason: failed.reason }),
        Event::Cancelled(_) => Some(Terminal::Cancelled),
        Event::Queued(_) | Event::StageStarted(_) | Event::Step(_) => None,
    }
}

/// Fetches the PNG (retrying transient errors); returns its CRC32C and length.
async fn fetch_checksum(shared: &Shared, job_id: &str) -> Result<(u32, u64), String> {
    let first = Instant::now();
    let mut backoff = Backoff::new();
    loop {
        match fetch_png(shared, job_id).await {
            Ok(png) => {
                if !png.starts_with(PNG_SIGNATURE) {
                    return Err(format!("job {job_id}: the result is not a PNG"));
                }
                return Ok((crc32c::crc32c(&png), png.len() as u64));
            }
            Err(status) => {
                shared.tally.add("get_result", &status);
                if !is_transient(status.code()) || first.elapsed() >= shared.config.submit_retry_for {
                    return Err(format!("job {job_id}: GetResult {}: {}", code_name(status.code()), status.message()));
                }
                backoff.wait().await;
            }
        }
    }
}

async fn fetch_png(shared: &Shared, job_id: &str) -> Result<Vec<u8>, tonic::Status> {
    let request = pb::GetResultRequest { job_id: job_id.to_string(), include_latent: false, chunk_bytes: 0 };
    let mut stream = shared.clients.get().get_result(request).await?.into_inner();
    let mut png = Vec::new();
    let mut total = None;
    while let Some(chunk) = stream.message().await? {
        match chunk.part {
            Some(pb::result_chunk::Part::Png(part)) => {
                if part.offset != png.len() as u64 || total.is_some_and(|t| t != part.total_bytes) {
                    return Err(tonic::Status::data_loss(format!(
                        "PNG chunk at offset {} of {} bytes after {} bytes",
                        part.offset,
                        part.total_bytes,
                        png.len()
                    )));
                }
                total = Some(part.total_bytes);
                png.extend_from_slice(&part.data);
            }
            other => return Err(tonic::Status::data_loss(format!("unexpected result chunk {other:?} (no latent was asked for)"))),
        }
    }
    if total != Some(png.len() as u64) {
        return Err(tonic::Status::data_loss(format!("PNG of {} bytes announced {total:?}", png.len())));
    }
    Ok(png)
}

/// Sends the job's idempotency key again: the answer must be the same job, not created anew.
async fn probe(shared: &Shared, spec: &pb::JobSpec, job_id: &str) -> ProbeOutcome {
    let mut request = Request::new(pb::SubmitRequest { spec: Some(spec.clone()) });
    request.set_timeout(CALL_TIMEOUT);
    match shared.clients.get().submit(request).await {
        Ok(response) => {
            let response = response.into_inner();
            if response.job_id == job_id && !response.created {
                ProbeOutcome::SameId
            } else {
                ProbeOutcome::DifferentId(response.job_id)
            }
        }
        Err(status) => {
            shared.tally.add("probe", &status);
            ProbeOutcome::Error(code_name(status.code()).to_string())
        }
    }
}
