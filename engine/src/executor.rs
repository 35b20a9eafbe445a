//! The worker pools' stage executors on real models: `fmboost_core`'s [`StageExecutor`]
//! implemented over [`ProfileModels`]. `fmboost generate` runs these same executors in one
//! process, so a job gives the same bytes locally and through the cluster.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use fmboost_core::spec::{JobSpec, Source};
use fmboost_core::stage::{StageError, StageExecutor, StageInput, StageKind, StageOutput, StageTask};
use fmboost_core::tensor::WireTensor;
use fmboost_models::autoencoder::TileConfig;
use fmboost_models::cfm::Solver;
use fmboost_models::progress::{Flow, RunError, Step};

use crate::picture::{encode_png, rgb8_to_tensor, tensor_to_rgb8, GenerationParameters, Rgb8};
use crate::stack::{BaseJob, BaseRequest, ProfileModels};

/// Computes one stage of a profile's pipeline.
///
/// A batch runs job after job by default: a job's bytes then never depend on which other jobs
/// shared its batch (CPU GEMM blocking, for one, changes the last bits with the batch size),
/// which is what makes cluster output equal `fmboost generate`'s. `stacked` runs a batch as one
/// tensor batch instead — faster on GPUs, at the price of that guarantee.
pub struct ModelExecutor {
    kind: StageKind,
    models: Arc<ProfileModels>,
    stacked: bool,
}

impl ModelExecutor {
    pub fn new(kind: StageKind, models: Arc<ProfileModels>) -> Self {
        Self { kind, models, stacked: false }
    }

    /// Runs batches as one tensor batch (see the type's docs).
    pub fn stacked(mut self, stacked: bool) -> Self {
        self.stacked = stacked;
        self
    }
}

impl StageExecutor for ModelExecutor {
    fn kind(&self) -> StageKind {
        self.kind
    }

    fn profile(&self) -> &str {
        &self.models.spec.name
    }

    fn batch_key(&self, task: &StageTask) -> String {
        let spec = &task.spec;
        match (self.kind, &spec.source, &task.input) {
            (StageKind::Diffusion, Source::Text { negative_prompt, .. }, _) => {
                let base = spec.base.as_ref();
                format!("text {:?} {:?}", base.map(|b| (b.width, b.height, b.steps, &b.scheduler, b.guidance.to_bits())), negative_prompt)
            }
            (StageKind::Cfm, _, StageInput::Latent(latent)) => {
                format!("cfm {} {:?} {} {}", task.hop, latent.shape, spec.cfm.solver, spec.cfm.steps)
            }
            (StageKind::Decoder, _, StageInput::Latent(latent)) => {
                // The PNG's size and parameters differ per job; only the decode itself is shared.
                format!("decode {:?} {} {}", latent.shape, spec.decode.tile, spec.decode.overlap)
            }
            // Uploaded images differ in size and anything unexpected fails alone.
            _ => format!("job {}", task.job_id),
        }
    }

    fn run_batch(&self, tasks: &[StageTask], progress: &mut dyn FnMut(usize, u32, u32) -> bool) -> Vec<Result<StageOutput, StageError>> {
        if self.stacked {
            return self.run_stacked(tasks, progress);
        }
        let mut results = Vec::with_capacity(tasks.len());
        for (i, task) in tasks.iter().enumerate() {
            let mut one = |_: usize, step: u32, total: u32| progress(i, step, total);
            results.extend(self.run_stacked(std::slice::from_ref(task), &mut one));
        }
        results
    }
}

