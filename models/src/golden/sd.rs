//! Golden checks for `sd_vae_*`, `clip_text_*`, `sd_unet_*`, `sd_loops_*` and
//! `ldm_autoencoder_*` files (issue B).

use super::{Check, GoldenError, GoldenFile, RunOptions};

/// `None` when the file is not one of the Stable Diffusion / autoencoder golden files.
pub fn checks(_file: &GoldenFile, _options: &RunOptions) -> Option<Result<Vec<Check>, GoldenError>> {
    None
}
