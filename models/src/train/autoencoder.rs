//! The first-stage objective: L1 reconstruction plus a small KL term, as LDM trains its KL
//! autoencoders (without their LPIPS and GAN terms), on random photo crops.

use candle_core::{Device, Tensor};

use super::data::{PhotoSet, Zoom};
use super::trainer::Objective;
use crate::rng::NoiseRng;

/// An autoencoder with a diagonal-Gaussian posterior, differentiable end to end.
pub trait VariationalAutoencoder {
    /// Image `[B, 3, H, W]` in [-1, 1] → posterior mean and log-variance (unscaled).
    fn posterior(&self, image: &Tensor) -> candle_core::Result<(Tensor, Tensor)>;
    /// Unscaled latent → image.
    fn decode_latent(&self, z: &Tensor) -> candle_core::Result<Tensor>;
}

/// L1(x̂, x) averaged over pixels + `kl_weight` · KL(q(z|x) ‖ N(0, I)) summed over the latent
/// and divided by the pixel count. With LDM's weight 1e-6 on *summed* losses this is the
/// same ratio; z is drawn from the posterior (reparameterised) as in LDM.
pub struct AutoencoderObjective<'a> {
    pub model: &'a dyn VariationalAutoencoder,
    pub photos: &'a PhotoSet,
    pub batch: usize,
    pub crop: u32,
    pub zoom: Zoom,
    pub kl_weight: f64,
    pub device: Device,
}

/// KL(N(μ, σ²) ‖ N(0, 1)) summed over every latent element, averaged over the batch.
pub fn kl_divergence(mean: &Tensor, logvar: &Tensor) -> candle_core::Result<Tensor> {
    let b = mean.dim(0)? as f64;
    let per = ((mean.sqr()? + logvar.exp()?)? - logvar)?.affine(0.5, -0.5)?;
    per.sum_all()? / b
}

impl AutoencoderObjective<'_> {
    /// Reconstruction and KL terms of one batch, before weighting.
    pub fn terms(&self, rng: &mut NoiseRng) -> candle_core::Result<(Tensor, Tensor)> {
        let x = self.photos.batch(rng, self.batch, self.crop, self.zoom, &self.device)?;
        let (mean, logvar) = self.model.posterior(&x)?;
        // LDM clamps the log-variance to [−30, 20] before use.
        let logvar = logvar.clamp(-30f32, 20f32)?;
        let eps = rng.randn(mean.dims(), &self.device)?.to_dtype(mean.dtype())?;
        let z = (&mean + (logvar.affine(0.5, 0.0)?.exp()? * eps)?)?;
        let recon = self.model.decode_latent(&z)?;
        let l1 = (recon - &x)?.abs()?.mean_all()?;
        let pixels_per_sample = (x.elem_count() / x.dim(0)?) as f64;
        let kl = (kl_divergence(&mean, &logvar)? / pixels_per_sample)?;
        Ok((l1, kl))
    }
}

impl Objective for AutoencoderObjective<'_> {
    fn loss(&mut self, rng: &mut NoiseRng) -> candle_core::Result<Tensor> {
        let (l1, kl) = self.terms(rng)?;
        l1 + (kl * self.kl_weight)?
    }
}

