//! The `sleep` profile: a stand-in executor for load tests of the routing plane (coordinator,
//! Redis, worker runtime) apart from the models. ONLY for load and fault-injection tests.
//!
//! Each step sleeps a configured time (`--profile sleep:STEP_MS`, bare `sleep` = 0 ms) instead
//! of computing; outputs are cheap deterministic functions of (seed, stage, hop, input) with the
//! real shapes: the base stage makes a `[1, 4, H/8, W/8]` latent, each CFM hop doubles the
//! latent's spatial size, the decoder makes an 8×-sized RGB PNG. Same task ⇒ same bytes, in any
//! batch, so reclaim and restart tests can compare outputs.

use std::time::Duration;

use anyhow::Context;

use crate::spec::{JobSpec, Source};
use crate::stage::{StageError, StageExecutor, StageInput, StageKind, StageOutput, StageTask};
use crate::tensor::WireTensor;

pub const PROFILE: &str = "sleep";

#[derive(Debug)]
pub struct SleepExecutor {
    kind: StageKind,
    step: Duration,
    /// Channels of the latents it makes: its profile file's `[capabilities]`, as admission reads.
    latent_channels: usize,
}

impl SleepExecutor {
    pub fn new(kind: StageKind, step: Duration) -> Self {
        let profile = crate::profile::ProfileInfo::resolve(PROFILE).expect("the embedded sleep profile is valid (tested)");
        SleepExecutor { kind, step, latent_channels: profile.capabilities.latent_channels as usize }
    }

    /// Parses `sleep` or `sleep:STEP_MS`; None for other profiles.
    pub fn parse_profile(profile: &str) -> Option<anyhow::Result<Duration>> {
        let rest = profile.strip_prefix(PROFILE)?;
        if rest.is_empty() {
            return Some(Ok(Duration::ZERO));
        }
        let ms = rest.strip_prefix(':')?;
        Some(ms.parse::<u64>().map(Duration::from_millis).with_context(|| format!("--profile {profile}: step time must be milliseconds, e.g. sleep:20")))
    }

    fn steps(&self, task: &StageTask) -> u32 {
        match (self.kind, &task.input) {
            (StageKind::Diffusion, StageInput::Text) => task.spec.base.as_ref().map_or(1, |b| b.steps),
            (StageKind::Diffusion, _) => 1,
            (StageKind::Cfm, _) => task.spec.cfm.steps,
            (StageKind::Decoder, _) => decoder_tiles(&task.spec),
        }
    }

    fn compute(&self, task: &StageTask) -> Result<StageOutput, StageError> {
        let spec = &task.spec;
        match (self.kind, &task.input) {
            (StageKind::Diffusion, StageInput::Text) => {
                let Source::Text { prompt, negative_prompt } = &spec.source else {
                    return Err(StageError::InvalidInput("text input for a job without a text source".into()));
                };
                let base = spec.base.as_ref().ok_or_else(|| StageError::InvalidInput("text source without base settings".into()))?;
                let salt = hash_bytes(&[prompt.as_bytes(), b"\0", negative_prompt.as_bytes(), b"\0", base.scheduler.as_bytes()])
                    ^ mix(base.steps as u64 ^ ((base.guidance.to_bits() as u64) << 32));
                let (h, w) = spec.base_latent_size();
                Ok(StageOutput::Latent(noise_latent(self.latent_channels, spec.seed, 0, salt, h, w)))
            }
            (StageKind::Diffusion, StageInput::Image(data)) => {
                let (h, w) = spec.base_latent_size();
                Ok(StageOutput::Latent(noise_latent(self.latent_channels, spec.seed, 0, hash_bytes(&[data]), h, w)))
            }
            (StageKind::Cfm, StageInput::Latent(input)) => {
                let (h, w) = spec.latent_size_after(task.hop - 1);
                let [_, c, ih, iw] = check_latent(input)?;
                if (ih, iw) != (h, w) {
                    return Err(StageError::InvalidInput(format!("cfm hop {} expects a {h}x{w} latent, got {ih}x{iw}", task.hop)));
                }
                let salt = hash_bytes(&[spec.cfm.solver.as_bytes()]) ^ mix(spec.cfm.steps as u64);
                let values = input.to_f32();
                let mut out = Vec::with_capacity(c * 4 * h * w);
                for ch in 0..c {
                    for y in 0..2 * h {
                        for x in 0..2 * w {
                            let index = out.len() as u64;
                            let low = values[(ch * h + y / 2) * w + x / 2];
                            out.push(0.8 * low + 0.2 * unit_noise(spec.seed, task.hop as u64, salt, index));
                        }
                    }
                }
                Ok(StageOutput::Latent(WireTensor::from_f32(vec![1, c, 2 * h, 2 * w], &out)))
            }
            (StageKind::Decoder, StageInput::Latent(input)) => {
                let (h, w) = spec.latent_size_after(spec.cfm.hops);
                let [_, c, ih, iw] = check_latent(input)?;
                if (ih, iw) != (h, w) {
                    return Err(StageError::InvalidInput(format!("decoder expects a {h}x{w} latent, got {ih}x{iw}")));
                }
                Ok(StageOutput::Image { png: latent_png(&input.to_f32(), c, h, w)? })
            }
            (kind, input) => Err(StageError::InvalidInput(format!("{kind} stage cannot take {}", input_name(input)))),
        }
    }
}

