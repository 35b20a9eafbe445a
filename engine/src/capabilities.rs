//! A profile's declared `[capabilities]` (what the coordinator admits by) checked against the
//! rest of its TOML when it is parsed, and against the networks a process loads: a worker
//! whose models disagree with the table refuses to start, naming the key and the value the
//! models need, so admission and the workers cannot drift apart.

use fmboost_core::capabilities::{Capabilities, LATENT_FACTOR};
use fmboost_models::base::SchedulerKind;
use fmboost_models::cfm::UNetConfig;

use crate::profile::{BaseSpec, ProfileSpec};
use crate::stack::{BaseModel, HopModel, FLOW_SCHEDULER};

/// What the TOML says elsewhere: the number of `[[hops]]` and what the `[base]` kind can do.
pub fn check_spec(spec: &ProfileSpec) -> Result<(), String> {
    let caps = &spec.capabilities;
    if caps.hops as usize != spec.hops.len() {
        return Err(format!("[capabilities] hops = {}, but the profile has {} [[hops]] entries", caps.hops, spec.hops.len()));
    }
    match &spec.base {
        BaseSpec::Flow { latent_size: [h, w], .. } => {
            if caps.text_conditioning {
                return Err("[capabilities] text_conditioning = true, but a `flow` base is unconditional: set it to false".into());
            }
            if let Some(other) = caps.schedulers.iter().find(|s| *s != FLOW_SCHEDULER) {
                return Err(format!("[capabilities] schedulers: a `flow` base integrates with {FLOW_SCHEDULER:?} only, not {other:?}"));
            }
            let size = [*w as u32 * LATENT_FACTOR, *h as u32 * LATENT_FACTOR];
            if caps.base_sizes != [size] {
                return Err(format!(
                    "[capabilities] base_sizes = {:?}, but the `flow` base makes latent_size {:?} latents: set base_sizes = [{size:?}]",
                    caps.base_sizes,
                    [h, w]
                ));
            }
        }
        BaseSpec::StableDiffusion { .. } => {
            if !caps.text_conditioning {
                return Err("[capabilities] text_conditioning = false, but a `stable-diffusion` base takes prompts: set it to true".into());
            }
            for scheduler in &caps.schedulers {
                scheduler.parse::<SchedulerKind>().map_err(|e| format!("[capabilities] schedulers: {e}"))?;
            }
        }
    }
    Ok(())
}

/// The latent multiple the hop UNets need of a latent entering hop 1: hop `i` (1-based) runs
/// its UNet at 2^i × that size and halves it `downsamplings` times.
pub fn required_latent_multiple<'a>(hops: impl IntoIterator<Item = &'a UNetConfig>) -> u32 {
    hops.into_iter()
        .enumerate()
        .map(|(i, config)| 1u32 << config.downsamplings().saturating_sub(i + 1))
        .max()
        .unwrap_or(1)
}

/// What the loaded networks say; parts this process did not load are checked by the workers
/// that load them.
pub fn check_models(caps: &Capabilities, base: Option<&BaseModel>, latent_channels: Option<usize>, hops: &[HopModel]) -> Result<(), String> {
    let declared = caps.latent_channels as usize;
    let channels = |what: &str, got: usize| {
        if got == declared {
            Ok(())
        } else {
            Err(format!("[capabilities] latent_channels = {declared}, but {what} {got}: set latent_channels = {got}"))
        }
    };
    if let Some(got) = latent_channels {
        channels("the autoencoder's latents have", got)?;
    }
    match base {
        Some(BaseModel::Flow { unet, .. }) => channels("the flow base UNet makes", unet.config().out_channels)?,
        Some(BaseModel::StableDiffusion(sd)) => {
            channels("the Stable Diffusion UNet takes", sd.unet_config().in_channels)?;
            if sd.latent_factor() != LATENT_FACTOR as usize {
                return Err(format!("the Stable Diffusion VAE downsamples by {}, not {LATENT_FACTOR}", sd.latent_factor()));
            }
        }
        None => {}
    }
    for (i, hop) in hops.iter().enumerate() {
        let config = hop.unet.config();
        if config.out_channels != declared || config.in_channels != 2 * declared {
            return Err(format!(
                "[capabilities] latent_channels = {declared}, but hop {}'s UNet maps {} channels (cat[x_t, z_up]) to {}",
                i + 1,
                config.in_channels,
                config.out_channels
            ));
        }
    }
    if !hops.is_empty() {
        let needed = required_latent_multiple(hops.iter().map(|h| h.unet.config()));
        if needed != caps.latent_multiple {
            return Err(format!(
                "[capabilities] latent_multiple = {}, but the hop UNets need latents entering hop 1 to have sides a multiple of {needed}: \
                 set latent_multiple = {needed}",
                caps.latent_multiple
            ));
        }
    }
    Ok(())
}
