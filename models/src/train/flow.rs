//! Flow-matching objectives on precomputed latents: a CFM hop (the paper's objective) and the
//! unconditional base generator.

use candle_core::{Device, Tensor};

use super::data::LatentSet;
use crate::cfm::noise_augment;
use super::trainer::Objective;
use crate::rng::NoiseRng;

/// A velocity network v(x_t, t, context): `t` is `[B]` in [0, 1]; the context, when given, is
/// concatenated to x_t on the channel axis (z_up for a CFM hop, none for the base generator).
pub trait VelocityNet {
    fn velocity(&self, x_t: &Tensor, t: &Tensor, context: Option<&Tensor>) -> candle_core::Result<Tensor>;
}

/// Resizes a low-res latent `[B, C, h, w]` to `(H, W)`: the profile's z_up mode.
pub type Resize<'a> = &'a dyn Fn(&Tensor, (usize, usize)) -> candle_core::Result<Tensor>;

/// `t ~ U(0, 1)` per sample, `x_t = t·x1 + (1 − t)·x0`, loss = mean((v(x_t, t, ctx) − (x1 − x0))²)
/// (the reference's `FlowModel.training_losses` with the linear schedule and σ_min = 0).
fn flow_matching_loss(
    net: &dyn VelocityNet,
    x0: &Tensor,
    x1: &Tensor,
    context: Option<&Tensor>,
    rng: &mut NoiseRng,
) -> candle_core::Result<Tensor> {
    let b = x1.dim(0)?;
    let t: Vec<f32> = (0..b).map(|_| rng.uniform()).collect();
    let t = Tensor::from_vec(t, b, &Device::Cpu)?.to_device(x1.device())?.to_dtype(x1.dtype())?;
    let tb = t.reshape((b, 1, 1, 1))?;
    let x_t = (x1.broadcast_mul(&tb)? + x0.broadcast_mul(&(1.0 - &tb)?)?)?;
    let target = (x1 - x0)?;
    let v = net.velocity(&x_t, &t, context)?;
    (v - target)?.sqr()?.mean_all()
}

/// One CFM hop, the paper's objective: x1 = the high-res latent (scaled), z_up = the low-res
/// latent resized by the profile's mode, x0 = √ᾱ·z_up + √(1 − ᾱ)·ε with ᾱ = ᾱ[noising step]
/// (step 400 of the cosine table), and the flow-matching loss with context z_up.
pub struct CfmHopObjective<'a> {
    pub net: &'a dyn VelocityNet,
    pub data: &'a LatentSet,
    pub batch: usize,
    /// ᾱ at the noising step (`cfm::alpha_bar_cosine()[400]` for the paper's setting).
    pub alpha_bar: f32,
    pub resize: Resize<'a>,
    pub device: Device,
}

impl Objective for CfmHopObjective<'_> {
    fn loss(&mut self, rng: &mut NoiseRng) -> candle_core::Result<Tensor> {
        let (x1, low) = self.data.batch(rng, self.batch, &self.device)?;
        let Some(low) = low else {
            candle_core::bail!("CFM hop training needs low-res latents (the latent set has none)");
        };
        let (_, _, h, w) = x1.dims4()?;
        let z_up = (self.resize)(&low, (h, w))?;
        let eps = rng.randn(x1.dims(), &self.device)?.to_dtype(x1.dtype())?;
        let x0 = noise_augment(&z_up, &eps, self.alpha_bar)?;
        flow_matching_loss(self.net, &x0, &x1, Some(&z_up), rng)
    }
}

/// The unconditional base generator: x0 = N(0, I), x1 = a latent, no context.
pub struct BaseObjective<'a> {
    pub net: &'a dyn VelocityNet,
    pub data: &'a LatentSet,
    pub batch: usize,
    pub device: Device,
}

