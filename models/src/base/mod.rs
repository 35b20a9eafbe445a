//! SD 1.5 text-to-latent: CLIP, UNet, schedulers (issue B).
