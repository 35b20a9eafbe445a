//! The coupling-flow sampler: one hop lifts a latent by `factor` (z_up, noise augmentation,
//! ODE from t = 0 to 1 with context z_up); a chain runs hops one after another
//! (64² → 128² → 256² for SD latents).

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::resample::{upsample, LatentCodec, UpsampleMode};
use super::solver::{integrate, Solver};
use super::unet::EfficientUNet;
use crate::progress::{Flow, RunError, Step};
use crate::rng::{randn_batch, Stream};

/// Length of the reference's noise-augmentation table.
pub const DIFFUSION_STEPS: usize = 1000;

/// The reference's cosine ᾱ table (`ForwardDiffusion(im_size=64)`): ᾱ(t) = sigmoid(−2·ln(tan(πt/2)
/// + 1e-5)) on t = linspace(0, 1, 1000), computed in f64 and stored as f32 like the reference.
pub fn alpha_bar_cosine() -> Vec<f32> {
    (0..DIFFUSION_STEPS)
        .map(|i| {
            let t = i as f64 / (DIFFUSION_STEPS - 1) as f64;
            let log_snr = -2.0 * ((std::f64::consts::PI * t / 2.0).tan() + 1e-5).ln();
            (1.0 / (1.0 + (-log_snr).exp())) as f32
        })
        .collect()
}

/// x0 = √ᾱ·z_up + √(1 − ᾱ)·ε (the reference's `q_sample`).
pub fn noise_augment(z_up: &Tensor, eps: &Tensor, alpha_bar: f32) -> candle_core::Result<Tensor> {
    if z_up.dims() != eps.dims() {
        candle_core::bail!("noise augmentation: ε has shape {:?}, z_up has {:?}", eps.dims(), z_up.dims());
    }
    let (a, b) = ((alpha_bar as f64).sqrt(), (1.0 - alpha_bar as f64).sqrt());
    z_up.affine(a, 0.0)? + eps.to_dtype(z_up.dtype())?.affine(b, 0.0)?
}

fn default_noising_step() -> usize {
    400
}

fn default_factor() -> usize {
    2
}

/// Settings of one hop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HopConfig {
    /// How z_up is made.
    pub upsample: UpsampleMode,
    pub solver: Solver,
    /// Solver steps (the grid has `steps + 1` points; the reference's `num_steps` is this + 1).
    pub steps: usize,
    /// Index into the ᾱ table for the noise augmentation of the source.
    #[serde(default = "default_noising_step")]
    pub noising_step: usize,
    /// Spatial factor of the hop.
    #[serde(default = "default_factor")]
    pub factor: usize,
}

impl HopConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.steps == 0 {
            return Err("hop `steps`: must be > 0".into());
        }
        if self.noising_step >= DIFFUSION_STEPS {
            return Err(format!("hop `noising_step`: {} is outside the ᾱ table (0..{DIFFUSION_STEPS})", self.noising_step));
        }
        if self.factor == 0 {
            return Err("hop `factor`: must be > 0".into());
        }
        Ok(())
    }

    /// Network evaluations this hop costs.
    pub fn nfe(&self) -> usize {
        self.solver.nfe(self.steps)
    }
}

/// The result of one hop.
#[derive(Debug, Clone)]
pub struct HopSample {
    /// The high-resolution latent, f32.
    pub latent: Tensor,
    /// Network evaluations spent.
    pub nfe: usize,
}

/// Draws the ε of hop `hop` for a batch, one seeded stream per job (see `rng`).
pub fn hop_noise(seeds: &[u64], hop: u32, shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
    if shape.len() != 4 || shape[0] != seeds.len() {
        candle_core::bail!("hop noise: {} seeds for a batch of shape {shape:?}", seeds.len());
    }
    randn_batch(seeds, Stream::Cfm(hop), &shape[1..], device)
}