impl ModelExecutor {
    /// Runs `tasks` as one tensor batch.
    fn run_stacked(&self, tasks: &[StageTask], progress: &mut dyn FnMut(usize, u32, u32) -> bool) -> Vec<Result<StageOutput, StageError>> {
        if tasks.is_empty() {
            return Vec::new();
        }
        let mut cancelled = vec![false; tasks.len()];
        // A batch shares each step: report it to every task still wanted, stop only when none is.
        let mut on_step = |step: Step| {
            for (i, flag) in cancelled.iter_mut().enumerate() {
                if !*flag && !progress(i, step.step as u32, step.total as u32) {
                    *flag = true;
                }
            }
            if cancelled.iter().all(|&c| c) {
                Flow::Stop
            } else {
                Flow::Continue
            }
        };
        let result = match self.kind {
            StageKind::Diffusion => self.run_diffusion(tasks, &mut on_step),
            StageKind::Cfm => self.run_cfm(tasks, &mut on_step),
            StageKind::Decoder => self.run_decoder(tasks, &mut on_step),
        };
        match result {
            Ok(outputs) => outputs
                .into_iter()
                .zip(&cancelled)
                .map(|(output, &was_cancelled)| if was_cancelled { Err(StageError::Cancelled) } else { Ok(output) })
                .collect(),
            Err(error) => {
                let error = stage_error(error);
                tasks.iter().map(|_| Err(error.clone())).collect()
            }
        }
    }
}

fn stage_error(error: RunError) -> StageError {
    match error {
        RunError::Cancelled { .. } => StageError::Cancelled,
        RunError::Invalid(message) => StageError::InvalidInput(message),
        RunError::Candle(error) => StageError::Failed(error.to_string()),
    }
}

fn invalid(message: impl Into<String>) -> RunError {
    RunError::Invalid(message.into())
}

