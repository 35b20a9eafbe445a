//! Diffusion schedulers for text-to-latent: DDIM (η = 0), Euler ancestral and LCM, following
//! diffusers' `DDIMScheduler`, `EulerAncestralDiscreteScheduler` and `LCMScheduler`.
//!
//! Our own type rather than candle-transformers' `Scheduler` trait object, which is not
//! `Send`; and every random draw goes through a [`NoiseSource`] so runs are seeded per job
//! and the reference loops can be replayed exactly.

use std::collections::VecDeque;
use std::str::FromStr;

use candle_core::{Device, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::rng::{self, NoiseRng};

/// Which sampler drives the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    Ddim,
    EulerAncestral,
    Lcm,
}

impl SchedulerKind {
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::EulerAncestral => "euler_a",
            SchedulerKind::Lcm => "lcm",
        }
    }

    fn default_spacing(self) -> Spacing {
        match self {
            SchedulerKind::Ddim | SchedulerKind::Lcm => Spacing::Leading,
            SchedulerKind::EulerAncestral => Spacing::Linspace,
        }
    }
}

impl FromStr for SchedulerKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ddim" => Ok(SchedulerKind::Ddim),
            "euler_a" | "euler-a" | "euler_ancestral" | "euler-ancestral" => Ok(SchedulerKind::EulerAncestral),
            "lcm" => Ok(SchedulerKind::Lcm),
            other => Err(format!("scheduler `{other}`: expected `ddim`, `euler_a` or `lcm`")),
        }
    }
}

/// How inference timesteps are spread over the training timesteps (diffusers' `timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

fn d_train_steps() -> usize {
    1000
}
fn d_beta_start() -> f64 {
    0.00085
}
fn d_beta_end() -> f64 {
    0.012
}
fn d_beta_schedule() -> String {
    "scaled_linear".into()
}
fn d_prediction() -> String {
    "epsilon".into()
}
fn d_one() -> f64 {
    1.0
}
fn d_original_steps() -> usize {
    50
}
fn d_timestep_scaling() -> f64 {
    10.0
}

/// The fields of a diffusers `scheduler_config.json` that shape the math. Missing fields take
/// SD 1.5's values; unknown ones are ignored (as diffusers does when switching scheduler class).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "d_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "d_beta_start")]
    pub beta_start: f64,
    #[serde(default = "d_beta_end")]
    pub beta_end: f64,
    #[serde(default = "d_beta_schedule")]
    pub beta_schedule: String,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "d_prediction")]
    pub prediction_type: String,
    #[serde(default)]
    pub steps_offset: usize,
    /// `None`: the scheduler's own default (true for DDIM and LCM).
    #[serde(default)]
    pub set_alpha_to_one: Option<bool>,
    /// `None`: the scheduler's own default (leading for DDIM/LCM, linspace for Euler a).
    #[serde(default)]
    pub timestep_spacing: Option<Spacing>,
    #[serde(default)]
    pub clip_sample: bool,
    #[serde(default = "d_one")]
    pub clip_sample_range: f64,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// LCM: the distillation schedule's step count.
    #[serde(default = "d_original_steps")]
    pub original_inference_steps: usize,
    /// LCM: the boundary-condition time scaling.
    #[serde(default = "d_timestep_scaling")]
    pub timestep_scaling: f64,
}

