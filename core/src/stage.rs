//! The contract between the serving plane and whatever computes a stage.
//!
//! The worker runtime (`crate::worker`) reads tasks from Redis, groups them into batches by
//! [`StageExecutor::batch_key`], and calls [`StageExecutor::run_batch`] on a blocking thread.
//! Implementations: [`crate::sleep::SleepExecutor`] (load tests, no models) and the model
//! engine (`fmboost_engine`), which knows the networks.

use std::fmt;

use crate::spec::JobSpec;
use crate::tensor::WireTensor;
use fmboost_proto::v1 as pb;

/// The three worker pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StageKind {
    /// Base latent diffusion (text → latent), or VAE encoding of an uploaded image.
    Diffusion,
    /// One coupling-flow-matching hop: latent → latent at 2× spatial size.
    Cfm,
    /// VAE decoding of the final latent into a PNG.
    Decoder,
}

impl StageKind {
    pub const ALL: [StageKind; 3] = [StageKind::Diffusion, StageKind::Cfm, StageKind::Decoder];

    /// The name used in Redis keys, metrics labels and flags.
    pub fn name(self) -> &'static str {
        match self {
            StageKind::Diffusion => "diffusion",
            StageKind::Cfm => "cfm",
            StageKind::Decoder => "decoder",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        StageKind::ALL.into_iter().find(|kind| kind.name() == name)
    }

    pub fn to_proto(self) -> pb::Stage {
        match self {
            StageKind::Diffusion => pb::Stage::Diffusion,
            StageKind::Cfm => pb::Stage::Cfm,
            StageKind::Decoder => pb::Stage::Decoder,
        }
    }

    pub fn from_proto(value: i32) -> Option<Self> {
        match pb::Stage::try_from(value).ok()? {
            pb::Stage::Diffusion => Some(StageKind::Diffusion),
            pb::Stage::Cfm => Some(StageKind::Cfm),
            pb::Stage::Decoder => Some(StageKind::Decoder),
            pb::Stage::Unspecified => None,
        }
    }
}

impl fmt::Display for StageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A position in a job's pipeline: the stage and, for CFM, the 1-based hop number (0 otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StageRef {
    pub kind: StageKind,
    pub hop: u32,
}

impl StageRef {
    pub fn to_proto(self) -> pb::StageRef {
        pb::StageRef { stage: self.kind.to_proto() as i32, hop: self.hop }
    }
}

impl fmt::Display for StageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            StageKind::Cfm => write!(f, "cfm hop {}", self.hop),
            kind => f.write_str(kind.name()),
        }
    }
}

/// What a task starts from.
#[derive(Debug, Clone, PartialEq)]
pub enum StageInput {
    /// Diffusion from the spec's text prompt: no input blob.
    Text,
    /// An uploaded image to encode (diffusion stage, image source): PNG or JPEG bytes.
    Image(Vec<u8>),
    /// The previous stage's latent, or an uploaded latent (CFM and decoder stages).
    Latent(WireTensor),
}

/// One task handed to an executor.
#[derive(Debug, Clone)]
pub struct StageTask {
    pub job_id: String,
    /// The validated job spec (without uploaded payloads: those are in `input`).
    pub spec: JobSpec,
    /// CFM hop number (1-based) for the CFM stage, 0 otherwise.
    pub hop: u32,
    pub input: StageInput,
}

/// What a task produces.
#[derive(Debug, Clone, PartialEq)]
pub enum StageOutput {
    /// Diffusion and CFM stages.
    Latent(WireTensor),
    /// The decoder: an encoded PNG.
    Image { png: Vec<u8> },
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StageError {
    /// `progress` returned false: the job was cancelled. Not reported as a failure.
    #[error("cancelled")]
    Cancelled,
    /// The task cannot be run as given (wrong input shape, profile mismatch, undecodable
    /// image). The job fails with this reason; retrying would not help.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The computation failed (out of memory, a model error). The job fails with this reason.
    #[error("stage failed: {0}")]
    Failed(String),
}

/// Computes one stage for batches of tasks. One executor lives in each worker process.
pub trait StageExecutor: Send + Sync + 'static {
    fn kind(&self) -> StageKind;

    /// Name of the model profile this executor serves ("tiny", "sd15", "sleep", ...). Tasks of
    /// another profile fail with a clear reason instead of running on the wrong model.
    fn profile(&self) -> &str;

    /// Tasks with equal keys may run together in one `run_batch` call (same shapes, steps,
    /// solver...). Return a unique key (e.g. the job id) to disable batching for a task.
    fn batch_key(&self, task: &StageTask) -> String;

    /// Runs a batch on a blocking thread; returns one result per task, in order.
    ///
    /// Call `progress(task_index, step, total)` after each step of each task (1-based `step`);
    /// when it returns false, that task is cancelled: stop work on it and return
    /// `Err(StageError::Cancelled)` for it (the others go on). Must be deterministic: the same
    /// task gives the same output whatever the batch it runs in.
    fn run_batch(
        &self,
        tasks: &[StageTask],
        progress: &mut dyn FnMut(usize, u32, u32) -> bool,
    ) -> Vec<Result<StageOutput, StageError>>;
}