/// The latent scale that gives the scaled latents unit standard deviation: 1 / std of the
/// posterior means (how SD's 0.18215 was chosen), measured on `batches` random batches.
pub fn latent_scale(
    model: &dyn VariationalAutoencoder,
    photos: &PhotoSet,
    rng: &mut NoiseRng,
    batches: usize,
    batch: usize,
    crop: u32,
    zoom: Zoom,
    device: &Device,
) -> candle_core::Result<f64> {
    let (mut sum, mut sum_sq, mut n) = (0.0f64, 0.0f64, 0usize);
    for _ in 0..batches {
        let x = photos.batch(rng, batch, crop, zoom, device)?;
        let (mean, _) = model.posterior(&x)?;
        let v: Vec<f32> = mean.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        n += v.len();
        for x in v {
            sum += x as f64;
            sum_sq += (x as f64) * (x as f64);
        }
    }
    let var = sum_sq / n as f64 - (sum / n as f64).powi(2);
    if !(var > 0.0) {
        candle_core::bail!("latent scale: the latents have variance {var}");
    }
    Ok(1.0 / var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{rng_for, Stream};
    use crate::train::checkpoint::{META_KIND, AUTOENCODER_LAYOUT};
    use crate::train::nets::named_vars;
    use crate::train::{AdamConfig, TrainConfig, Trainer};
    use candle_core::DType;
    use candle_nn::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig, Module, VarMap};
    use image::RgbImage;
    use std::collections::BTreeMap;

    /// f = 2: one strided conv down, one transposed conv up.
    struct TinyAe {
        enc: Conv2d,
        dec: ConvTranspose2d,
    }

    impl VariationalAutoencoder for TinyAe {
        fn posterior(&self, image: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
            let m = self.enc.forward(image)?;
            Ok((m.narrow(1, 0, 4)?, m.narrow(1, 4, 4)?))
        }
        fn decode_latent(&self, z: &Tensor) -> candle_core::Result<Tensor> {
            self.dec.forward(z)
        }
    }

    fn photos() -> PhotoSet {
        let img = RgbImage::from_fn(64, 64, |x, y| {
            let v = |a: f32| (127.0 + 90.0 * a.sin()) as u8;
            image::Rgb([v(x as f32 / 5.0), v(y as f32 / 7.0), v((x + y) as f32 / 9.0)])
        });
        PhotoSet { names: vec!["s".into()], images: vec![img] }
    }

    #[test]
    fn kl_of_the_prior_is_zero_and_grows_away_from_it() {
        let zeros = Tensor::zeros((2, 4, 3, 3), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(kl_divergence(&zeros, &zeros).unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let ones = zeros.ones_like().unwrap();
        // Per element ½·(1 + 1 − 1 − 1)... with μ = 1, log σ² = 0: ½·μ² = 0.5; 36 elements.
        assert!((kl_divergence(&ones, &zeros).unwrap().to_scalar::<f32>().unwrap() - 18.0).abs() < 1e-5);
    }

    #[test]
    fn reconstruction_loss_falls() {
        let set = photos();
        let varmap = VarMap::new();
        let vb = crate::init::seeded_var_builder(&varmap, 1, DType::F32, &Device::Cpu);
        let model = TinyAe {
            enc: candle_nn::conv2d(3, 8, 2, Conv2dConfig { stride: 2, ..Default::default() }, vb.pp("enc")).unwrap(),
            dec: candle_nn::conv_transpose2d(4, 3, 2, ConvTranspose2dConfig { stride: 2, ..Default::default() }, vb.pp("dec")).unwrap(),
        };
        let mut objective = AutoencoderObjective {
            model: &model,
            photos: &set,
            batch: 4,
            crop: 16,
            zoom: Zoom { min: 1.0, max: 1.0 },
            kl_weight: 1e-6,
            device: Device::Cpu,
        };
        let eval = |o: &AutoencoderObjective| o.terms(&mut rng_for(77, Stream::Train)).unwrap().0.to_scalar::<f32>().unwrap();
        let before = eval(&objective);
        let config = TrainConfig {
            steps: 80,
            lr: 1e-2,
            warmup_steps: 0,
            cooldown_steps: 0,
            adam: AdamConfig::default(),
            grad_clip: None,
            ema: None,
            seed: 1,
            checkpoint_every: 0,
        };
        let meta = BTreeMap::from([(META_KIND.to_string(), "autoencoder".to_string())]);
        let mut t = Trainer::new(named_vars(&varmap), config, AUTOENCODER_LAYOUT, meta).unwrap();
        t.fit(&mut objective, None, None, &mut |_| crate::progress::Flow::Continue).unwrap();
        let after = eval(&objective);
        assert!(after < 0.5 * before, "{before} → {after}");
        let scale = latent_scale(&model, &set, &mut rng_for(1, Stream::Train), 2, 4, 16, objective.zoom, &Device::Cpu).unwrap();
        assert!(scale.is_finite() && scale > 0.0);
    }
}
