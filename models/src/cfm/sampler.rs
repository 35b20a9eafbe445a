//! The coupling-flow sampler: one hop lifts a latent by `factor` (z_up, noise augmentation,
//! ODE from t = 0 to 1 with context z_up); a chain runs hops one after another
//! (64² → 128² → 256² for SD latents).

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::checkpoint::{load_unet, LoadError, LoadReport, WeightSource};
use super::config::UNetConfig;
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

impl CfmHop {
    /// Loads the hop's network from `weights` (see [`load_unet`]) after checking its settings.
    pub fn load(
        config: HopConfig,
        unet_config: &UNetConfig,
        weights: WeightSource<'_>,
        device: &Device,
        dtype: DType,
    ) -> Result<(Self, LoadReport), LoadError> {
        config.validate().map_err(LoadError::Config)?;
        let (unet, report) = load_unet(weights, unet_config, device, dtype)?;
        Ok((Self { config, unet }, report))
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cfm::config::tiny;
    use candle_nn::{VarBuilder, VarMap};

    fn hop(steps: usize, solver: Solver) -> CfmHop {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let unet = EfficientUNet::new(&tiny(false), vb).unwrap();
        let config = HopConfig { upsample: UpsampleMode::Bilinear, solver, steps, noising_step: 400, factor: 2 };
        CfmHop { config, unet }
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn alpha_bar_table_ends_and_step_400() {
        let table = alpha_bar_cosine();
        assert_eq!(table.len(), 1000);
        assert_eq!(table[0], 1.0);
        assert!(table[999] < 1e-30);
        assert!((table[400] - 0.653_904).abs() < 1e-6, "{}", table[400]);
    }

    #[test]
    fn chain_lifts_twice_reports_per_hop_and_counts_nfe() {
        let chain = CfmChain::new(vec![hop(2, Solver::Heun2), hop(3, Solver::Euler)]).unwrap();
        let z = Tensor::randn(0f32, 1.0, (2, 4, 4, 6), &Device::Cpu).unwrap();
        let mut seen = Vec::new();
        let mut record = |s: HopStep| {
            seen.push((s.hop, s.step.step, s.step.total));
            Flow::Continue
        };
        let out = chain.sample(&z, &[1, 2], None, &mut record).unwrap();
        assert_eq!(out.latent.dims(), &[2, 4, 16, 24]);
        assert_eq!(chain.output_hw((4, 6)), (16, 24));
        assert_eq!(out.nfe, vec![4, 3]);
        assert_eq!(seen, vec![(0, 1, 2), (0, 2, 2), (1, 1, 3), (1, 2, 3), (1, 3, 3)]);
    }

    #[test]
    fn a_job_gets_the_same_result_alone_or_in_a_batch() {
        let chain = CfmChain::new(vec![hop(2, Solver::Midpoint)]).unwrap();
        let z = Tensor::randn(0f32, 1.0, (2, 4, 4, 4), &Device::Cpu).unwrap();
        let both = chain.sample(&z, &[7, 8], None, &mut |_| Flow::Continue).unwrap().latent;
        let alone = chain.sample(&z.narrow(0, 1, 1).unwrap(), &[8], None, &mut |_| Flow::Continue).unwrap().latent;
        let (a, b) = (values(&both.narrow(0, 1, 1).unwrap()), values(&alone));
        let max = a.iter().zip(&b).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(max < 1e-4, "{max}");
    }

    #[test]
    fn cancelling_in_the_second_hop_stops_there() {
        let chain = CfmChain::new(vec![hop(2, Solver::Euler), hop(4, Solver::Euler)]).unwrap();
        let z = Tensor::randn(0f32, 1.0, (1, 4, 4, 4), &Device::Cpu).unwrap();
        let mut stop = |s: HopStep| if s.hop == 1 && s.step.step == 1 { Flow::Stop } else { Flow::Continue };
        let err = chain.sample(&z, &[1], None, &mut stop).unwrap_err();
        assert!(matches!(err, RunError::Cancelled { step: 1, total: 4 }), "{err}");
    }

    #[test]
    fn sixteen_channel_latents_and_json_hop_configs() {
        let mut config = tiny(false);
        (config.in_channels, config.out_channels) = (32, 16);
        let varmap = VarMap::new();
        let unet = EfficientUNet::new(&config, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
        let hop_config: HopConfig = serde_json::from_str(r#"{"upsample": "nearest", "solver": "rk4", "steps": 1}"#).unwrap();
        assert_eq!((hop_config.noising_step, hop_config.factor), (400, 2));
        let chain = CfmChain::new(vec![CfmHop { config: hop_config, unet }]).unwrap();
        let z = Tensor::randn(0f32, 1.0, (3, 16, 4, 4), &Device::Cpu).unwrap();
        let out = chain.sample(&z, &[1, 2, 3], None, &mut |_| Flow::Continue).unwrap();
        assert_eq!(out.latent.dims(), &[3, 16, 8, 8]);
        assert_eq!(out.nfe, vec![4]);
        let err = serde_json::from_str::<HopConfig>(r#"{"upsample": "bicubic", "solver": "rk4", "steps": 1}"#).unwrap_err();
        assert!(err.to_string().contains("bicubic"), "{err}");
    }

    #[test]
    fn hop_loads_its_weights_and_checks_its_settings() {
        let shapes = crate::cfm::parameter_shapes(&tiny(false)).unwrap();
        let weights: std::collections::HashMap<String, Tensor> = shapes
            .into_iter()
            .map(|(k, s)| (format!("net.{k}"), Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap()))
            .collect();
        let config = HopConfig { upsample: UpsampleMode::Bilinear, solver: Solver::Euler, steps: 40, noising_step: 400, factor: 2 };
        let (hop, report) = CfmHop::load(config.clone(), &tiny(false), WeightSource::Tensors(&weights), &Device::Cpu, DType::F32).unwrap();
        assert_eq!((report.prefix.as_str(), hop.config.nfe()), ("net.", 40));
        let bad = HopConfig { steps: 0, ..config };
        let err = CfmHop::load(bad, &tiny(false), WeightSource::Tensors(&weights), &Device::Cpu, DType::F32).unwrap_err();
        assert!(err.to_string().contains("steps"), "{err}");
    }

    #[test]
    fn mismatched_inputs_are_named() {
        let h = hop(1, Solver::Euler);
        let z = Tensor::zeros((1, 4, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let eps = Tensor::zeros((1, 4, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let err = sample_hop(&h.unet, &h.config, &z, &eps, None, &mut crate::progress::ignore).unwrap_err();
        assert!(err.to_string().contains("hop ε has shape [1, 4, 4, 4], expected [1, 4, 8, 8]"), "{err}");
        let z16 = Tensor::zeros((1, 16, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let eps16 = Tensor::zeros((1, 16, 8, 8), DType::F32, &Device::Cpu).unwrap();
        let err = sample_hop(&h.unet, &h.config, &z16, &eps16, None, &mut crate::progress::ignore).unwrap_err();
        assert!(err.to_string().contains("16-channel latent needs a UNet with in_channels 32"), "{err}");
        assert!(hop_noise(&[1, 2], 0, &[3, 4, 8, 8], &Device::Cpu).is_err());
        let mut bad = h.config.clone();
        bad.noising_step = 1000;
        assert!(bad.validate().unwrap_err().contains("noising_step"));
        assert!(CfmChain::new(vec![]).is_err());
    }
}