impl Default for SchedulerConfig {
    /// SD 1.5's `scheduler/scheduler_config.json`.
    fn default() -> Self {
        serde_json::from_str(r#"{"set_alpha_to_one": false, "steps_offset": 1}"#).expect("valid defaults")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prediction {
    Epsilon,
    Sample,
    VPrediction,
}

impl SchedulerConfig {
    fn prediction(&self) -> std::result::Result<Prediction, String> {
        match self.prediction_type.as_str() {
            "epsilon" => Ok(Prediction::Epsilon),
            "sample" => Ok(Prediction::Sample),
            "v_prediction" => Ok(Prediction::VPrediction),
            other => Err(format!("prediction_type `{other}`: expected epsilon, sample or v_prediction")),
        }
    }

    /// ᾱ_t for every training timestep.
    fn alphas_cumprod(&self) -> std::result::Result<Vec<f64>, String> {
        let n = self.num_train_timesteps;
        if n < 2 {
            return Err(format!("num_train_timesteps {n} must be at least 2"));
        }
        if self.thresholding {
            return Err("thresholding = true is not supported".into());
        }
        if self.rescale_betas_zero_snr {
            return Err("rescale_betas_zero_snr = true is not supported".into());
        }
        let lin = |a: f64, b: f64| (0..n).map(move |i| a + (b - a) * i as f64 / (n - 1) as f64);
        let betas: Vec<f64> = match (&self.trained_betas, self.beta_schedule.as_str()) {
            (Some(b), _) if b.len() == n => b.clone(),
            (Some(b), _) => return Err(format!("trained_betas has {} entries, num_train_timesteps is {n}", b.len())),
            (None, "linear") => lin(self.beta_start, self.beta_end).collect(),
            (None, "scaled_linear") => lin(self.beta_start.sqrt(), self.beta_end.sqrt()).map(|b| b * b).collect(),
            (None, "squaredcos_cap_v2") => {
                let f = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2).cos().powi(2);
                (0..n).map(|i| (1.0 - f((i + 1) as f64 / n as f64) / f(i as f64 / n as f64)).min(0.999)).collect()
            }
            (None, other) => return Err(format!("beta_schedule `{other}`: expected linear, scaled_linear or squaredcos_cap_v2")),
        };
        let mut acc = 1.0;
        Ok(betas.iter().map(|b| {
            acc *= 1.0 - b;
            acc
        })
        .collect())
    }
}

/// Where the scheduler's random draws come from.
pub trait NoiseSource: Send {
    /// A standard-normal tensor of `shape` (batch first) on `device`.
    fn next(&mut self, shape: &[usize], device: &Device) -> Result<Tensor>;
}

/// One seeded stream per batch item (each job's own), drawn on the CPU in a fixed order.
pub struct SeededNoise {
    rngs: Vec<NoiseRng>,
}

impl SeededNoise {
    pub fn new(seeds: &[u64], stream: rng::Stream) -> Self {
        Self { rngs: seeds.iter().map(|&s| rng::rng_for(s, stream)).collect() }
    }
}

impl NoiseSource for SeededNoise {
    fn next(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        if shape.first() != Some(&self.rngs.len()) {
            candle_core::bail!("noise of shape {shape:?} asked from {} seeded streams", self.rngs.len());
        }
        let parts = self.rngs.iter_mut().map(|r| r.randn(&shape[1..], &Device::Cpu)).collect::<Result<Vec<_>>>()?;
        Tensor::stack(&parts, 0)?.to_device(device)
    }
}

/// Hands out given tensors in order: replays a reference run's draws.
pub struct ReplayNoise {
    queue: VecDeque<Tensor>,
    drawn: usize,
}

impl ReplayNoise {
    pub fn new(draws: Vec<Tensor>) -> Self {
        Self { queue: draws.into(), drawn: 0 }
    }
}

impl NoiseSource for ReplayNoise {
    fn next(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let Some(t) = self.queue.pop_front() else {
            candle_core::bail!("replay noise exhausted after {} draws", self.drawn)
        };
        self.drawn += 1;
        if t.dims() != shape {
            candle_core::bail!("replayed noise {} has shape {:?}, the scheduler needs {shape:?}", self.drawn, t.dims());
        }
        t.to_device(device)
    }
}

#[derive(Debug, Clone)]
enum State {
    Ddim { final_alpha: f64, step_ratio: usize },
    EulerAncestral { sigmas: Vec<f64> },
    Lcm { final_alpha: f64 },
}

/// A configured scheduler for one run of `steps` steps. `Send`, cheap to build per job.
#[derive(Debug, Clone)]
pub struct Scheduler {
    kind: SchedulerKind,
    config: SchedulerConfig,
    prediction: Prediction,
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<f64>,
    state: State,
}

impl Scheduler {
    pub fn new(kind: SchedulerKind, config: &SchedulerConfig, steps: usize) -> std::result::Result<Self, String> {
        let train = config.num_train_timesteps;
        if steps == 0 {
            return Err("steps must be at least 1".into());
        }
        if steps > train {
            return Err(format!("steps {steps} exceed num_train_timesteps {train}"));
        }
        let prediction = config.prediction()?;
        let alphas_cumprod = config.alphas_cumprod()?;
        let spacing = config.timestep_spacing.unwrap_or(kind.default_spacing());
        let final_alpha = if config.set_alpha_to_one.unwrap_or(true) { 1.0 } else { alphas_cumprod[0] };
        let (timesteps, state) = match kind {
            SchedulerKind::Ddim => {
                (spaced_timesteps(spacing, train, steps, config.steps_offset, true), State::Ddim { final_alpha, step_ratio: train / steps })
            }
            SchedulerKind::EulerAncestral => {
                let timesteps = spaced_timesteps(spacing, train, steps, config.steps_offset, false);
                let all: Vec<f64> = alphas_cumprod.iter().map(|a| ((1.0 - a) / a).sqrt()).collect();
                let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interpolate(&all, t)).collect();
                sigmas.push(0.0);
                (timesteps, State::EulerAncestral { sigmas })
            }
            SchedulerKind::Lcm => (lcm_timesteps(train, config.original_inference_steps, steps)?, State::Lcm { final_alpha }),
        };
        if let Some(&t) = timesteps.iter().find(|&&t| t < 0.0 || t > (train - 1) as f64) {
            return Err(format!("timestep {t} falls outside 0..{train} (check steps_offset and timestep_spacing)"));
        }
        Ok(Self { kind, config: config.clone(), prediction, alphas_cumprod, timesteps, state })
    }

