//! The optimisation loop shared by every model: learning-rate schedule, Adam, gradient clipping,
//! EMA, checkpoints, loss log and a per-step callback (progress bar, cancellation).
//!
//! Determinism: step `k` draws all its randomness (data order, crops, noise, t) from the
//! ChaCha stream `k` of the run's `(seed, Stream::Train)` generator, so a run resumed from a
//! checkpoint at step `k` continues exactly as if it had never stopped.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{Tensor, Var};

use super::checkpoint::{self, Checkpoint, CheckpointError, Layout, Snapshot};
use super::ema::{Ema, EmaConfig};
use super::log::LossLog;
use super::optim::{clip_grad_norm, Adam, AdamConfig, LrSchedule};
use crate::progress::Flow;
use crate::rng::{rng_for, NoiseRng, Stream};

/// Settings of a run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    /// The run ends when this many optimizer steps are done (counting resumed ones).
    pub steps: u64,
    pub lr: f64,
    pub warmup_steps: u64,
    /// Linear decay of the rate to 0 over the last this many of `steps`; 0: none.
    #[serde(default)]
    pub cooldown_steps: u64,
    pub adam: AdamConfig,
    /// Global-norm gradient clipping; `None` disables it.
    pub grad_clip: Option<f64>,
    /// `None`: no EMA.
    pub ema: Option<EmaConfig>,
    pub seed: u64,
    /// Write the checkpoint every this many steps (and always at the end); 0: only at the end.
    pub checkpoint_every: u64,
}

/// What one step did (1-based `step`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    pub step: u64,
    pub total: u64,
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Seconds since this process started the loop.
    pub elapsed_s: f64,
}

/// A training objective: the loss of one step, drawing its batch and noise from `rng`.
pub trait Objective {
    fn loss(&mut self, rng: &mut NoiseRng) -> candle_core::Result<Tensor>;
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("loss log `{path}`: {source}")]
    Log { path: String, source: std::io::Error },
    #[error("step {step}: the loss is {loss}")]
    NonFinite { step: u64, loss: f64 },
    #[error("stopped after step {step} (checkpoint written)")]
    Cancelled { step: u64 },
    #[error("training config `{field}`: {message}")]
    Config { field: &'static str, message: String },
}

/// A run in progress.
pub struct Trainer {
    config: TrainConfig,
    schedule: LrSchedule,
    adam: Adam,
    ema: Option<Ema>,
    layout: Layout,
    metadata: BTreeMap<String, String>,
    step: u64,
}

impl Trainer {
    /// `metadata` must hold at least `fmboost.kind`; it goes into every checkpoint.
    pub fn new(
        params: Vec<(String, Var)>,
        config: TrainConfig,
        layout: Layout,
        metadata: BTreeMap<String, String>,
    ) -> Result<Self, TrainError> {
        let bad = |field, message: String| Err(TrainError::Config { field, message });
        if params.is_empty() {
            return bad("params", "the model has no trainable parameters".into());
        }
        if !(config.lr > 0.0 && config.lr.is_finite()) {
            return bad("lr", format!("{} must be a positive number", config.lr));
        }
        if config.cooldown_steps > config.steps {
            return bad("cooldown_steps", format!("{} must be ≤ steps ({})", config.cooldown_steps, config.steps));
        }
        if let Some(c) = config.grad_clip.filter(|c| !(*c > 0.0)) {
            return bad("grad_clip", format!("{c} must be > 0"));
        }
        if config.ema.is_some() != layout.ema_prefix.is_some() {
            return bad("ema", "this model's checkpoint layout and the EMA setting disagree".into());
        }
        if !metadata.contains_key(checkpoint::META_KIND) {
            return bad("metadata", format!("needs `{}`", checkpoint::META_KIND));
        }
        let ema = config.ema.map(|c| Ema::new(&params, c)).transpose()?;
        let adam = Adam::new(params, config.adam)?;
        let schedule = LrSchedule {
            lr: config.lr,
            warmup_steps: config.warmup_steps,
            total_steps: config.steps,
            cooldown_steps: config.cooldown_steps,
        };
        Ok(Self { config, schedule, adam, ema, layout, metadata, step: 0 })
    }

    /// Optimizer steps done.
    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn params(&self) -> &[(String, Var)] {
        self.adam.params()
    }

    /// The EMA weights, when the run keeps an EMA.
    pub fn ema(&self) -> Option<&Ema> {
        self.ema.as_ref()
    }

