//! The networks of one profile, loaded for the stages a process serves, and the stage
//! computations on candle tensors. Workers and `fmboost generate` both go through here.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use fmboost_models::autoencoder::{Autoencoder, AutoencoderConfig, TileConfig};
use fmboost_models::base::single_file::SingleFileOptions;
use fmboost_models::base::{LoadOptions, LoraSpec, StableDiffusion, TextToLatent};
use fmboost_models::cfm::{self, EfficientUNet, HopConfig, LatentCodec, Solver, UNetConfig, UpsampleMode, WeightSource};
use fmboost_models::progress::{Flow, RunError, Step};
use fmboost_models::rng::{randn_batch, Stream};

use crate::files::Files;
use crate::profile::{AutoencoderKind, BaseSpec, ProfileSpec};

/// Why a profile's models could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    File(#[from] crate::files::FileError),
    #[error("profile `{profile}`: {message}")]
    Invalid { profile: String, message: String },
    #[error("profile `{profile}`: {component}: {message}")]
    Component { profile: String, component: String, message: String },
}

/// Which networks a process needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    pub base: bool,
    pub autoencoder: bool,
    pub hops: bool,
}

impl Needs {
    pub const ALL: Needs = Needs { base: true, autoencoder: true, hops: true };
}

/// The low-resolution latent generator.
pub enum BaseModel {
    StableDiffusion(Box<StableDiffusion>),
    /// Unconditional flow matching: integrates the UNet's velocity from N(0, I) at t = 0.
    Flow { unet: EfficientUNet, latent_hw: (usize, usize) },
}

/// One CFM hop's network and fixed settings (solver and steps come with each job).
pub struct HopModel {
    pub unet: EfficientUNet,
    pub upsample: UpsampleMode,
    pub noising_step: usize,
}

/// The loaded networks of a profile.
pub struct ProfileModels {
    pub spec: ProfileSpec,
    pub device: Device,
    base: Option<BaseModel>,
    autoencoder: Option<Autoencoder>,
    hops: Vec<HopModel>,
}

/// The scheduler name of a flow-matching base: Euler steps of its ODE.
pub const FLOW_SCHEDULER: &str = "euler";
/// Pixels per latent pixel of the kl-f8 autoencoders every profile uses.
pub const LATENT_FACTOR: usize = fmboost_core::capabilities::LATENT_FACTOR as usize;

/// Settings of a base-stage batch (shared by its jobs).
#[derive(Debug, Clone)]
pub struct BaseRequest<'a> {
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub scheduler: &'a str,
    pub guidance: f64,
    pub negative_prompt: &'a str,
}

/// Per-job inputs of the base stage.
#[derive(Debug, Clone)]
pub struct BaseJob<'a> {
    pub prompt: &'a str,
    pub seed: u64,
}

/// The autoencoder as the CFM's `psu` mode sees it.
struct Codec<'a>(&'a Autoencoder);

impl LatentCodec for Codec<'_> {
    fn encode(&self, image: &Tensor) -> candle_core::Result<Tensor> {
        self.0.encode(image)
    }
    fn decode(&self, latent: &Tensor) -> candle_core::Result<Tensor> {
        self.0.decode(latent)
    }
}

impl ProfileModels {
    /// Loads the networks `needs` asks for, in f32 on `device`.
    pub fn load(spec: ProfileSpec, files: Files, needs: Needs, device: &Device) -> Result<Self, LoadError> {
        let profile = spec.name.clone();
        let component = |component: &str, message: String| LoadError::Component {
            profile: profile.clone(),
            component: component.to_string(),
            message,
        };
        let dtype = DType::F32;
        // psu upsampling decodes and re-encodes, so the CFM stage needs the autoencoder too.
        let hops_need_codec = needs.hops && spec.hops.iter().any(|h| h.upsample == UpsampleMode::Psu);
        let autoencoder = if needs.autoencoder || hops_need_codec {
            Some(load_autoencoder(&spec, files, device).map_err(|m| component("autoencoder", m))?)
        } else {
            None
        };
        let base = if needs.base {
            Some(load_base(&spec.base, files, device, dtype).map_err(|m| component("base", m))?)
        } else {
            None
        };
        let mut hops = Vec::new();
        if needs.hops {
            for (i, hop) in spec.hops.iter().enumerate() {
                let name = format!("hop {}", i + 1);
                let config = read_unet_config(files, &hop.config).map_err(|m| component(&name, m))?;
                let unet = load_unet(files, &hop.weights, &config, device, dtype).map_err(|m| component(&name, m))?;
                hops.push(HopModel { unet, upsample: hop.upsample, noising_step: hop.noising_step });
            }
        }
        let latent_channels = autoencoder.as_ref().map(|a| a.config().latent_channels);
        crate::capabilities::check_models(&spec.capabilities, base.as_ref(), latent_channels, &hops)
            .map_err(|message| LoadError::Invalid { profile: profile.clone(), message })?;
        Ok(Self { spec, device: device.clone(), base, autoencoder, hops })
    }