impl StageExecutor for SleepExecutor {
    fn kind(&self) -> StageKind {
        self.kind
    }

    fn profile(&self) -> &str {
        PROFILE
    }

    fn batch_key(&self, task: &StageTask) -> String {
        let spec = &task.spec;
        let (h, w) = spec.latent_size_after(task.hop.saturating_sub(1));
        format!("{h}x{w}:hop{}:steps{}:{}", task.hop, self.steps(task), input_name(&task.input))
    }

    /// Sleeps one step time per step for the whole batch (as a GPU runs a batch's steps
    /// together), reporting progress for each task, then computes the outputs.
    fn run_batch(&self, tasks: &[StageTask], progress: &mut dyn FnMut(usize, u32, u32) -> bool) -> Vec<Result<StageOutput, StageError>> {
        let totals: Vec<u32> = tasks.iter().map(|t| self.steps(t)).collect();
        let mut cancelled = vec![false; tasks.len()];
        for step in 1..=totals.iter().copied().max().unwrap_or(0) {
            if cancelled.iter().all(|&c| c) {
                break;
            }
            std::thread::sleep(self.step);
            for (index, &total) in totals.iter().enumerate() {
                if !cancelled[index] && step <= total && !progress(index, step, total) {
                    cancelled[index] = true;
                }
            }
        }
        tasks
            .iter()
            .zip(cancelled)
            .map(|(task, cancelled)| if cancelled { Err(StageError::Cancelled) } else { self.compute(task) })
            .collect()
    }
}

fn decoder_tiles(spec: &JobSpec) -> u32 {
    let (h, w) = spec.latent_size_after(spec.cfm.hops);
    if spec.decode.tile == 0 {
        return 1;
    }
    let stride = (spec.decode.tile - spec.decode.overlap) as usize;
    let along = |side: usize| (side.saturating_sub(spec.decode.overlap as usize)).div_ceil(stride).max(1) as u32;
    along(h) * along(w)
}

fn input_name(input: &StageInput) -> &'static str {
    match input {
        StageInput::Text => "text",
        StageInput::Image(_) => "image",
        StageInput::Latent(_) => "latent",
    }
}

fn check_latent(input: &WireTensor) -> Result<[usize; 4], StageError> {
    match input.shape[..] {
        [1, c, h, w] => Ok([1, c, h, w]),
        ref shape => Err(StageError::InvalidInput(format!("expected a [1, C, H, W] latent, got {shape:?}"))),
    }
}

fn noise_latent(channels: usize, seed: u64, stage_salt: u64, salt: u64, h: usize, w: usize) -> WireTensor {
    let values: Vec<f32> = (0..channels * h * w).map(|i| unit_noise(seed, stage_salt, salt, i as u64)).collect();
    WireTensor::from_f32(vec![1, channels, h, w], &values)
}

/// An RGB image 8× the latent's size; channel k of the latent (the last one when there are
/// fewer than 3) gives colour k, nearest-neighbour upsampled.
fn latent_png(values: &[f32], channels: usize, h: usize, w: usize) -> Result<Vec<u8>, StageError> {
    let (width, height) = (w * 8, h * 8);
    let mut pixels = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        for x in 0..width {
            for colour in 0..3 {
                let ch = colour.min(channels - 1);
                let v = values[(ch * h + y / 8) * w + x / 8];
                pixels.push(((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8);
            }
        }
    }
    let image = image::RgbImage::from_raw(width as u32, height as u32, pixels).expect("buffer size matches the image size");
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| StageError::Failed(format!("PNG encoding: {e}")))?;
    Ok(png)
}

/// splitmix64 finaliser: a well-mixed 64-bit hash of `x`.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn hash_bytes(parts: &[&[u8]]) -> u64 {
    parts.iter().flat_map(|p| p.iter()).fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// A deterministic value in [-1, 1) for element `index` of (seed, stage/hop, salt).
fn unit_noise(seed: u64, hop: u64, salt: u64, index: u64) -> f32 {
    let bits = mix(mix(mix(seed) ^ hop.wrapping_mul(0x9e37_79b9)) ^ salt ^ mix(index));
    ((bits >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

#[cfg(test)]
#[path = "sleep_tests.rs"]
mod tests;