impl Objective for BaseObjective<'_> {
    fn loss(&mut self, rng: &mut NoiseRng) -> candle_core::Result<Tensor> {
        let (x1, _) = self.data.batch(rng, self.batch, &self.device)?;
        let x0 = rng.randn(x1.dims(), &self.device)?.to_dtype(x1.dtype())?;
        flow_matching_loss(self.net, &x0, &x1, None, rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{rng_for, Stream};
    use crate::train::checkpoint::{META_KIND, UNET_LAYOUT};
    use crate::train::{AdamConfig, TrainConfig, Trainer};
    use crate::train::nets::named_vars;
    use candle_core::{DType, Var};
    use candle_nn::{Conv2d, Conv2dConfig, Module, VarBuilder, VarMap};
    use std::collections::BTreeMap;

    /// A two-layer conv net taking cat[x_t, context, t] as channels.
    struct TinyNet {
        a: Conv2d,
        b: Conv2d,
    }

    impl TinyNet {
        fn new(channels: usize, context: usize, vb: VarBuilder) -> candle_core::Result<Self> {
            let cfg = Conv2dConfig { padding: 1, ..Default::default() };
            Ok(Self {
                a: candle_nn::conv2d(channels + context + 1, 16, 3, cfg, vb.pp("a"))?,
                b: candle_nn::conv2d(16, channels, 3, cfg, vb.pp("b"))?,
            })
        }
    }

    impl VelocityNet for TinyNet {
        fn velocity(&self, x_t: &Tensor, t: &Tensor, context: Option<&Tensor>) -> candle_core::Result<Tensor> {
            let (b, _, h, w) = x_t.dims4()?;
            let tt = t.reshape((b, 1, 1, 1))?.broadcast_as((b, 1, h, w))?;
            let mut parts = vec![x_t.clone()];
            parts.extend(context.cloned());
            parts.push(tt.contiguous()?);
            self.b.forward(&self.a.forward(&Tensor::cat(&parts, 1)?)?.silu()?)
        }
    }

    fn trainer(vars: Vec<(String, Var)>, steps: u64) -> Trainer {
        let config = TrainConfig {
            steps,
            lr: 3e-3,
            warmup_steps: 0,
            cooldown_steps: 0,
            adam: AdamConfig::default(),
            grad_clip: Some(1.0),
            ema: Some(Default::default()),
            seed: 5,
            checkpoint_every: 0,
        };
        Trainer::new(vars, config, UNET_LAYOUT, BTreeMap::from([(META_KIND.to_string(), "cfm".to_string())])).unwrap()
    }

    fn mean_loss(objective: &mut dyn Objective, seed: u64) -> f64 {
        (0..8)
            .map(|k| {
                let mut rng = Trainer::step_rng(seed, 1000 + k);
                objective.loss(&mut rng).unwrap().to_scalar::<f32>().unwrap() as f64
            })
            .sum::<f64>()
            / 8.0
    }

    fn smooth_latents(n: usize, c: usize, s: usize) -> Tensor {
        let mut rng = rng_for(2, Stream::Train);
        // Smooth fields: low-frequency noise upsampled, so the low-res latent predicts much of it.
        let coarse = rng.randn(&[n, c, s / 4, s / 4], &Device::Cpu).unwrap();
        coarse.upsample_nearest2d(s, s).unwrap()
    }

    #[test]
    fn cfm_hop_loss_falls_on_a_small_batch() {
        let high = smooth_latents(4, 2, 8);
        let low = high.avg_pool2d(2).unwrap();
        let data = LatentSet { high, low: Some(low) };
        let varmap = VarMap::new();
        let net = TinyNet::new(2, 2, crate::init::seeded_var_builder(&varmap, 1, DType::F32, &Device::Cpu)).unwrap();
        let resize = |z: &Tensor, hw: (usize, usize)| z.upsample_nearest2d(hw.0, hw.1);
        let mut objective = CfmHopObjective { net: &net, data: &data, batch: 4, alpha_bar: 0.6, resize: &resize, device: Device::Cpu };
        let before = mean_loss(&mut objective, 1);
        let mut t = trainer(named_vars(&varmap), 60);
        t.fit(&mut objective, None, None, &mut |_| crate::progress::Flow::Continue).unwrap();
        let after = mean_loss(&mut objective, 1);
        assert!(after < 0.7 * before, "{before} → {after}");
    }

    #[test]
    fn base_loss_falls_on_a_small_batch() {
        let data = LatentSet { high: smooth_latents(4, 2, 8), low: None };
        let varmap = VarMap::new();
        let net = TinyNet::new(2, 0, crate::init::seeded_var_builder(&varmap, 2, DType::F32, &Device::Cpu)).unwrap();
        let mut objective = BaseObjective { net: &net, data: &data, batch: 4, device: Device::Cpu };
        let before = mean_loss(&mut objective, 1);
        let mut t = trainer(named_vars(&varmap), 60);
        t.fit(&mut objective, None, None, &mut |_| crate::progress::Flow::Continue).unwrap();
        let after = mean_loss(&mut objective, 1);
        assert!(after < 0.8 * before, "{before} → {after}");
    }

    #[test]
    fn hop_without_low_res_latents_is_an_error() {
        let data = LatentSet { high: smooth_latents(2, 2, 8), low: None };
        let varmap = VarMap::new();
        let net = TinyNet::new(2, 2, crate::init::seeded_var_builder(&varmap, 3, DType::F32, &Device::Cpu)).unwrap();
        let resize = |z: &Tensor, hw: (usize, usize)| z.upsample_nearest2d(hw.0, hw.1);
        let mut objective = CfmHopObjective { net: &net, data: &data, batch: 2, alpha_bar: 0.6, resize: &resize, device: Device::Cpu };
        let err = objective.loss(&mut rng_for(0, Stream::Train)).unwrap_err().to_string();
        assert!(err.contains("low-res latents"), "{err}");
    }
}
