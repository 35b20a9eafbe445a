//! The project's networks seen through the trainer's traits, and the gradient check.

use candle_core::{Tensor, Var};
use candle_nn::VarMap;

use super::autoencoder::VariationalAutoencoder;
use super::data::LatentEncoder;
use super::flow::VelocityNet;
use crate::autoencoder::Autoencoder;
use crate::cfm::EfficientUNet;

impl VelocityNet for EfficientUNet {
    fn velocity(&self, x_t: &Tensor, t: &Tensor, context: Option<&Tensor>) -> candle_core::Result<Tensor> {
        self.forward(x_t, t, context)
    }
}

impl VariationalAutoencoder for Autoencoder {
    fn posterior(&self, image: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        self.encode_posterior(image)
    }
    fn decode_latent(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        self.decode_unscaled(z)
    }
}

impl LatentEncoder for Autoencoder {
    fn encode(&self, image: &Tensor) -> candle_core::Result<Tensor> {
        Autoencoder::encode(self, image)
    }
}

/// The trainable variables of a `VarMap`, sorted by name (a stable order for the optimizer,
/// the EMA and checkpoints).
pub fn named_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let mut vars: Vec<(String, Var)> =
        varmap.data().lock().expect("varmap lock").iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// The names of the parameters that get no gradient, or a zero or non-finite one, from `loss`.
/// Fused candle ops without a backward pass (`softmax_last_dim`, `layer_norm`, `rms_norm`)
/// cut the graph silently; this finds them.
pub fn parameters_without_gradient(loss: &Tensor, params: &[(String, Var)]) -> candle_core::Result<Vec<String>> {
    let grads = loss.backward()?;
    let mut missing = Vec::new();
    for (name, var) in params {
        let ok = match grads.get(var.as_tensor()) {
            Some(g) => {
                let norm = g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
                norm.is_finite() && norm > 0.0
            }
            None => false,
        };
        if !ok {
            missing.push(name.clone());
        }
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoencoder::AutoencoderConfig;
    use crate::cfm::UNetConfig;
    use crate::rng::{rng_for, Stream};
    use crate::train::checkpoint::{META_KIND, AUTOENCODER_LAYOUT, UNET_LAYOUT};
    use crate::train::data::{LatentSet, PhotoSet, Zoom};
    use crate::train::flow::CfmHopObjective;
    use crate::train::{AdamConfig, AutoencoderObjective, Objective, TrainConfig, Trainer};
    use candle_core::{DType, Device};
    use crate::train::seeded_var_builder;
    use std::collections::BTreeMap;

    fn unet_config() -> UNetConfig {
        crate::cfm::test_config(false)
    }

    fn ae_config() -> AutoencoderConfig {
        AutoencoderConfig {
            block_out_channels: vec![8, 8, 16, 16],
            layers_per_block: 1,
            latent_channels: 4,
            norm_num_groups: 4,
            down_block_types: vec![],
            up_block_types: vec![],
            ..AutoencoderConfig::sd15()
        }
    }

    fn mean_loss(objective: &mut dyn Objective) -> f64 {
        (0..4).map(|k| objective.loss(&mut Trainer::step_rng(99, k)).unwrap().to_scalar::<f32>().unwrap() as f64).sum::<f64>() / 4.0
    }

    fn config(steps: u64, lr: f64, ema: bool) -> TrainConfig {
        TrainConfig {
            steps,
            lr,
            warmup_steps: 0,
            cooldown_steps: 0,
            adam: AdamConfig::default(),
            grad_clip: Some(1.0),
            ema: ema.then(Default::default),
            seed: 3,
            checkpoint_every: 0,
        }
    }

    #[test]
    fn every_unet_parameter_gets_a_gradient_and_the_hop_loss_falls() {
        let varmap = VarMap::new();
        let net = EfficientUNet::new(&unet_config(), seeded_var_builder(&varmap, 1, DType::F32, &Device::Cpu)).unwrap();
        let mut rng = rng_for(1, Stream::Train);
        let coarse = rng.randn(&[4, 4, 2, 2], &Device::Cpu).unwrap();
        let high = coarse.upsample_nearest2d(8, 8).unwrap();
        let data = LatentSet { low: Some(high.avg_pool2d(2).unwrap()), high };
        let resize = |z: &Tensor, hw: (usize, usize)| crate::cfm::bilinear_resize(z, hw);
        let mut objective =
            CfmHopObjective { net: &net, data: &data, batch: 4, alpha_bar: 0.65, resize: &resize, device: Device::Cpu };
        let params = named_vars(&varmap);
        let loss = objective.loss(&mut rng).unwrap();
        assert_eq!(parameters_without_gradient(&loss, &params).unwrap(), Vec::<String>::new());

        let before = mean_loss(&mut objective);
        let meta = BTreeMap::from([(META_KIND.to_string(), "cfm".to_string())]);
        let mut trainer = Trainer::new(params, config(30, 2e-3, true), UNET_LAYOUT, meta).unwrap();
        trainer.fit(&mut objective, None, None, &mut |_| crate::progress::Flow::Continue).unwrap();
        let after = mean_loss(&mut objective);
        assert!(after < 0.7 * before, "{before} → {after}");
    }

    #[test]
    fn every_autoencoder_parameter_gets_a_gradient_and_the_loss_falls() {
        let varmap = VarMap::new();
        let ae = Autoencoder::new(&ae_config(), seeded_var_builder(&varmap, 2, DType::F32, &Device::Cpu)).unwrap();
        let img = image::RgbImage::from_fn(48, 48, |x, y| {
            let v = |a: f32| (127.0 + 90.0 * a.sin()) as u8;
            image::Rgb([v(x as f32 / 5.0), v(y as f32 / 7.0), v((x + y) as f32 / 9.0)])
        });
        let photos = PhotoSet { names: vec!["s".into()], images: vec![img] };
        let mut objective = AutoencoderObjective {
            model: &ae,
            photos: &photos,
            batch: 2,
            crop: 16,
            zoom: Zoom { min: 1.0, max: 1.0 },
            kl_weight: 1e-6,
            device: Device::Cpu,
        };
        let params = named_vars(&varmap);
        let loss = objective.loss(&mut rng_for(2, Stream::Train)).unwrap();
        assert_eq!(parameters_without_gradient(&loss, &params).unwrap(), Vec::<String>::new());

        let before = mean_loss(&mut objective);
        let meta = BTreeMap::from([(META_KIND.to_string(), "autoencoder".to_string())]);
        let mut trainer = Trainer::new(params, config(60, 3e-3, false), AUTOENCODER_LAYOUT, meta).unwrap();
        trainer.fit(&mut objective, None, None, &mut |_| crate::progress::Flow::Continue).unwrap();
        let after = mean_loss(&mut objective);
        assert!(after < 0.7 * before, "{before} → {after}");
    }

    #[test]
    fn a_cut_graph_is_reported_by_name() {
        let a = Var::from_slice(&[1.0f32], 1, &Device::Cpu).unwrap();
        let b = Var::from_slice(&[2.0f32], 1, &Device::Cpu).unwrap();
        let loss = (a.as_tensor() * 3.0).unwrap().sum_all().unwrap();
        let params = vec![("a".to_string(), a), ("b".to_string(), b.clone())];
        assert_eq!(parameters_without_gradient(&loss, &params).unwrap(), vec!["b".to_string()]);
        // A detached path gives no gradient either.
        let loss = (b.as_tensor().detach() * 3.0).unwrap().sum_all().unwrap();
        assert_eq!(parameters_without_gradient(&loss, &params[1..]).unwrap(), vec!["b".to_string()]);
    }
}