impl ModelExecutor {
    fn run_diffusion(&self, tasks: &[StageTask], progress: &mut dyn FnMut(Step) -> Flow) -> Result<Vec<StageOutput>, RunError> {
        let first = &tasks[0];
        let latents = match (&first.spec.source, &first.input) {
            (Source::Text { negative_prompt, .. }, StageInput::Text) => {
                let base = first.spec.base.as_ref().ok_or_else(|| invalid("base: a text job needs base settings"))?;
                let request = BaseRequest {
                    width: base.width as usize,
                    height: base.height as usize,
                    steps: base.steps as usize,
                    scheduler: &base.scheduler,
                    guidance: base.guidance as f64,
                    negative_prompt,
                };
                let jobs = tasks
                    .iter()
                    .map(|task| match &task.spec.source {
                        Source::Text { prompt, .. } => Ok(BaseJob { prompt: prompt.as_str(), seed: task.spec.seed }),
                        _ => Err(invalid("a text batch holds a non-text job")),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                self.models.base_latents(&jobs, &request, progress)?
            }
            (Source::Image { .. }, StageInput::Image(bytes)) => {
                let image = decode_image(bytes)?;
                let tensor = rgb8_to_tensor(&image, &Device::Cpu)?.unsqueeze(0)?;
                let latent = self.models.encode(&tensor)?;
                fmboost_models::progress::report(progress, 1, 1)?;
                latent
            }
            _ => return Err(invalid("the diffusion stage takes a text or image source")),
        };
        split_latents(&latents, tasks.len())
    }

    fn run_cfm(&self, tasks: &[StageTask], progress: &mut dyn FnMut(Step) -> Flow) -> Result<Vec<StageOutput>, RunError> {
        let first = &tasks[0];
        let solver: Solver = first.spec.cfm.solver.parse().map_err(invalid)?;
        let steps = first.spec.cfm.steps as usize;
        let z_lo = stack_latents(tasks)?;
        let seeds: Vec<u64> = tasks.iter().map(|t| t.spec.seed).collect();
        let z_hi = self.models.hop(first.hop, &z_lo, &seeds, solver, steps, progress)?;
        split_latents(&z_hi, tasks.len())
    }

    fn run_decoder(&self, tasks: &[StageTask], progress: &mut dyn FnMut(Step) -> Flow) -> Result<Vec<StageOutput>, RunError> {
        let first = &tasks[0];
        let tiles = match first.spec.decode.tile {
            0 => None,
            tile => Some(TileConfig { tile: tile as usize, overlap: first.spec.decode.overlap as usize, auto_above: 0 }),
        };
        let z = stack_latents(tasks)?;
        let images = self.models.decode(&z, tiles, progress)?;
        tasks
            .iter()
            .enumerate()
            .map(|(i, task)| {
                let rgb = tensor_to_rgb8(&images.get(i)?)?;
                let png = encode_png(&rgb, &generation_parameters(&task.spec, &self.models.spec.name))
                    .map_err(|e| RunError::Candle(candle_core::Error::msg(format!("PNG encoding: {e}"))))?;
                Ok(StageOutput::Image { png })
            })
            .collect()
    }
}

/// How a job's image was made, for the PNG's `parameters` chunk.
pub fn generation_parameters(spec: &JobSpec, profile: &str) -> GenerationParameters {
    let (width, height) = spec.output_size();
    let mut parameters = GenerationParameters {
        seed: spec.seed,
        width: width as u32,
        height: height as u32,
        cfm_hops: spec.cfm.hops,
        cfm_solver: spec.cfm.solver.clone(),
        cfm_steps: spec.cfm.steps,
        profile: profile.to_string(),
        ..Default::default()
    };
    match &spec.source {
        Source::Text { prompt, negative_prompt } => {
            parameters.prompt = prompt.clone();
            parameters.negative_prompt = negative_prompt.clone();
        }
        Source::Latent { shape, .. } => parameters.source = Some(format!("uploaded latent {shape:?}")),
        Source::Image { width, height } => parameters.source = Some(format!("uploaded image {width}x{height}")),
    }
    if let Some(base) = &spec.base {
        parameters.steps = base.steps;
        parameters.scheduler = base.scheduler.clone();
        parameters.guidance = base.guidance;
    }
    parameters
}

/// Stacks the tasks' input latents (each `[1, C, H, W]` or `[C, H, W]`) into one batch.
fn stack_latents(tasks: &[StageTask]) -> Result<Tensor, RunError> {
    let parts = tasks
        .iter()
        .map(|task| match &task.input {
            StageInput::Latent(latent) => wire_to_tensor(latent),
            _ => Err(invalid("this stage takes a latent input")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

/// A wire latent as an f32 `[1, C, H, W]` tensor on the CPU.
pub fn wire_to_tensor(latent: &WireTensor) -> Result<Tensor, RunError> {
    let shape = match latent.shape.as_slice() {
        [c, h, w] => vec![1, *c, *h, *w],
        [1, c, h, w] => vec![1, *c, *h, *w],
        other => return Err(invalid(format!("latent of shape {other:?}: expected [1, C, H, W] or [C, H, W]"))),
    };
    Ok(Tensor::from_vec(latent.to_f32(), shape, &Device::Cpu)?)
}

/// An f32 tensor as a wire tensor.
pub fn tensor_to_wire(tensor: &Tensor) -> Result<WireTensor, RunError> {
    let values = tensor.to_device(&Device::Cpu)?.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(WireTensor::from_f32(tensor.dims().to_vec(), &values))
}

fn split_latents(latents: &Tensor, n: usize) -> Result<Vec<StageOutput>, RunError> {
    (0..n).map(|i| Ok(StageOutput::Latent(tensor_to_wire(&latents.narrow(0, i, 1)?)?))).collect()
}

fn decode_image(bytes: &[u8]) -> Result<Rgb8, RunError> {
    let image = image::load_from_memory(bytes).map_err(|e| invalid(format!("source image: {e}")))?.to_rgb8();
    let (width, height) = image.dimensions();
    if width % 8 != 0 || height % 8 != 0 {
        return Err(invalid(format!("source image: {width}x{height} px is not a multiple of 8")));
    }
    Ok(Rgb8 { width, height, data: image.into_raw() })
}
