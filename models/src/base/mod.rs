//! SD 1.5 text-to-latent: CLIP tokenizer and text encoder, the UNet (candle-transformers'),
//! classifier-free guidance with a negative prompt, and the DDIM / Euler ancestral / LCM
//! schedulers. Weights come from a diffusers-format directory on disk as the hub ships it, or
//! a single-file checkpoint ([`single_file`]) (see docs/models/sd15.md), optionally with LoRA
//! files (LCM-LoRA, for instance) fused into the UNet at load time.
//!
//! Prompts longer than the text encoder's context (77 tokens with start/end) are truncated
//! with a warning, as diffusers does. Initial noise and scheduler noise are drawn per job from
//! `rng::Stream::Base`, in the order: initial latent, then each step's draw.

pub mod lora;
pub mod scheduler;
pub mod single_file;
pub mod text;
pub mod tokenizer;
pub mod unet;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::stable_diffusion::unet_2d::UNet2DConditionModel;
use serde::{Deserialize, Serialize};

use crate::autoencoder::AutoencoderConfig;
use crate::progress::{self, Progress, RunError};
use crate::rng::Stream;
use crate::weights::{self, LoadError};

pub use scheduler::{NoiseSource, ReplayNoise, Scheduler, SchedulerConfig, SchedulerKind, SeededNoise};
pub use text::{ClipConfig, TextEncoder};
pub use tokenizer::{PromptTokenizer, SpecialTokens, Tokens};
pub use unet::UNetConfig;

/// Settings of one text-to-latent run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextToLatent {
    /// Image width in pixels (a multiple of 8); the latent is width / 8 wide.
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub scheduler: SchedulerKind,
    /// Classifier-free guidance scale; ≤ 1 runs the conditional branch only (as diffusers).
    pub guidance: f64,
    /// Used for the unconditional branch of guidance ("" when unset, as diffusers).
    pub negative_prompt: String,
}

impl Default for TextToLatent {
    fn default() -> Self {
        Self { width: 512, height: 512, steps: 25, scheduler: SchedulerKind::Ddim, guidance: 7.5, negative_prompt: String::new() }
    }
}

impl TextToLatent {
    /// Checks the settings against a VAE that downsamples by `factor`.
    pub fn validate(&self, factor: usize) -> Result<(), String> {
        for (name, value) in [("width", self.width), ("height", self.height)] {
            if value == 0 || value % factor != 0 {
                return Err(format!("{name} {value} must be a positive multiple of {factor} px"));
            }
        }
        if self.steps == 0 {
            return Err("steps must be at least 1".into());
        }
        if !(self.guidance.is_finite() && self.guidance >= 0.0) {
            return Err(format!("guidance {} must be a finite number ≥ 0", self.guidance));
        }
        if self.guidance <= 1.0 && !self.negative_prompt.is_empty() {
            return Err(format!("negative_prompt needs guidance > 1 (got {}): without guidance it has no effect", self.guidance));
        }
        Ok(())
    }
}

/// A LoRA file to fuse into the UNet at load time.
#[derive(Debug, Clone)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub scale: f64,
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// The run dtype; weights stored in another (fp16 files, say) are converted at load.
    pub dtype: DType,
    pub loras: Vec<LoraSpec>,
    /// The weights variant to read (`fp16` → `*.fp16.safetensors`), as diffusers' `variant`: each
    /// component folder that has files of it reads them, the others their plain files; an error
    /// when none has it. Unset reads the plain files only.
    pub variant: Option<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, dtype: DType::F32, loras: Vec::new(), variant: None }
    }
}

/// The text-to-latent stage. `Send + Sync`: one instance serves many jobs.
pub struct StableDiffusion {
    tokenizer: PromptTokenizer,
    text_encoder: TextEncoder,
    unet: UNet2DConditionModel,
    unet_config: UNetConfig,
    scheduler_config: SchedulerConfig,
    latent_factor: usize,
    device: Device,
    dtype: DType,
}

