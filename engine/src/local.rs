//! Runs a whole job in one process — no Redis, no network — through the very executors the
//! worker pools use, stage after stage. Same spec and seed ⇒ the same PNG bytes as the cluster.

use std::sync::Arc;

use fmboost_core::spec::{JobSpec, Upload};
use fmboost_core::stage::{StageError, StageExecutor, StageInput, StageKind, StageOutput, StageRef, StageTask};

use crate::executor::ModelExecutor;
use crate::stack::ProfileModels;

/// The three stages of a profile in one process.
pub struct LocalPipeline {
    diffusion: ModelExecutor,
    cfm: ModelExecutor,
    decoder: ModelExecutor,
}

/// What a finished local run gives.
#[derive(Debug, Clone)]
pub struct LocalResult {
    pub png: Vec<u8>,
    /// The latent the decoder started from (the last CFM hop's output).
    pub final_latent: fmboost_core::tensor::WireTensor,
}

impl LocalPipeline {
    pub fn new(models: Arc<ProfileModels>) -> Self {
        Self {
            diffusion: ModelExecutor::new(StageKind::Diffusion, models.clone()),
            cfm: ModelExecutor::new(StageKind::Cfm, models.clone()),
            decoder: ModelExecutor::new(StageKind::Decoder, models),
        }
    }

    /// Runs `spec` (validated) from its first stage to the PNG. `progress(stage, step, total)`
    /// follows every step and returns false to cancel.
    pub fn run(
        &self,
        spec: &JobSpec,
        upload: Option<Upload>,
        progress: &mut dyn FnMut(StageRef, u32, u32) -> bool,
    ) -> Result<LocalResult, (StageRef, StageError)> {
        let mut stage = spec.first_stage();
        let mut input = match upload {
            None => StageInput::Text,
            Some(Upload::Image(bytes)) => StageInput::Image(bytes),
            Some(Upload::Latent(latent)) => StageInput::Latent(latent),
        };
        loop {
            let executor = match stage.kind {
                StageKind::Diffusion => &self.diffusion,
                StageKind::Cfm => &self.cfm,
                StageKind::Decoder => &self.decoder,
            };
            let task = StageTask { job_id: "local".into(), spec: spec.clone(), hop: stage.hop, input: input.clone() };
            let mut on_step = |_: usize, step: u32, total: u32| progress(stage, step, total);
            let output = executor
                .run_batch(std::slice::from_ref(&task), &mut on_step)
                .pop()
                .expect("one result per task")
                .map_err(|e| (stage, e))?;
            match (output, spec.next_stage(stage)) {
                (StageOutput::Latent(latent), Some(next)) => {
                    input = StageInput::Latent(latent);
                    stage = next;
                }
                (StageOutput::Image { png }, None) => {
                    let StageInput::Latent(final_latent) = input else {
                        unreachable!("the decoder always starts from a latent")
                    };
                    return Ok(LocalResult { png, final_latent });
                }
                (_, _) => {
                    return Err((stage, StageError::Failed(format!("{stage} produced an output of the wrong kind"))));
                }
            }
        }
    }
}
