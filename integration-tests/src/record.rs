//! What the harness observed of one submission: plain data filled in by the driver and read
//! by the statistics. Times are offsets from the start of the run.

use std::time::Duration;

use fmboost_core::stage::StageKind;

/// How the submission ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// Not answered yet (the run ended while it was being sent).
    Pending,
    /// Admitted with this job id (possibly on a retry, which the idempotency key makes safe).
    Accepted { id: String },
    /// RESOURCE_EXHAUSTED: the cluster shed it.
    Shed,
    /// A non-retryable error (status code name).
    Rejected { code: String },
    /// Retryable errors until the retry window closed: may or may not have been admitted.
    Unacknowledged { code: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Terminal {
    Completed { png_bytes: u64 },
    Failed { reason: String },
    Cancelled,
    /// Watch said NOT_FOUND: the job record disappeared before the job finished.
    Vanished,
}

/// One StageFinished event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageSample {
    pub kind: StageKind,
    pub hop: u32,
    pub queue_wait_ms: u64,
    pub service_ms: u64,
    /// The event's server timestamp.
    pub finished_unix_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    SameId,
    DifferentId(String),
    Error(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    pub index: u64,
    pub seed: u64,
    /// When it was meant to be sent (open loop: the schedule; closed loop: when sent).
    pub intended: Duration,
    pub submit: SubmitOutcome,
    /// When the accepted Submit's answer arrived (client clock, Unix ms), to measure the first
    /// stage's hop from.
    pub accepted_unix_ms: Option<u64>,
    pub terminal: Option<(Terminal, Duration)>,
    /// StageFinished events in arrival order, one per (stage, hop).
    pub stages: Vec<StageSample>,
    /// CRC32C and length of the fetched PNG.
    pub checksum: Option<u32>,
    pub png_len: Option<u64>,
    pub result_error: Option<String>,
    pub probe: Option<ProbeOutcome>,
}

impl JobRecord {
    pub fn new(index: u64, seed: u64, intended: Duration) -> Self {
        JobRecord {
            index,
            seed,
            intended,
            submit: SubmitOutcome::Pending,
            accepted_unix_ms: None,
            terminal: None,
            stages: Vec::new(),
            checksum: None,
            png_len: None,
            result_error: None,
            probe: None,
        }
    }

    pub fn job_id(&self) -> Option<&str> {
        match &self.submit {
            SubmitOutcome::Accepted { id } => Some(id),
            _ => None,
        }
    }

    pub fn is_accepted(&self) -> bool {
        matches!(self.submit, SubmitOutcome::Accepted { .. })
    }

    /// Accepted and never seen finished (no terminal state, or its record vanished).
    pub fn is_lost(&self) -> bool {
        self.is_accepted() && matches!(self.terminal, None | Some((Terminal::Vanished, _)))
    }

    /// End-to-end latency of a completed job: intended send to the observed completion.
    pub fn latency(&self) -> Option<Duration> {
        Some(self.completed_at()?.saturating_sub(self.intended))
    }

    pub fn completed_at(&self) -> Option<Duration> {
        match &self.terminal {
            Some((Terminal::Completed { .. }, at)) => Some(*at),
            _ => None,
        }
    }

    /// Records a StageFinished event unless that (stage, hop) was already seen (a re-Watch).
    pub fn add_stage(&mut self, sample: StageSample) {
        if !self.stages.iter().any(|s| s.kind == sample.kind && s.hop == sample.hop) {
            self.stages.push(sample);
        }
    }
}