    pub fn kind(&self) -> SchedulerKind {
        self.kind
    }

    /// The UNet's timestep at each step.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The initial latents are standard noise times this.
    pub fn init_noise_sigma(&self) -> f64 {
        match &self.state {
            State::EulerAncestral { sigmas } => {
                let max = sigmas.iter().copied().fold(0.0, f64::max);
                match self.config.timestep_spacing.unwrap_or(self.kind.default_spacing()) {
                    Spacing::Linspace | Spacing::Trailing => max,
                    Spacing::Leading => (max * max + 1.0).sqrt(),
                }
            }
            _ => 1.0,
        }
    }

    /// The UNet's input at step `index` for the current `sample`.
    pub fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        match &self.state {
            State::EulerAncestral { sigmas } => sample / (sigmas[index] * sigmas[index] + 1.0).sqrt(),
            _ => Ok(sample.clone()),
        }
    }

    fn alpha(&self, t: f64) -> f64 {
        self.alphas_cumprod[t as usize]
    }

    /// x̂₀ from the model output at ᾱ_t.
    fn predicted_original(&self, output: &Tensor, sample: &Tensor, alpha: f64) -> Result<Tensor> {
        let x0 = match self.prediction {
            Prediction::Epsilon => ((sample - (output * (1.0 - alpha).sqrt())?)? / alpha.sqrt())?,
            Prediction::Sample => output.clone(),
            Prediction::VPrediction => ((sample * alpha.sqrt())? - (output * (1.0 - alpha).sqrt())?)?,
        };
        Ok(x0)
    }

    /// `clip_sample`: x̂₀ clamped to ±`clip_sample_range`.
    fn clip(&self, x0: Tensor) -> Result<Tensor> {
        if self.config.clip_sample {
            let r = self.config.clip_sample_range;
            return x0.clamp(-r, r);
        }
        Ok(x0)
    }

    /// One step from `sample` at step `index` given the model `output`; returns the next sample
    /// (for LCM's last step, the denoised latent).
    pub fn step(&self, output: &Tensor, index: usize, sample: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let t = self.timesteps[index];
        match &self.state {
            State::Ddim { final_alpha, step_ratio } => {
                let alpha = self.alpha(t);
                let prev = t - *step_ratio as f64;
                let alpha_prev = if prev >= 0.0 { self.alpha(prev) } else { *final_alpha };
                let x0 = self.predicted_original(output, sample, alpha)?;
                // ε from the unclipped x̂₀, as diffusers does.
                let eps = match self.prediction {
                    Prediction::Epsilon => output.clone(),
                    Prediction::Sample => ((sample - (&x0 * alpha.sqrt())?)? / (1.0 - alpha).sqrt())?,
                    Prediction::VPrediction => ((output * alpha.sqrt())? + (sample * (1.0 - alpha).sqrt())?)?,
                };
                let x0 = self.clip(x0)?;
                (x0 * alpha_prev.sqrt())? + (eps * (1.0 - alpha_prev).sqrt())?
            }
            State::EulerAncestral { sigmas } => {
                let (sigma, sigma_next) = (sigmas[index], sigmas[index + 1]);
                let x0 = match self.prediction {
                    Prediction::Epsilon => (sample - (output * sigma)?)?,
                    Prediction::VPrediction => {
                        let s2 = sigma * sigma + 1.0;
                        ((output * (-sigma / s2.sqrt()))? + (sample / s2)?)?
                    }
                    Prediction::Sample => output.clone(),
                };
                let sigma_up = (sigma_next.powi(2) * (sigma.powi(2) - sigma_next.powi(2)) / sigma.powi(2)).sqrt();
                let sigma_down = (sigma_next.powi(2) - sigma_up.powi(2)).sqrt();
                let derivative = ((sample - x0)? / sigma)?;
                let prev = (sample + (derivative * (sigma_down - sigma))?)?;
                let z = noise.next(sample.dims(), sample.device())?;
                prev + (z * sigma_up)?
            }
            State::Lcm { final_alpha } => {
                let last = index + 1 == self.timesteps.len();
                let t_prev = if last { t } else { self.timesteps[index + 1] };
                let alpha = self.alpha(t);
                let alpha_prev = if t_prev >= 0.0 { self.alpha(t_prev) } else { *final_alpha };
                // Consistency-model boundary condition, σ_data = 0.5.
                let scaled = t * self.config.timestep_scaling;
                let c_skip = 0.25 / (scaled * scaled + 0.25);
                let c_out = scaled / (scaled * scaled + 0.25).sqrt();
                let x0 = self.clip(self.predicted_original(output, sample, alpha)?)?;
                let denoised = ((x0 * c_out)? + (sample * c_skip)?)?;
                if last {
                    return Ok(denoised);
                }
                let z = noise.next(sample.dims(), sample.device())?;
                (denoised * alpha_prev.sqrt())? + (z * (1.0 - alpha_prev).sqrt())?
            }
        }
    }
}

