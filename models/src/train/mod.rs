//! The trainer (issue D): the optimisation loop and its parts, shared by the autoencoder, the
//! CFM upsamplers and the base latent generator.
//!
//! - [`optim`]: Adam(W) with saveable state, the reference's warm-up schedule (+ optional cool-down), gradient clipping.
//! - [`ema`]: the reference's EMA (decay 0.999 with its inverse-gamma warm-up).
//! - [`checkpoint`]: resumable safetensors checkpoints with the reference's key names.
//! - [`log`]: the JSONL loss log.
//! - [`trainer`]: the loop ([`Trainer::fit`]) and the [`Objective`] trait the models implement.
//! - [`data`]: random multi-scale photo crops and precomputed latents.
//! - [`autoencoder`]: the first-stage objective (L1 + small KL) and the latent scale.
//! - [`flow`]: the CFM hop objective (the paper's) and the base generator's.
//! - [`presets`]: the tiny chain's architectures.
//! - [`export`]: trained models in the layouts the loaders read.
//! - [`nets`]: the UNet and the autoencoder behind those traits; the every-parameter-gets-a-gradient check.

pub mod autoencoder;
pub mod checkpoint;
pub mod data;
pub mod ema;
pub mod export;
pub mod flow;
pub mod log;
pub mod nets;
pub mod optim;
pub mod presets;
pub mod trainer;

pub use checkpoint::{Checkpoint, CheckpointError, Layout, AUTOENCODER_LAYOUT, UNET_LAYOUT};
pub use ema::{Ema, EmaConfig};
pub use log::LossLog;
pub use optim::{clip_grad_norm, Adam, AdamConfig, LrSchedule};
pub use trainer::{Objective, StepReport, TrainConfig, TrainError, Trainer};
pub use autoencoder::{latent_scale, AutoencoderObjective, VariationalAutoencoder};
pub use data::{LatentEncoder, LatentSet, PhotoSet, Zoom};
pub use flow::{BaseObjective, CfmHopObjective, VelocityNet};
pub use crate::init::seeded_var_builder;
pub use nets::{named_vars, parameters_without_gradient};