/// Lifts `z_lo` [B, C, h, w] to [B, C, h·factor, w·factor]: z_up = upsample(z_lo), x0 =
/// noise_augment(z_up, ε, ᾱ[noising_step]), then integrates dx/dt = unet(x, t, z_up). `eps` has
/// z_up's shape. The ODE state is kept in f32; the network runs in its own dtype.
pub fn sample_hop(
    unet: &EfficientUNet,
    config: &HopConfig,
    z_lo: &Tensor,
    eps: &Tensor,
    codec: Option<&dyn LatentCodec>,
    progress: &mut dyn FnMut(Step) -> Flow,
) -> Result<HopSample, RunError> {
    config.validate().map_err(candle_core::Error::msg)?;
    let device = unet.device();
    let (b, c, h, w) = z_lo.dims4()?;
    let target = (h * config.factor, w * config.factor);
    if eps.dims() != [b, c, target.0, target.1] {
        return Err(candle_core::Error::msg(format!(
            "hop ε has shape {:?}, expected {:?}",
            eps.dims(),
            [b, c, target.0, target.1]
        ))
        .into());
    }
    let net = unet.config();
    if net.out_channels != c || net.in_channels != 2 * c {
        return Err(candle_core::Error::msg(format!(
            "hop: a {c}-channel latent needs a UNet with in_channels {} and out_channels {c}, this one has {} and {}",
            2 * c,
            net.in_channels,
            net.out_channels
        ))
        .into());
    }
    let z_lo = z_lo.to_device(device)?.to_dtype(DType::F32)?;
    let z_up = upsample(&z_lo, config.upsample, target, codec)?.to_dtype(DType::F32)?;
    let alpha_bar = alpha_bar_cosine()[config.noising_step];
    let x0 = noise_augment(&z_up, &eps.to_device(device)?.to_dtype(DType::F32)?, alpha_bar)?;
    let context = z_up.to_dtype(unet.dtype())?;
    let mut velocity = |x: &Tensor, t: f32| {
        let t = Tensor::full(t, b, device)?;
        unet.forward(x, &t, Some(&context))?.to_dtype(DType::F32)
    };
    let (latent, nfe) = integrate(config.solver, config.steps, &x0, &mut velocity, progress)?;
    Ok(HopSample { latent, nfe })
}

/// One hop of a chain: its settings and its own network.
#[derive(Debug, Clone)]
pub struct CfmHop {
    pub config: HopConfig,
    pub unet: EfficientUNet,
}

/// Progress of a chain: which hop, and the step within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HopStep {
    /// 0-based hop index.
    pub hop: usize,
    pub hops: usize,
    pub step: Step,
}

/// Hops run one after another, each lifting the previous one's output.
#[derive(Debug, Clone)]
pub struct CfmChain {
    pub hops: Vec<CfmHop>,
}

/// The result of a chain.
#[derive(Debug, Clone)]
pub struct ChainSample {
    pub latent: Tensor,
    /// Network evaluations per hop.
    pub nfe: Vec<usize>,
}

impl CfmChain {
    pub fn new(hops: Vec<CfmHop>) -> Result<Self, String> {
        if hops.is_empty() {
            return Err("a CFM chain needs at least one hop".into());
        }
        for (i, hop) in hops.iter().enumerate() {
            hop.config.validate().map_err(|e| format!("hop {i}: {e}"))?;
        }
        Ok(Self { hops })
    }

    /// Output size for an input of `hw`.
    pub fn output_hw(&self, hw: (usize, usize)) -> (usize, usize) {
        self.hops.iter().fold(hw, |(h, w), hop| (h * hop.config.factor, w * hop.config.factor))
    }

    /// Runs every hop on `z_lo` [B, C, h, w] with ε of hop `i` drawn from
    /// `(seeds[j], Stream::Cfm(i))` for batch item `j`.
    pub fn sample(
        &self,
        z_lo: &Tensor,
        seeds: &[u64],
        codec: Option<&dyn LatentCodec>,
        progress: &mut dyn FnMut(HopStep) -> Flow,
    ) -> Result<ChainSample, RunError> {
        let hops = self.hops.len();
        let mut z = z_lo.clone();
        let mut nfe = Vec::with_capacity(hops);
        for (i, hop) in self.hops.iter().enumerate() {
            let (b, c, h, w) = z.dims4()?;
            let shape = [b, c, h * hop.config.factor, w * hop.config.factor];
            let eps = hop_noise(seeds, i as u32, &shape, hop.unet.device())?;
            let mut per_hop = |step: Step| progress(HopStep { hop: i, hops, step });
            let sample = sample_hop(&hop.unet, &hop.config, &z, &eps, codec, &mut per_hop)?;
            nfe.push(sample.nfe);
            z = sample.latent;
        }
        Ok(ChainSample { latent: z, nfe })
    }
}
