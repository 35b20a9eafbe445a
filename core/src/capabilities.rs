//! What a profile's models can do: the `[capabilities]` table of its TOML.
//!
//! The coordinator loads no models, so it admits jobs by this table alone: a job it admits is
//! one the workers can run, and one they would reject is an INVALID_ARGUMENT naming the field
//! before anything is queued. The workers check the same table against the models they load
//! (`fmboost_engine`) and refuse to start when the two disagree, so they cannot drift.
//!
//! ```toml
//! [capabilities]
//! text_conditioning = false   # the base takes no prompt (tiny's is unconditional)
//! schedulers = ["euler"]      # base schedulers the profile serves
//! base_sizes = [[64, 64]]     # [width, height] px the base makes; absent: any multiple of 8
//! hops = 2                    # CFM hops the profile has ([[hops]] entries)
//! latent_channels = 4         # channels of the autoencoder's latents
//! latent_multiple = 2         # a latent entering the first hop needs sides a multiple of this
//! ```

use serde::Deserialize;

use crate::profile::JobDefaults;
use crate::spec::{JobSpec, Source, ValidationError, SCHEDULERS};

/// Pixels per latent pixel of the kl-f8 autoencoders every profile uses.
pub const LATENT_FACTOR: u32 = 8;

/// A profile's `[capabilities]` table. Every key is required except `base_sizes`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    /// The base model takes a prompt (and, with guidance > 1, a negative prompt). Without it
    /// the base is unconditional: prompts must be empty and guidance 1 (it would be ignored).
    pub text_conditioning: bool,
    /// Base schedulers the profile serves.
    pub schedulers: Vec<String>,
    /// The only base sizes, `[width, height]` in pixels; absent or empty: any multiple of
    /// 8 px (of `8 × latent_multiple` px when the job has CFM hops).
    #[serde(default)]
    pub base_sizes: Vec<[u32; 2]>,
    /// CFM hops the profile has: jobs may ask for 0 to this many.
    pub hops: u32,
    /// Channels of the latents the autoencoder makes and decodes (an uploaded latent's too).
    pub latent_channels: u32,
    /// The hop UNets halve their input a few times: a latent entering the first hop needs
    /// sides that are a multiple of this (1: any), and so an image's sides 8× this in pixels.
    pub latent_multiple: u32,
}

fn invalid(field: &str, message: String) -> ValidationError {
    ValidationError { field: field.to_string(), message }
}

impl Capabilities {
    /// The pixel multiple of an image or base size that enters the CFM hops.
    pub fn pixel_multiple(&self) -> u32 {
        LATENT_FACTOR * self.latent_multiple
    }

    /// Checks the table itself and that the profile's `[defaults]` are jobs it can run, so a
    /// client that leaves a field unset never gets an error about a value it did not send.
    pub fn check(&self, defaults: &JobDefaults) -> Result<(), String> {
        if self.schedulers.is_empty() {
            return Err("[capabilities] schedulers: must name at least one".into());
        }
        if let Some(unknown) = self.schedulers.iter().find(|s| !SCHEDULERS.contains(&s.as_str())) {
            return Err(format!("[capabilities] schedulers: unknown scheduler {unknown:?} (known: {})", SCHEDULERS.join(", ")));
        }
        if !(1..=16).contains(&self.latent_channels) {
            return Err(format!("[capabilities] latent_channels: must be in 1..=16, got {}", self.latent_channels));
        }
        if self.latent_multiple == 0 {
            return Err("[capabilities] latent_multiple: must be at least 1".into());
        }
        for &[width, height] in &self.base_sizes {
            let multiple = if self.hops > 0 { self.pixel_multiple() } else { LATENT_FACTOR };
            if width == 0 || height == 0 || !width.is_multiple_of(multiple) || !height.is_multiple_of(multiple) {
                return Err(format!(
                    "[capabilities] base_sizes: {width}x{height} px must be a positive multiple of {multiple} px (8 × latent_multiple)"
                ));
            }
        }
        let d = defaults;
        if !self.schedulers.contains(&d.scheduler) {
            return Err(format!("[defaults] scheduler {:?} is not one of [capabilities] schedulers {:?}", d.scheduler, self.schedulers));
        }
        if d.hops > self.hops {
            return Err(format!("[defaults] hops = {} but [capabilities] hops = {}", d.hops, self.hops));
        }
        if !self.text_conditioning && d.guidance != 1.0 {
            return Err(format!("[defaults] guidance = {}: an unconditional base ([capabilities] text_conditioning = false) needs 1", d.guidance));
        }
        self.check_base_size(d.width, d.height, d.hops).map_err(|e| format!("[defaults] width, height: {}", e.message))
    }