/// Linear interpolation of `table` (indexed by integer timestep) at fractional `t`.
fn interpolate(table: &[f64], t: f64) -> f64 {
    let lo = (t.floor() as usize).min(table.len() - 1);
    let hi = (lo + 1).min(table.len() - 1);
    let frac = t - lo as f64;
    table[lo] * (1.0 - frac) + table[hi] * frac
}

/// diffusers' `timestep_spacing`, highest timestep first. `integer` rounds linspace values
/// (DDIM); Euler keeps them fractional.
fn spaced_timesteps(spacing: Spacing, train: usize, steps: usize, offset: usize, integer: bool) -> Vec<f64> {
    let mut ts: Vec<f64> = match spacing {
        Spacing::Leading => {
            let ratio = train / steps;
            (0..steps).map(|i| (i * ratio + offset) as f64).collect()
        }
        Spacing::Trailing => {
            let ratio = train as f64 / steps as f64;
            (1..=steps).map(|i| (i as f64 * ratio).round() - 1.0).collect()
        }
        Spacing::Linspace => (0..steps)
            .map(|i| if steps == 1 { 0.0 } else { (train - 1) as f64 * i as f64 / (steps - 1) as f64 })
            .map(|t| if integer { t.round() } else { t })
            .collect(),
    };
    ts.reverse();
    ts
}

