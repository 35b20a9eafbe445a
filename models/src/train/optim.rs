//! Adam(W) with named, saveable state; the reference's constant-with-warm-up learning rate
//! (with an optional linear cool-down); gradient clipping by global norm.
//!
//! candle-nn's `AdamW` keeps its moments private, so a run could not be resumed exactly; this
//! one exposes them by parameter name for the checkpoint.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

/// Adam hyper-parameters. `weight_decay` is decoupled (AdamW); the paper trains with 0, where
/// Adam and AdamW coincide.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    /// PyTorch's defaults (what the reference's `torch.optim.Adam` uses).
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// The learning rate per step: the reference's `get_constant_schedule_with_warmup` (rate of
/// 0-based step `k` is `lr · k / warmup` while `k < warmup`, so step 0 has rate 0, as there),
/// optionally ending in a linear cool-down to 0 over the last `cooldown_steps` of
/// `total_steps` (warm-up, stable, decay). The stable phase does not depend on the cool-down,
/// so a constant-rate run can be resumed into one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    /// 0: constant after the warm-up.
    pub cooldown_steps: u64,
}

impl LrSchedule {
    pub fn lr_at(&self, step: u64) -> f64 {
        let warm = if step < self.warmup_steps { self.lr * step as f64 / self.warmup_steps as f64 } else { self.lr };
        let decay_start = self.total_steps.saturating_sub(self.cooldown_steps);
        if self.cooldown_steps > 0 && step >= decay_start {
            // Step total−cooldown has the full rate, the last step (total−1) lr/cooldown; where
            // warm-up and decay overlap (short runs) the lower rate wins, so the rate never jumps.
            warm.min(self.lr * self.total_steps.saturating_sub(step) as f64 / self.cooldown_steps as f64)
        } else {
            warm
        }
    }
}

/// Adam(W) over named variables.
pub struct Adam {
    params: Vec<(String, Var)>,
    first: Vec<Tensor>,
    second: Vec<Tensor>,
    /// Updates made so far (the bias-correction exponent).
    t: u64,
    config: AdamConfig,
}

/// Key of a first-moment tensor in a checkpoint.
pub fn first_moment_key(name: &str) -> String {
    format!("optimizer.exp_avg.{name}")
}

/// Key of a second-moment tensor in a checkpoint.
pub fn second_moment_key(name: &str) -> String {
    format!("optimizer.exp_avg_sq.{name}")
}

impl Adam {
    pub fn new(params: Vec<(String, Var)>, config: AdamConfig) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let first = params.iter().map(|(_, v)| zeros(v)).collect::<Result<_>>()?;
        let second = params.iter().map(|(_, v)| zeros(v)).collect::<Result<_>>()?;
        Ok(Self { params, first, second, t: 0, config })
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Updates made so far.
    pub fn updates(&self) -> u64 {
        self.t
    }

    /// One update with learning rate `lr`. A parameter without a gradient is left alone (and its
    /// moments too), as PyTorch does for `grad is None`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.t += 1;
        let AdamConfig { beta1, beta2, eps, weight_decay } = self.config;
        let correct1 = 1.0 / (1.0 - beta1.powi(self.t as i32));
        let correct2 = 1.0 / (1.0 - beta2.powi(self.t as i32));
        for (i, (_, var)) in self.params.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            // Detached: the gradients carry the step's graph, and a moment that kept it would
            // chain every step's graph to the next (unbounded memory).
            let m = ((&self.first[i] * beta1)? + (g * (1.0 - beta1))?)?.detach();
            let v = ((&self.second[i] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?.detach();
            let update = ((&m * correct1)? / ((&v * correct2)?.sqrt()? + eps)?)?;
            let decayed = if weight_decay != 0.0 { (var.as_tensor() * (1.0 - lr * weight_decay))? } else { var.as_tensor().clone() };
            var.set(&(decayed - (update * lr)?)?)?;
            self.first[i] = m;
            self.second[i] = v;
        }
        Ok(())
    }

    /// The moments under [`first_moment_key`] / [`second_moment_key`].
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.push((first_moment_key(name), self.first[i].clone()));
            out.push((second_moment_key(name), self.second[i].clone()));
        }
        out
    }

    /// Restores the moments saved by [`Adam::state`] and the update count. Every parameter's
    /// moments must be present with its shape.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, updates: u64) -> Result<()> {
        for (i, (name, var)) in self.params.iter().enumerate() {
            for (key, slot) in [(first_moment_key(name), &mut self.first[i]), (second_moment_key(name), &mut self.second[i])] {
                let t = tensors.get(&key).ok_or_else(|| candle_core::Error::Msg(format!("checkpoint lacks `{key}`")))?;
                if t.dims() != var.dims() {
                    candle_core::bail!("checkpoint `{key}` has shape {:?}, the parameter {:?}", t.dims(), var.dims());
                }
                *slot = t.to_dtype(var.dtype())?.to_device(var.device())?;
            }
        }
        self.t = updates;
        Ok(())
    }
}