impl StableDiffusion {
    /// Loads a diffusers-format directory: `unet/` and `text_encoder/` (config.json and weights:
    /// safetensors, sharded safetensors or a PyTorch `.bin`; `options.variant` where the folder
    /// has it, as diffusers), `tokenizer/` (`tokenizer.json`, or `vocab.json` + `merges.txt`),
    /// `vae/config.json` (for the latent size) and, when present,
    /// `scheduler/scheduler_config.json`. Every missing file is named in one error.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self, LoadError> {
        if !dir.is_dir() {
            return Err(LoadError::Io { path: dir.into(), source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory") });
        }
        // As a diffusers pipeline: a variant applies to each component folder that has files of
        // it (the others load their plain files), and at least one must.
        let (unet_dir, text_dir) = (dir.join("unet"), dir.join("text_encoder"));
        let (unet_names, text_names) = (weights::WeightNames::DIFFUSERS, weights::WeightNames::TRANSFORMERS);
        let (unet_variant, text_variant) = match options.variant.as_deref() {
            Some(v) if weights::has_variant(&unet_dir, unet_names, v) || weights::has_variant(&text_dir, text_names, v) => (
                Some(v).filter(|v| weights::has_variant(&unet_dir, unet_names, v)),
                Some(v).filter(|v| weights::has_variant(&text_dir, text_names, v)),
            ),
            variant => (variant, variant),
        };
        let unet_weights = weights::find_weights(&unet_dir, unet_names, unet_variant);
        let text_weights = weights::find_weights(&text_dir, text_names, text_variant);
        let mut missing = Vec::new();
        for file in ["unet/config.json", "text_encoder/config.json", "vae/config.json"] {
            if !dir.join(file).is_file() {
                missing.push(file.to_string());
            }
        }
        let tokenizer_dir = dir.join("tokenizer");
        missing.extend(tokenizer::missing_files(&tokenizer_dir, "tokenizer/"));
        for found in [&unet_weights, &text_weights] {
            if let Err(what) = found {
                missing.push(what.clone());
            }
        }
        if !missing.is_empty() {
            return Err(LoadError::MissingFiles { dir: dir.into(), files: missing });
        }
        let (unet_weights, text_weights) = (unet_weights.expect("checked"), text_weights.expect("checked"));

        let vae_config: AutoencoderConfig = weights::read_json(&dir.join("vae/config.json"))?;
        let scheduler_path = dir.join("scheduler/scheduler_config.json");
        let scheduler_config = if scheduler_path.is_file() { weights::read_json(&scheduler_path)? } else { SchedulerConfig::default() };

        let clip_config: ClipConfig = weights::read_json(&dir.join("text_encoder/config.json"))?;
        let text_tensors = weights::read_weights(&text_weights)?;
        let text_encoder =
            TextEncoder::build(&clip_config, &text_tensors, &text_weights.display().to_string(), options.dtype, &options.device)?;
        let tokenizer = tokenizer_for(&tokenizer_dir, &clip_config, &text_encoder)?;

        let unet_config: UNetConfig = weights::read_json(&dir.join("unet/config.json"))?;
        let unet_tensors = fuse_loras(weights::read_weights(&unet_weights)?, &options.loras)?;
        let unet = unet::build_unet(&unet_config, &unet_tensors, &unet_weights.display().to_string(), options.dtype, &options.device)?;
        Ok(Self {
            tokenizer,
            text_encoder,
            unet,
            unet_config,
            scheduler_config,
            latent_factor: vae_config.downscale(),
            device: options.device.clone(),
            dtype: options.dtype,
        })
    }

    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    pub fn tokenizer(&self) -> &PromptTokenizer {
        &self.tokenizer
    }

    pub fn unet_config(&self) -> &UNetConfig {
        &self.unet_config
    }

    /// Pixels per latent pixel (8 for SD 1.5).
    pub fn latent_factor(&self) -> usize {
        self.latent_factor
    }

    /// Prompts → text-encoder hidden states (B, 77, D).
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<Tensor, RunError> {
        let ids = self.tokenizer.batch(prompts, &self.device).map_err(RunError::Invalid)?;
        Ok(self.text_encoder.forward(&ids)?)
    }

    /// Runs text-to-latent for each prompt with its own seed; returns the (scaled) latents
    /// (B, C, height/8, width/8) on the model's device. `progress` is called after every step
    /// and may stop the run.
    pub fn generate(&self, prompts: &[&str], seeds: &[u64], settings: &TextToLatent, progress: Progress) -> Result<Tensor, RunError> {
        settings.validate(self.latent_factor).map_err(RunError::Invalid)?;
        if prompts.is_empty() {
            return Err(RunError::Invalid("no prompts given".into()));
        }
        if prompts.len() != seeds.len() {
            return Err(RunError::Invalid(format!("{} prompts but {} seeds: give one seed per prompt", prompts.len(), seeds.len())));
        }
        let scheduler = Scheduler::new(settings.scheduler, &self.scheduler_config, settings.steps).map_err(RunError::Invalid)?;
        let cond = self.encode_prompts(prompts)?;
        let uncond = if settings.guidance > 1.0 {
            let negative = vec![settings.negative_prompt.as_str(); prompts.len()];
            Some(self.encode_prompts(&negative)?)
        } else {
            None
        };
        let mut noise = SeededNoise::new(seeds, Stream::Base);
        let shape = [prompts.len(), self.unet_config.in_channels, settings.height / self.latent_factor, settings.width / self.latent_factor];
        let latents = (noise.next(&shape, &self.device)?.to_dtype(self.dtype)? * scheduler.init_noise_sigma())?;
        denoise(&self.unet, latents, &cond, uncond.as_ref(), settings.guidance, &scheduler, &mut noise, progress)
    }
}

/// Fuses each LoRA into diffusers-named UNet tensors (a leading prefix such as `unet.` is
/// detected and stripped when there are LoRAs).
/// The tokenizer of `dir` (a tokenizer folder or a pipeline folder) for this text encoder: its
/// context is the encoder's, and its ids must fit the encoder's embedding.
pub(crate) fn tokenizer_for(dir: &Path, clip_config: &ClipConfig, text_encoder: &TextEncoder) -> Result<PromptTokenizer, LoadError> {
    let tokenizer = PromptTokenizer::from_dir(dir, Some(text_encoder.context()))?;
    if tokenizer.vocab_size() > clip_config.vocab_size {
        return Err(LoadError::Config {
            path: tokenizer.source().to_string().into(),
            message: format!(
                "{} token ids, more than the text encoder's vocab_size {}: tokenizer and encoder are from different models",
                tokenizer.vocab_size(),
                clip_config.vocab_size
            ),
        });
    }
    Ok(tokenizer)
}

fn fuse_loras(mut unet_tensors: HashMap<String, Tensor>, loras: &[LoraSpec]) -> Result<HashMap<String, Tensor>, LoadError> {
    for lora in loras {
        let adapter = weights::read_safetensors(&lora.path)?;
        let prefix = crate::autoencoder::detect_prefix(&unet_tensors, "conv_in.weight");
        let mut stripped = weights::strip_prefix(&unet_tensors, &prefix);
        let fused = lora::fuse(&mut stripped, &adapter, lora.scale, &lora.path.display().to_string())?;
        tracing::info!(path = %lora.path.display(), layers = fused, scale = lora.scale, "fused LoRA into the UNet");
        unet_tensors = stripped;
    }
    Ok(unet_tensors)
}

/// The sampling loop: from `latents` (already × init noise sigma) through every scheduler step,
/// with classifier-free guidance `uncond + g·(cond − uncond)` when `uncond` is given.
#[allow(clippy::too_many_arguments)]
pub fn denoise(
    unet: &UNet2DConditionModel,
    latents: Tensor,
    cond: &Tensor,
    uncond: Option<&Tensor>,
    guidance: f64,
    scheduler: &Scheduler,
    noise: &mut dyn NoiseSource,
    progress: Progress,
) -> Result<Tensor, RunError> {
    let context = match uncond {
        Some(u) => Tensor::cat(&[u, cond], 0)?,
        None => cond.clone(),
    };
    let total = scheduler.timesteps().len();
    let mut latents = latents;
    for (index, &t) in scheduler.timesteps().iter().enumerate() {
        let input = scheduler.scale_model_input(&latents, index)?;
        let output = match uncond {
            Some(_) => {
                let both = unet.forward(&Tensor::cat(&[&input, &input], 0)?, t, &context)?;
                let n = input.dim(0)?;
                let (u, c) = (both.narrow(0, 0, n)?, both.narrow(0, n, n)?);
                (&u + ((c - &u)? * guidance)?)?
            }
            None => unet.forward(&input, t, &context)?,
        };
        latents = scheduler.step(&output, index, &latents, noise)?;
        progress::report(progress, index + 1, total)?;
    }
    Ok(latents)
}

#[cfg(test)]
mod tests {
    #[test]
    fn stage_types_can_cross_threads() {
        fn check<T: Send + Sync>() {}
        check::<super::StableDiffusion>();
        check::<super::Scheduler>();
        check::<crate::autoencoder::Autoencoder>();
    }

    #[test]
    fn settings_name_the_bad_field() {
        let s = super::TextToLatent { width: 500, ..Default::default() };
        assert!(s.validate(8).unwrap_err().contains("width 500"));
        assert!(super::TextToLatent::default().validate(8).is_ok());
    }
}