/// LCM's schedule: `steps` evenly picked entries of the distillation grid, highest first.
fn lcm_timesteps(train: usize, original_steps: usize, steps: usize) -> std::result::Result<Vec<f64>, String> {
    if original_steps == 0 || original_steps > train {
        return Err(format!("original_inference_steps {original_steps} must be in 1..={train}"));
    }
    if steps > original_steps {
        return Err(format!("LCM steps {steps} exceed original_inference_steps {original_steps}"));
    }
    let k = train / original_steps;
    let grid: Vec<usize> = (1..=original_steps).rev().map(|i| i * k - 1).collect();
    Ok((0..steps).map(|i| grid[(i as f64 * grid.len() as f64 / steps as f64).floor() as usize] as f64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timesteps_match_diffusers() {
        let cfg = SchedulerConfig::default();
        assert_eq!(Scheduler::new(SchedulerKind::Ddim, &cfg, 3).unwrap().timesteps(), &[667.0, 334.0, 1.0]);
        assert_eq!(Scheduler::new(SchedulerKind::Lcm, &cfg, 4).unwrap().timesteps(), &[999.0, 759.0, 499.0, 259.0]);
        let euler = Scheduler::new(SchedulerKind::EulerAncestral, &cfg, 4).unwrap();
        assert_eq!(euler.timesteps(), &[999.0, 666.0, 333.0, 0.0]);
        assert!((euler.init_noise_sigma() - 14.6146).abs() < 1e-3, "{}", euler.init_noise_sigma());
    }

    #[test]
    fn rejects_bad_settings_naming_them() {
        let cfg = SchedulerConfig::default();
        assert!(Scheduler::new(SchedulerKind::Ddim, &cfg, 0).unwrap_err().contains("steps"));
        let bad = SchedulerConfig { beta_schedule: "cubic".into(), ..cfg.clone() };
        assert!(Scheduler::new(SchedulerKind::Ddim, &bad, 10).unwrap_err().contains("beta_schedule"));
        assert!(Scheduler::new(SchedulerKind::Lcm, &cfg, 51).unwrap_err().contains("original_inference_steps"));
        assert!("plms".parse::<SchedulerKind>().unwrap_err().contains("plms"));
    }

    #[test]
    fn ddim_single_step_with_exact_eps_recovers_x0() {
        // At η = 0 with the true noise, DDIM lands on √ᾱ_prev·x₀ + √(1−ᾱ_prev)·ε.
        let cfg = SchedulerConfig::default();
        let s = Scheduler::new(SchedulerKind::Ddim, &cfg, 1).unwrap();
        let t = s.timesteps()[0];
        let a = s.alpha(t);
        let x0 = Tensor::new(&[0.5f32, -1.0], &Device::Cpu).unwrap();
        let eps = Tensor::new(&[0.1f32, 0.2], &Device::Cpu).unwrap();
        let xt = ((&x0 * a.sqrt()).unwrap() + (&eps * (1.0 - a).sqrt()).unwrap()).unwrap();
        let out = s.step(&eps, 0, &xt, &mut ReplayNoise::new(vec![])).unwrap();
        let a0 = s.alphas_cumprod[0];
        let expected = ((&x0 * a0.sqrt()).unwrap() + (&eps * (1.0 - a0).sqrt()).unwrap()).unwrap();
        let diff = (out - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn seeded_noise_is_per_item() {
        let mut a = SeededNoise::new(&[1, 2], rng::Stream::Base);
        let mut b = SeededNoise::new(&[2], rng::Stream::Base);
        let x = a.next(&[2, 3], &Device::Cpu).unwrap();
        let y = b.next(&[1, 3], &Device::Cpu).unwrap();
        assert_eq!(x.get(1).unwrap().to_vec1::<f32>().unwrap(), y.get(0).unwrap().to_vec1::<f32>().unwrap());
    }
}