    /// Checks an admitted job (defaults filled in, bounds checked) against what the profile
    /// can run; the error names the field. `profile` names the profile in messages.
    pub fn admit(&self, profile: &str, job: &JobSpec) -> Result<(), ValidationError> {
        let hops = job.cfm.hops;
        if hops > self.hops {
            return Err(invalid("cfm.hops", format!("profile `{profile}` has {} CFM hops, not {hops}", self.hops)));
        }
        let needs_multiple = |side: usize| hops > 0 && !side.is_multiple_of(self.latent_multiple as usize);
        match &job.source {
            Source::Text { prompt, negative_prompt } => {
                let base = job.base.as_ref().expect("a text source always has base settings");
                if !self.text_conditioning {
                    let unconditional = format!("profile `{profile}` has an unconditional base model");
                    if !prompt.is_empty() {
                        return Err(invalid("source.text.prompt", format!("{unconditional}: it takes no prompt (send an empty one)")));
                    }
                    if !negative_prompt.is_empty() {
                        return Err(invalid("source.text.negative_prompt", format!("{unconditional}: it takes no negative prompt")));
                    }
                    if base.guidance != 1.0 {
                        return Err(invalid("base.guidance", format!("{unconditional}: guidance must be 1 (or unset), got {}", base.guidance)));
                    }
                } else if !negative_prompt.is_empty() && base.guidance <= 1.0 {
                    let message = format!("needs base.guidance > 1 (got {}): without guidance it has no effect", base.guidance);
                    return Err(invalid("source.text.negative_prompt", message));
                }
                if !self.schedulers.contains(&base.scheduler) {
                    let message = format!("profile `{profile}` serves {}, not {:?}", self.schedulers.join(", "), base.scheduler);
                    return Err(invalid("base.scheduler", message));
                }
                self.check_base_size(base.width, base.height, hops).map_err(|e| ValidationError {
                    message: format!("profile `{profile}`: {}", e.message),
                    ..e
                })?;
            }
            Source::Latent { shape, .. } => {
                let (channels, h, w) = (shape[1], shape[2], shape[3]);
                if channels != self.latent_channels as usize {
                    let message = format!("profile `{profile}` takes latents of {} channels, got shape {shape:?}", self.latent_channels);
                    return Err(invalid("source.latent", message));
                }
                if needs_multiple(h) || needs_multiple(w) {
                    let message = format!(
                        "shape {shape:?}: profile `{profile}`'s CFM hops need latent sides that are multiples of {}",
                        self.latent_multiple
                    );
                    return Err(invalid("source.latent", message));
                }
            }
            Source::Image { width, height } => {
                for (field, side) in [("source.image.width", *width), ("source.image.height", *height)] {
                    if needs_multiple(side as usize / LATENT_FACTOR as usize) {
                        let message = format!(
                            "{side} px: profile `{profile}`'s CFM hops need image sides that are multiples of {} px (pad the image)",
                            self.pixel_multiple()
                        );
                        return Err(invalid(field, message));
                    }
                }
            }
        }
        Ok(())
    }

    /// A base size (already a multiple of 8 px) the profile makes, for a job of `hops` hops.
    fn check_base_size(&self, width: u32, height: u32, hops: u32) -> Result<(), ValidationError> {
        if !self.base_sizes.is_empty() {
            if self.base_sizes.contains(&[width, height]) {
                return Ok(());
            }
            let sizes: Vec<String> = self.base_sizes.iter().map(|[w, h]| format!("{w}x{h}")).collect();
            let field = if self.base_sizes.iter().any(|&[w, _]| w == width) { "base.height" } else { "base.width" };
            return Err(invalid(field, format!("makes {} px base images, not {width}x{height}", sizes.join(" or "))));
        }
        let multiple = self.pixel_multiple();
        for (field, side) in [("base.width", width), ("base.height", height)] {
            if hops > 0 && !side.is_multiple_of(multiple) {
                return Err(invalid(field, format!("its CFM hops need base sides that are multiples of {multiple} px, got {side}")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "capabilities_tests.rs"]
mod tests;