/// Scales every gradient of `params` by `max_norm / norm` when their global L2 norm exceeds
/// `max_norm` (PyTorch's `clip_grad_norm_`, which adds 1e-6 to the norm). Returns the norm
/// before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, params: &[(String, Var)], max_norm: f64) -> Result<f64> {
    let mut sum_sq = 0.0f64;
    for (_, var) in params {
        if let Some(g) = grads.get(var.as_tensor()) {
            sum_sq += g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        }
    }
    let norm = sum_sq.sqrt();
    if !norm.is_finite() {
        candle_core::bail!("gradient norm is {norm}: the loss diverged");
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for (_, var) in params {
            if let Some(g) = grads.remove(var.as_tensor()) {
                grads.insert(var.as_tensor(), (g * coef)?);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn warmup_is_linear_from_zero_then_constant() {
        let s = LrSchedule { lr: 1e-3, warmup_steps: 4, total_steps: 6, cooldown_steps: 0 };
        let lrs: Vec<f64> = (0..6).map(|k| s.lr_at(k)).collect();
        assert_eq!(lrs, vec![0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3]);
        assert_eq!(LrSchedule { lr: 0.1, warmup_steps: 0, total_steps: 1, cooldown_steps: 0 }.lr_at(0), 0.1);
    }

    #[test]
    fn cooldown_decays_linearly_over_the_last_steps_and_leaves_the_rest_alone() {
        let s = LrSchedule { lr: 1.0, warmup_steps: 2, total_steps: 8, cooldown_steps: 4 };
        let lrs: Vec<f64> = (0..8).map(|k| s.lr_at(k)).collect();
        assert_eq!(lrs, vec![0.0, 0.5, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25]);
        let constant = LrSchedule { cooldown_steps: 0, ..s };
        assert!((0..4).all(|k| s.lr_at(k) == constant.lr_at(k)), "the stable phase must not depend on the cool-down");
        let overlapping = LrSchedule { lr: 1.0, warmup_steps: 8, total_steps: 10, cooldown_steps: 5 };
        let lrs: Vec<f64> = (4..10).map(|k| overlapping.lr_at(k)).collect();
        // Warm-up 4/8 … 7/8 and decay 5/5 … 1/5 overlap over steps 5–7: the lower one wins.
        assert_eq!(lrs, vec![0.5, 0.625, 0.75, 0.6, 0.4, 0.2]);
    }

    #[test]
    fn first_adam_step_moves_by_lr_times_sign() {
        // After one step m̂ = g and v̂ = g², so Δθ = −lr·g/(|g| + eps) ≈ −lr·sign(g).
        let w = Var::from_slice(&[1.0f32, -2.0, 3.0], 3, &Device::Cpu).unwrap();
        let mut adam = Adam::new(vec![("w".into(), w.clone())], AdamConfig::default()).unwrap();
        let loss = (w.as_tensor() * &Tensor::new(&[2.0f32, -0.5, 0.0], &Device::Cpu).unwrap()).unwrap().sum_all().unwrap();
        adam.step(&loss.backward().unwrap(), 0.1).unwrap();
        let got: Vec<f32> = w.as_tensor().to_vec1().unwrap();
        assert!((got[0] - 0.9).abs() < 1e-6 && (got[1] + 1.9).abs() < 1e-6 && got[2] == 3.0, "{got:?}");
        assert_eq!(adam.updates(), 1);
        // The state holds no graph (else memory grows with every step).
        assert!(adam.state().iter().all(|(_, t)| !t.track_op()));
    }

    #[test]
    fn state_round_trips_and_resumes_identically() {
        let run = |resume_at: Option<usize>| -> Vec<f32> {
            let w = Var::from_slice(&[0.5f32, -1.5], 2, &Device::Cpu).unwrap();
            let mut adam = Adam::new(vec![("net.w".into(), w.clone())], AdamConfig::default()).unwrap();
            for k in 0..5 {
                if Some(k) == resume_at {
                    let saved: HashMap<String, Tensor> = adam.state().into_iter().collect();
                    let updates = adam.updates();
                    adam = Adam::new(vec![("net.w".into(), w.clone())], AdamConfig::default()).unwrap();
                    adam.load_state(&saved, updates).unwrap();
                }
                let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
                adam.step(&loss.backward().unwrap(), 0.05).unwrap();
            }
            w.as_tensor().to_vec1().unwrap()
        };
        assert_eq!(run(None), run(Some(3)));
        let w = Var::from_slice(&[0.0f32], 1, &Device::Cpu).unwrap();
        let mut adam = Adam::new(vec![("w".into(), w)], AdamConfig::default()).unwrap();
        let err = adam.load_state(&HashMap::new(), 1).unwrap_err().to_string();
        assert!(err.contains("optimizer.exp_avg.w"), "{err}");
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let a = Var::from_slice(&[0.0f32, 0.0], 2, &Device::Cpu).unwrap();
        let b = Var::from_slice(&[0.0f32], 1, &Device::Cpu).unwrap();
        let params = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
        // Gradients (3, 0) and (4): global norm 5.
        let loss = ((a.as_tensor() * &Tensor::new(&[3.0f32, 0.0], &Device::Cpu).unwrap()).unwrap().sum_all().unwrap()
            + (b.as_tensor() * 4.0).unwrap().sum_all().unwrap())
        .unwrap();
        let mut grads = loss.backward().unwrap();
        let norm = clip_grad_norm(&mut grads, &params, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        let gb: Vec<f32> = grads.get(b.as_tensor()).unwrap().to_vec1().unwrap();
        assert!((gb[0] - 0.8).abs() < 1e-5, "{gb:?}");
        // Under the limit: untouched.
        let mut grads = loss.backward().unwrap();
        clip_grad_norm(&mut grads, &params, 10.0).unwrap();
        assert_eq!(grads.get(b.as_tensor()).unwrap().to_vec1::<f32>().unwrap(), vec![4.0]);
    }
}