    /// Continues from a checkpoint of the same kind and shapes.
    pub fn resume(&mut self, ckpt: &Checkpoint) -> Result<(), TrainError> {
        let kind = self.metadata[checkpoint::META_KIND].clone();
        self.step = checkpoint::restore(ckpt, &kind, self.layout, &mut self.adam, self.ema.as_mut())?;
        Ok(())
    }

    /// Writes a checkpoint of the current state.
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        checkpoint::write(
            path,
            &Snapshot { layout: self.layout, adam: &self.adam, ema: self.ema.as_ref(), step: self.step, metadata: self.metadata.clone() },
        )
    }

    /// The generator of step `step`: its own ChaCha stream of the run's seed.
    pub fn step_rng(seed: u64, step: u64) -> NoiseRng {
        let mut rng = rng_for(seed, Stream::Train);
        rng.inner().set_stream(step);
        rng
    }

    /// One optimizer step.
    pub fn train_step(&mut self, objective: &mut dyn Objective, started: Instant) -> Result<StepReport, TrainError> {
        let mut rng = Self::step_rng(self.config.seed, self.step);
        let loss = objective.loss(&mut rng)?;
        let loss_value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        if !loss_value.is_finite() {
            return Err(TrainError::NonFinite { step: self.step + 1, loss: loss_value });
        }
        let mut grads = loss.backward()?;
        let grad_norm = match self.config.grad_clip {
            Some(max) => clip_grad_norm(&mut grads, self.adam.params(), max)?,
            None => clip_grad_norm(&mut grads, self.adam.params(), f64::INFINITY)?,
        };
        let lr = self.schedule.lr_at(self.step);
        self.adam.step(&grads, lr)?;
        if let Some(ema) = self.ema.as_mut() {
            ema.update(self.adam.params())?;
        }
        self.step += 1;
        Ok(StepReport {
            step: self.step,
            total: self.config.steps,
            loss: loss_value,
            lr,
            grad_norm,
            elapsed_s: started.elapsed().as_secs_f64(),
        })
    }

    /// Runs until `config.steps`, logging each step, checkpointing every `checkpoint_every`
    /// steps and at the end. `on_step` may stop the run: the checkpoint is written first.
    pub fn fit(
        &mut self,
        objective: &mut dyn Objective,
        checkpoint_path: Option<&Path>,
        mut log: Option<&mut LossLog>,
        on_step: &mut dyn FnMut(&StepReport) -> Flow,
    ) -> Result<(), TrainError> {
        let started = Instant::now();
        while self.step < self.config.steps {
            let report = self.train_step(objective, started)?;
            if let Some(log) = log.as_deref_mut() {
                log.record(&report).map_err(|source| TrainError::Log { path: log.path().display().to_string(), source })?;
            }
            let stop = on_step(&report) == Flow::Stop;
            let due = self.config.checkpoint_every > 0 && self.step % self.config.checkpoint_every == 0;
            if let Some(path) = checkpoint_path.filter(|_| due || stop || self.step == self.config.steps) {
                self.save(path)?;
            }
            if stop {
                return Err(TrainError::Cancelled { step: self.step });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::checkpoint::{META_KIND, UNET_LAYOUT};
    use candle_core::Device;

    /// Fits y = 3x − 1 on fresh random x each step.
    struct Line {
        w: Var,
        b: Var,
    }

    impl Objective for Line {
        fn loss(&mut self, rng: &mut NoiseRng) -> candle_core::Result<Tensor> {
            let x = rng.randn(&[16], &Device::Cpu)?;
            let y = x.affine(3.0, -1.0)?;
            let pred = x.broadcast_mul(self.w.as_tensor())?.broadcast_add(self.b.as_tensor())?;
            (pred - y)?.sqr()?.mean_all()
        }
    }

    fn setup(steps: u64) -> (Line, Trainer) {
        setup_with_cooldown(steps, 0)
    }

    fn setup_with_cooldown(steps: u64, cooldown_steps: u64) -> (Line, Trainer) {
        let w = Var::from_slice(&[0.0f32], 1, &Device::Cpu).unwrap();
        let b = Var::from_slice(&[0.0f32], 1, &Device::Cpu).unwrap();
        let params = vec![("w".to_string(), w.clone()), ("b".to_string(), b.clone())];
        let config = TrainConfig {
            steps,
            lr: 0.05,
            warmup_steps: 2,
            cooldown_steps,
            adam: AdamConfig::default(),
            grad_clip: Some(1.0),
            ema: Some(EmaConfig { update_after_step: 5, ..EmaConfig::default() }),
            seed: 9,
            checkpoint_every: 0,
        };
        let meta = BTreeMap::from([(META_KIND.to_string(), "cfm".to_string())]);
        let trainer = Trainer::new(params, config, UNET_LAYOUT, meta).unwrap();
        (Line { w, b }, trainer)
    }

    fn weights(line: &Line) -> (f32, f32) {
        (line.w.as_tensor().to_vec1::<f32>().unwrap()[0], line.b.as_tensor().to_vec1::<f32>().unwrap()[0])
    }

    #[test]
    fn loss_falls_and_runs_are_reproducible() {
        let (mut line, mut trainer) = setup(60);
        let mut losses = Vec::new();
        trainer
            .fit(&mut line, None, None, &mut |r| {
                losses.push(r.loss);
                Flow::Continue
            })
            .unwrap();
        assert_eq!(losses.len(), 60);
        let (first, last) = (losses[..5].iter().sum::<f64>(), losses[55..].iter().sum::<f64>());
        assert!(last < 0.2 * first, "{first} → {last}");
        let (mut again, mut trainer2) = setup(60);
        trainer2.fit(&mut again, None, None, &mut |_| Flow::Continue).unwrap();
        assert_eq!(weights(&line), weights(&again));
    }

    #[test]
    fn resuming_from_a_checkpoint_matches_an_uninterrupted_run() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("run.safetensors");
        let log_path = dir.path().join("loss.jsonl");
        let (mut line, mut trainer) = setup(20);
        let mut log = LossLog::open(&log_path, None).unwrap();
        let err = trainer.fit(&mut line, Some(&ckpt), Some(&mut log), &mut |r| if r.step == 8 { Flow::Stop } else { Flow::Continue });
        assert!(matches!(err, Err(TrainError::Cancelled { step: 8 })));

        let (mut resumed, mut trainer2) = setup(20);
        trainer2.resume(&checkpoint::read(&ckpt, &Device::Cpu).unwrap()).unwrap();
        assert_eq!(trainer2.step(), 8);
        let mut log = LossLog::open(&log_path, Some(trainer2.step())).unwrap();
        trainer2.fit(&mut resumed, Some(&ckpt), Some(&mut log), &mut |_| Flow::Continue).unwrap();

        let (mut straight, mut trainer3) = setup(20);
        trainer3.fit(&mut straight, None, None, &mut |_| Flow::Continue).unwrap();
        assert_eq!(weights(&resumed), weights(&straight));
        let ema = |t: &Trainer| t.ema().unwrap().weights()[0].1.to_vec1::<f32>().unwrap();
        assert_eq!(ema(&trainer2), ema(&trainer3));
        assert_eq!(std::fs::read_to_string(&log_path).unwrap().lines().count(), 20);
    }

    #[test]
    fn a_cooldown_changes_only_the_last_steps() {
        let rates = |cooldown| {
            let (mut line, mut trainer) = setup_with_cooldown(10, cooldown);
            let mut lrs = Vec::new();
            trainer
                .fit(&mut line, None, None, &mut |r| {
                    lrs.push(r.lr);
                    Flow::Continue
                })
                .unwrap();
            lrs
        };
        let (constant, cooled) = (rates(0), rates(4));
        assert_eq!(constant[..6], cooled[..6]);
        assert_eq!(cooled[6..], [4.0, 3.0, 2.0, 1.0].map(|k| 0.05 * k / 4.0));
    }

    #[test]
    fn bad_settings_name_their_field() {
        let w = Var::from_slice(&[0.0f32], 1, &Device::Cpu).unwrap();
        let (_, trainer) = setup(1);
        let mut config = trainer.config.clone();
        config.lr = -1.0;
        let meta = BTreeMap::from([(META_KIND.to_string(), "cfm".to_string())]);
        let err = Trainer::new(vec![("w".into(), w.clone())], config, UNET_LAYOUT, meta.clone()).err().unwrap();
        assert!(err.to_string().contains("`lr`"), "{err}");
        let mut config = trainer.config.clone();
        config.cooldown_steps = config.steps + 1;
        let err = Trainer::new(vec![("w".into(), w.clone())], config, UNET_LAYOUT, meta.clone()).err().unwrap();
        assert!(err.to_string().contains("`cooldown_steps`"), "{err}");
        let mut config = trainer.config.clone();
        config.ema = None;
        let err = Trainer::new(vec![("w".into(), w)], config, UNET_LAYOUT, meta).err().unwrap();
        assert!(err.to_string().contains("`ema`"), "{err}");
    }
}
