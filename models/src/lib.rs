//! Every neural network and sampler of fmboost, on candle. Knows nothing of Redis or gRPC.
//!
//! - [`cfm`]: the paper's Coupling Flow Matching UNet, its sampler and ODE solvers.
//! - [`autoencoder`]: the kl-f8 VAE (diffusers and LDM layouts), tiled decoding.
//! - [`base`]: SD 1.5 text-to-latent (CLIP, UNet, DDIM / Euler-a / LCM).
//! - [`golden`]: checks against the reference vectors in `shared/golden`.
//! - [`train`]: the trainer (autoencoder, CFM hops, base generator).
//! - [`weights`]: safetensors/config loading with one error for all missing keys.
//! - [`tensor_file`]: one weights file, safetensors or PyTorch zip pickle, read lazily.
//! - [`rng`]: seeded noise drawn on the CPU (see "Determinism" in the architecture doc).
//! - [`init`]: seeded initial weights, so a training run (or a random benchmark network) is reproducible.
//! - [`pixels`]: 8-bit RGB photos: loading, area downsampling, crops, tensor conversion.
//! - [`eval`]: PSNR/SSIM evaluation of upscalers on photo crops.

pub mod autoencoder;
pub mod base;
pub mod cfm;
pub mod device;
pub mod eval;
pub mod golden;
pub mod init;
pub mod pixels;
pub mod progress;
pub mod rng;
pub mod tensor_file;
pub mod train;
pub mod weights;
