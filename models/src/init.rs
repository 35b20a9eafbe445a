//! Seeded weight initialisation: the same seed gives the same starting weights on any machine.
//!
//! candle's `VarMap` draws initial values from an unseeded generator, so two runs of the same
//! training command would start from different weights. [`seeded_var_builder`] keeps candle's
//! initialisers (the `Init` each layer asks for: Kaiming-uniform weights, zero or uniform
//! biases, constant norms) but draws every value on the CPU from a stream keyed by
//! (seed, parameter name), so the result does not depend on the order layers are built in.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::{FanInOut, Init, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::rng::{rng_for, Stream};

/// Fresh weights as plain tensors (no autograd variables), drawn from `seed`: `build` makes the
/// network once on a seeded `VarMap` to learn its parameters. For inference benchmarks and tests.
pub fn seeded_tensors<T>(
    seed: u64,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> Result<T>,
) -> Result<HashMap<String, Tensor>> {
    let varmap = VarMap::new();
    build(seeded_var_builder(&varmap, seed, dtype, device))?;
    let vars = varmap.data().lock().map_err(|_| candle_core::Error::msg("VarMap lock poisoned"))?;
    Ok(vars.iter().map(|(name, var)| (name.clone(), var.as_tensor().detach())).collect())
}

/// A `VarBuilder` that creates trainable variables in `varmap`, initialised from `seed`.
pub fn seeded_var_builder(varmap: &VarMap, seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(SeededVarMap { vars: varmap.clone(), seed }), dtype, device.clone())
}

struct SeededVarMap {
    vars: VarMap,
    seed: u64,
}

/// FNV-1a: a fixed hash of the parameter name (std's hashers may change across releases).
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

fn draw(init: Init, shape: &Shape, seed: u64, name: &str) -> Vec<f32> {
    let n = shape.elem_count();
    let mut rng = rng_for(seed ^ name_hash(name), Stream::Init);
    let rng = rng.inner();
    let uniform = |rng: &mut rand_chacha::ChaCha8Rng, lo: f64, up: f64| (0..n).map(|_| rng.random_range(lo..up) as f32).collect();
    let normal = |rng: &mut rand_chacha::ChaCha8Rng, mean: f64, std: f64| {
        (0..n).map(|_| { let z: f64 = StandardNormal.sample(rng); (mean + std * z) as f32 }).collect()
    };
    match init {
        Init::Const(v) => vec![v as f32; n],
        Init::Uniform { lo, up } if lo < up => uniform(rng, lo, up),
        Init::Uniform { lo, .. } => vec![lo as f32; n],
        Init::Randn { mean, stdev } => normal(rng, mean, stdev),
        Init::Kaiming { dist, fan, non_linearity } => {
            let fan = FanInOut::for_shape(&fan, shape).max(1);
            let std = non_linearity.gain() / (fan as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(rng, -bound, bound)
                }
                NormalOrUniform::Normal => normal(rng, 0.0, std),
            }
        }
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, shape: Shape, name: &str, init: Init, dtype: DType, device: &Device) -> Result<Tensor> {
        let mut vars = self.vars.data().lock().map_err(|_| candle_core::Error::msg("VarMap lock poisoned"))?;
        if let Some(var) = vars.get(name) {
            if var.shape() != &shape {
                candle_core::bail!("shape mismatch on {name}: {shape:?} <> {:?}", var.shape())
            }
            return Ok(var.as_tensor().clone());
        }
        let values = draw(init, &shape, self.seed, name);
        let tensor = Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?;
        let var = Var::from_tensor(&tensor)?;
        let tensor = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _device: &Device) -> Result<Tensor> {
        candle_core::bail!("{name}: a training VarBuilder creates variables with a shape; use `get`")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.vars.data().lock().map(|vars| vars.contains_key(name)).unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cfm::EfficientUNet;

    fn weights(seed: u64) -> Vec<(String, Vec<f32>)> {
        let varmap = VarMap::new();
        let config = crate::cfm::test_config(false);
        EfficientUNet::new(&config, seeded_var_builder(&varmap, seed, DType::F32, &Device::Cpu)).unwrap();
        let mut all: Vec<_> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    #[test]
    fn the_same_seed_gives_the_same_weights_and_another_seed_other_weights() {
        let a = weights(7);
        assert_eq!(a, weights(7));
        let b = weights(8);
        assert_eq!(a.len(), b.len());
        let differing = a.iter().zip(&b).filter(|(x, y)| x.1 != y.1).count();
        // Norm scales and zero-initialised layers are constants; everything drawn differs.
        assert!(differing > a.len() / 2, "{differing} of {} differ", a.len());
    }

    #[test]
    fn kaiming_uniform_keeps_candles_bounds() {
        let shape = Shape::from((64, 32, 3, 3));
        let values = draw(candle_nn::init::DEFAULT_KAIMING_UNIFORM, &shape, 1, "w");
        let bound = 3f64.sqrt() * 2f64.sqrt() / ((32 * 9) as f64).sqrt();
        assert!(values.iter().all(|v| (v.abs() as f64) <= bound));
        let max = values.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        assert!(max > 0.95 * bound, "{max} vs {bound}");
    }
}