    /// The multiple of pixels an input image's sides must have for the CFM hops: the
    /// profile's `[capabilities]`, which loading checked against the hop UNets.
    pub fn pixel_multiple(&self) -> u32 {
        self.spec.capabilities.pixel_multiple()
    }

    /// Hops this profile has.
    pub fn hop_count(&self) -> usize {
        self.spec.hops.len()
    }

    fn autoencoder(&self) -> Result<&Autoencoder, RunError> {
        self.autoencoder.as_ref().ok_or_else(|| RunError::Invalid("this process did not load the autoencoder".into()))
    }

    /// Latent channels of the profile's autoencoder (needs the autoencoder loaded).
    pub fn latent_channels(&self) -> Option<usize> {
        self.autoencoder.as_ref().map(|a| a.config().latent_channels)
    }

    /// Text (or nothing, for an unconditional base) → scaled latents `[B, C, h, w]`, one
    /// seed per job; settings are shared by the batch.
    pub fn base_latents(&self, jobs: &[BaseJob<'_>], request: &BaseRequest<'_>, progress: &mut dyn FnMut(Step) -> Flow) -> Result<Tensor, RunError> {
        let base = self.base.as_ref().ok_or_else(|| RunError::Invalid("this process did not load the base model".into()))?;
        let seeds: Vec<u64> = jobs.iter().map(|j| j.seed).collect();
        match base {
            BaseModel::StableDiffusion(sd) => {
                let settings = TextToLatent {
                    width: request.width,
                    height: request.height,
                    steps: request.steps,
                    scheduler: request.scheduler.parse().map_err(RunError::Invalid)?,
                    guidance: request.guidance,
                    negative_prompt: request.negative_prompt.to_string(),
                };
                let prompts: Vec<&str> = jobs.iter().map(|j| j.prompt).collect();
                sd.generate(&prompts, &seeds, &settings, progress)
            }
            BaseModel::Flow { unet, latent_hw } => {
                let profile = &self.spec.name;
                if let Some(job) = jobs.iter().find(|j| !j.prompt.is_empty()) {
                    return Err(RunError::Invalid(format!("profile `{profile}` has an unconditional base model: it takes no prompt (got {:?})", job.prompt)));
                }
                if !request.negative_prompt.is_empty() || request.guidance != 1.0 {
                    return Err(RunError::Invalid(format!(
                        "profile `{profile}` has an unconditional base model: no negative prompt, guidance 1 (got guidance {})",
                        request.guidance
                    )));
                }
                if request.scheduler != FLOW_SCHEDULER {
                    return Err(RunError::Invalid(format!(
                        "profile `{profile}`: its flow-matching base integrates with `{FLOW_SCHEDULER}`, not `{}`",
                        request.scheduler
                    )));
                }
                let (h, w) = *latent_hw;
                let factor = LATENT_FACTOR;
                if request.height != h * factor || request.width != w * factor {
                    return Err(RunError::Invalid(format!(
                        "profile `{profile}` makes {}x{} px base images, not {}x{}",
                        w * factor,
                        h * factor,
                        request.width,
                        request.height
                    )));
                }
                if request.steps == 0 {
                    return Err(RunError::Invalid("steps must be at least 1".into()));
                }
                flow_sample(unet, *latent_hw, &seeds, request.steps, &self.device, progress)
            }
        }
    }

    /// Images `[B, 3, H, W]` in [−1, 1] (H, W multiples of 8) → scaled latents.
    pub fn encode(&self, images: &Tensor) -> Result<Tensor, RunError> {
        Ok(self.autoencoder()?.encode(&images.to_device(&self.device)?)?)
    }

    /// CFM hop `hop` (1-based) on `z_lo` with ε from each job's `(seed, Stream::Cfm(hop − 1))`.
    pub fn hop(&self, hop: u32, z_lo: &Tensor, seeds: &[u64], solver: Solver, steps: usize, progress: &mut dyn FnMut(Step) -> Flow) -> Result<Tensor, RunError> {
        let model = hop
            .checked_sub(1)
            .and_then(|i| self.hops.get(i as usize))
            .ok_or_else(|| RunError::Invalid(format!("profile `{}` has {} CFM hops, not hop {hop}", self.spec.name, self.hops.len())))?;
        let config = HopConfig { upsample: model.upsample, solver, steps, noising_step: model.noising_step, factor: 2 };
        let (b, c, h, w) = z_lo.dims4()?;
        let eps = cfm::hop_noise(seeds, hop - 1, &[b, c, 2 * h, 2 * w], &self.device)?;
        let codec = self.autoencoder.as_ref().map(Codec);
        let codec = codec.as_ref().map(|c| c as &dyn LatentCodec);
        let z_lo = z_lo.to_device(&self.device)?;
        Ok(cfm::sample_hop(&model.unet, &config, &z_lo, &eps, codec, progress)?.latent)
    }

    /// Scaled latents → images `[B, 3, H, W]` in [−1, 1] on the CPU. `tiles` forces tiling;
    /// `None` tiles automatically above the autoencoder's threshold.
    pub fn decode(&self, z: &Tensor, tiles: Option<TileConfig>, progress: &mut dyn FnMut(Step) -> Flow) -> Result<Tensor, RunError> {
        let autoencoder = self.autoencoder()?;
        let z = z.to_device(&self.device)?;
        let (_, _, h, w) = z.dims4()?;
        let tiles = tiles.or_else(|| autoencoder.tiling().should_tile(h, w).then(|| *autoencoder.tiling()));
        let image = match tiles {
            Some(tiles) => autoencoder.decode_tiled(&z, &tiles, progress)?,
            None => {
                let image = autoencoder.decode(&z)?;
                fmboost_models::progress::report(progress, 1, 1)?;
                image
            }
        };
        Ok(image.to_device(&Device::Cpu)?)
    }
}

/// Unconditional flow matching from x0 = N(0, I) (the job's `Stream::Base`) with Euler steps.
fn flow_sample(
    unet: &EfficientUNet,
    latent_hw: (usize, usize),
    seeds: &[u64],
    steps: usize,
    device: &Device,
    progress: &mut dyn FnMut(Step) -> Flow,
) -> Result<Tensor, RunError> {
    let channels = unet.config().out_channels;
    let x0 = randn_batch(seeds, Stream::Base, &[channels, latent_hw.0, latent_hw.1], device)?;
    let b = seeds.len();
    let mut velocity = |x: &Tensor, t: f32| {
        let t = Tensor::full(t, b, device)?;
        unet.forward(x, &t, None)
    };
    Ok(cfm::integrate(Solver::Euler, steps, &x0, &mut velocity, progress)?.0)
}

fn read_unet_config(files: Files, path: &Path) -> Result<UNetConfig, String> {
    let text = files.read_to_string(path).map_err(|e| e.to_string())?;
    UNetConfig::from_json(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn load_unet(files: Files, path: &Path, config: &UNetConfig, device: &Device, dtype: DType) -> Result<EfficientUNet, String> {
    let result = match files {
        Files::Disk => cfm::load_unet(WeightSource::File(path), config, device, dtype),
        Files::Embedded(_) => {
            let bytes = files.read(path).map_err(|e| e.to_string())?;
            let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| format!("{}: {e}", path.display()))?;
            cfm::load_unet(WeightSource::Tensors(&tensors), config, device, dtype)
        }
    };
    let (unet, report) = result.map_err(|e| e.to_string())?;
    tracing::info!(path = %path.display(), %report, "loaded CFM UNet");
    Ok(unet)
}

fn load_base(spec: &BaseSpec, files: Files, device: &Device, dtype: DType) -> Result<BaseModel, String> {
    match spec {
        BaseSpec::StableDiffusion { path, lora, lora_scale, variant, config, tokenizer } => {
            if matches!(files, Files::Embedded(_)) {
                return Err("a Stable Diffusion base must be on disk".into());
            }
            let options = LoadOptions {
                device: device.clone(),
                dtype,
                loras: lora.iter().map(|path| LoraSpec { path: path.clone(), scale: *lora_scale }).collect(),
                variant: variant.clone(),
            };
            if !path.exists() {
                return Err(format!("{}: no such file or directory (a diffusers SD directory or a single-file checkpoint)", path.display()));
            }
            let sd = if path.is_file() {
                if let Some(variant) = variant {
                    return Err(format!(
                        "`variant = \"{variant}\"` picks files in a diffusers directory; {} is a single file (remove `variant`)",
                        path.display()
                    ));
                }
                let single = SingleFileOptions { config: config.clone(), tokenizer: tokenizer.clone() };
                StableDiffusion::load_single_file(path, &single, &options)
            } else {
                if config.is_some() || tokenizer.is_some() {
                    return Err(format!(
                        "`config` and `tokenizer` are for a single-file checkpoint; {} is not a file (a diffusers directory has its own)",
                        path.display()
                    ));
                }
                StableDiffusion::load(path, &options)
            };
            Ok(BaseModel::StableDiffusion(Box::new(sd.map_err(|e| e.to_string())?)))
        }
        BaseSpec::Flow { path, config, latent_size } => {
            let config = read_unet_config(files, config)?;
            if config.in_channels != config.out_channels {
                return Err(format!(
                    "a flow base UNet takes no context: in_channels ({}) must equal out_channels ({})",
                    config.in_channels, config.out_channels
                ));
            }
            let unet = load_unet(files, path, &config, device, dtype)?;
            Ok(BaseModel::Flow { unet, latent_hw: (latent_size[0], latent_size[1]) })
        }
    }
}

fn load_autoencoder(spec: &ProfileSpec, files: Files, device: &Device) -> Result<Autoencoder, String> {
    let ae = &spec.autoencoder;
    let mut autoencoder = match (ae.kind, files) {
        (AutoencoderKind::Diffusers, Files::Disk) => {
            Autoencoder::load_diffusers_variant(&ae.path, ae.variant.as_deref(), DType::F32, device).map_err(|e| e.to_string())?
        }
        (AutoencoderKind::Ldm, Files::Disk) => Autoencoder::load_ldm_file(&ae.path, DType::F32, device).map_err(|e| e.to_string())?,
        (AutoencoderKind::Diffusers, Files::Embedded(_)) => {
            let config_path = ae.path.join("config.json");
            let weights_path = ae.path.join("diffusion_pytorch_model.safetensors");
            let config: AutoencoderConfig = serde_json::from_str(&files.read_to_string(&config_path).map_err(|e| e.to_string())?)
                .map_err(|e| format!("{}: {e}", config_path.display()))?;
            let bytes = files.read(&weights_path).map_err(|e| e.to_string())?;
            let tensors: HashMap<String, Tensor> =
                candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| format!("{}: {e}", weights_path.display()))?;
            Autoencoder::from_diffusers_tensors(&config, &tensors, &weights_path.display().to_string(), DType::F32, device).map_err(|e| e.to_string())?
        }
        (AutoencoderKind::Ldm, Files::Embedded(_)) => return Err("an embedded LDM autoencoder is not supported".into()),
    };
    let defaults = *autoencoder.tiling();
    let tiling = TileConfig {
        tile: ae.tile.unwrap_or(defaults.tile),
        overlap: ae.overlap.unwrap_or(defaults.overlap),
        auto_above: ae.auto_tile_above.unwrap_or(defaults.auto_above),
    };
    autoencoder.set_tiling(tiling).map_err(|e| format!("tiling: {e}"))?;
    Ok(autoencoder)
}
