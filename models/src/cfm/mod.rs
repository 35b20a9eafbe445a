//! The paper's Coupling Flow Matching upsampler (issue A): the `EfficientUNet`, checkpoint
//! loading with the reference's key names, z_up resizing, noise augmentation, fixed-step ODE
//! solvers and the hop / chain sampler.
//!
//! The math follows the reference implementation (CompVis/fm-boosting) exactly, down to its
//! attention reshape; `golden::cfm` checks it against the shared reference vectors.

mod checkpoint;
mod config;
mod conv;
mod cost;
mod layers;
mod norm;
mod plan;
mod resample;
mod sampler;
mod silu;
mod solver;
mod unet;

pub use checkpoint::{load_unet, load_unet_file, parameter_count, parameter_shapes, LoadError, LoadReport, Mismatch, WeightSource, PREFIXES};
pub use config::{UNetConfig, NORM_GROUPS};
#[cfg(test)]
pub(crate) use config::tiny as test_config;
pub use conv::conv3x3;
pub(crate) use conv::Conv3x3;
pub use cost::flops_per_forward;
pub use layers::timestep_embedding;
pub use norm::group_norm;
pub use resample::{bilinear_resize, nearest_resize, upsample, LatentCodec, UpsampleMode};
pub use sampler::{
    alpha_bar_cosine, hop_noise, noise_augment, sample_hop, CfmChain, CfmHop, ChainSample, HopConfig, HopSample, HopStep,
    DIFFUSION_STEPS,
};
pub use solver::{integrate, time_grid, Solver};
pub use unet::EfficientUNet;
