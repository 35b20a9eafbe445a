//! Exponential moving average of the weights, exactly as the reference trains it.
//!
//! The paper's code (`fmboost/ema.py`, adapted from lucidrains' ema-pytorch) with the settings
//! of its released config (`ema_rate: 0.999`, `ema_update_every: 1`, `ema_update_after_step:
//! 1000`, `power: 3/4`, `inv_gamma: 1`, `min_value: 0`). Per call of `update`, with `s` the
//! call count before it:
//! - `s % update_every != 0`: nothing;
//! - `s ≤ update_after_step`: the EMA copies the weights;
//! - else the EMA moves towards the weights with decay
//!   `clamp(1 − (1 + e/inv_gamma)^(−power), min_value, beta)`, `e = max(0, s + 1 − update_after_step − 1)`,
//!   and decay 0 when `e ≤ 0`: `ema ← decay·ema + (1 − decay)·w`.
//!
//! So it is not `min(0.999, (1 + s)/(10 + s))`: the decay reaches 0.9 after ~21 updates past the
//! warm-up, 0.99 after ~460, and 0.999 only after ~10 000.

use candle_core::{Result, Tensor, Var};

/// EMA settings (defaults: the paper's released config).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EmaConfig {
    pub beta: f64,
    pub update_after_step: u64,
    pub update_every: u64,
    pub inv_gamma: f64,
    pub power: f64,
    pub min_value: f64,
}

impl Default for EmaConfig {
    fn default() -> Self {
        Self { beta: 0.999, update_after_step: 1000, update_every: 1, inv_gamma: 1.0, power: 0.75, min_value: 0.0 }
    }
}

/// The averaged weights, in the order of the parameters they follow.
pub struct Ema {
    config: EmaConfig,
    /// Calls of [`Ema::update`] so far (the reference's `step` buffer).
    calls: u64,
    weights: Vec<(String, Tensor)>,
}

impl Ema {
    /// Starts as a copy of `params`.
    pub fn new(params: &[(String, Var)], config: EmaConfig) -> Result<Self> {
        let weights = params.iter().map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?.detach()))).collect::<Result<_>>()?;
        Ok(Self { config, calls: 0, weights })
    }

    pub fn config(&self) -> &EmaConfig {
        &self.config
    }

    pub fn calls(&self) -> u64 {
        self.calls
    }

    pub fn weights(&self) -> &[(String, Tensor)] {
        &self.weights
    }

    /// The decay the next averaging update uses, given the call count after increment.
    fn decay_after(&self, calls: u64) -> f64 {
        let c = &self.config;
        let epoch = calls.saturating_sub(c.update_after_step + 1) as f64;
        if epoch <= 0.0 {
            return 0.0;
        }
        (1.0 - (1.0 + epoch / c.inv_gamma).powf(-c.power)).clamp(c.min_value, c.beta)
    }

    /// One update after an optimizer step.
    pub fn update(&mut self, params: &[(String, Var)]) -> Result<()> {
        let s = self.calls;
        self.calls += 1;
        if s % self.config.update_every != 0 {
            return Ok(());
        }
        let decay = if s <= self.config.update_after_step { 0.0 } else { self.decay_after(self.calls) };
        for ((name, ema), (pname, var)) in self.weights.iter_mut().zip(params) {
            if name != pname {
                candle_core::bail!("EMA follows `{name}` but was given `{pname}`");
            }
            *ema = if decay == 0.0 {
                var.as_tensor().copy()?.detach()
            } else {
                // Detached: `var` is a variable, so the blend would otherwise record a graph
                // that chains every earlier EMA tensor (unbounded memory).
                ((&*ema * decay)? + (var.as_tensor() * (1.0 - decay))?)?.detach()
            };
        }
        Ok(())
    }

    /// Restores averaged weights and the call count from a checkpoint.
    pub fn load(&mut self, weights: Vec<(String, Tensor)>, calls: u64) -> Result<()> {
        if weights.len() != self.weights.len() {
            candle_core::bail!("EMA checkpoint has {} tensors, the model {}", weights.len(), self.weights.len());
        }
        for ((name, ema), (lname, t)) in self.weights.iter_mut().zip(weights) {
            if *name != lname || ema.dims() != t.dims() {
                candle_core::bail!("EMA checkpoint tensor `{lname}` {:?} does not match `{name}` {:?}", t.dims(), ema.dims());
            }
            *ema = t.to_dtype(ema.dtype())?.to_device(ema.device())?;
        }
        self.calls = calls;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn scalar(ema: &Ema) -> f32 {
        ema.weights()[0].1.to_vec1::<f32>().unwrap()[0]
    }

    #[test]
    fn copies_during_warm_up_then_averages_with_the_reference_decay() {
        let w = Var::from_slice(&[0.0f32], 1, &Device::Cpu).unwrap();
        let params = vec![("w".to_string(), w.clone())];
        let config = EmaConfig { update_after_step: 2, ..EmaConfig::default() };
        let mut ema = Ema::new(&params, config).unwrap();
        for k in 0..=2 {
            w.set(&Tensor::new(&[k as f32 + 1.0], &Device::Cpu).unwrap()).unwrap();
            ema.update(&params).unwrap();
            assert_eq!(scalar(&ema), k as f32 + 1.0, "call {k} copies");
        }
        // Call s = 3: calls becomes 4, e = 4 − 2 − 1 = 1, decay = 1 − 2^(−3/4).
        w.set(&Tensor::new(&[10.0f32], &Device::Cpu).unwrap()).unwrap();
        ema.update(&params).unwrap();
        let d = 1.0 - 2f64.powf(-0.75);
        let want = d * 3.0 + (1.0 - d) * 10.0;
        assert!((scalar(&ema) as f64 - want).abs() < 1e-5, "{} vs {want}", scalar(&ema));
        assert_eq!(ema.calls(), 4);
        assert!(!ema.weights()[0].1.track_op(), "the EMA must not hold a graph");
    }

    #[test]
    fn decay_saturates_at_beta() {
        let w = Var::from_slice(&[0.0f32], 1, &Device::Cpu).unwrap();
        let ema = Ema::new(&[("w".to_string(), w)], EmaConfig::default()).unwrap();
        assert_eq!(ema.decay_after(1001), 0.0);
        assert!((ema.decay_after(1002) - (1.0 - 2f64.powf(-0.75))).abs() < 1e-12);
        assert_eq!(ema.decay_after(1_000_000), 0.999);
    }

    #[test]
    fn update_every_skips_calls() {
        let w = Var::from_slice(&[1.0f32], 1, &Device::Cpu).unwrap();
        let params = vec![("w".to_string(), w.clone())];
        let mut ema = Ema::new(&params, EmaConfig { update_every: 2, ..EmaConfig::default() }).unwrap();
        w.set(&Tensor::new(&[5.0f32], &Device::Cpu).unwrap()).unwrap();
        ema.update(&params).unwrap(); // s = 0: copies
        w.set(&Tensor::new(&[7.0f32], &Device::Cpu).unwrap()).unwrap();
        ema.update(&params).unwrap(); // s = 1: skipped
        assert_eq!(scalar(&ema), 5.0);
    }
}
