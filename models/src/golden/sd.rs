//! Golden checks for the Stable Diffusion parts and the paper's first-stage autoencoder,
//! recognised by their keys and metadata (never by file name):
//! - diffusers VAE (`*encoder.down_blocks.*` + `config`): encode mean, decode, big decode, and
//!   tiled decode of `input.z_big` (mean absolute error ≤ 2e-2);
//! - CLIP text encoder (`*text_model.*` + `config`); diffusers UNet (`*time_embedding.*` + `config`);
//! - text-to-latent loops (`ddim` / `lcm` metadata, `input.cond`): DDIM with CFG, LCM with
//!   replayed noise, and the decoded image. They carry no weights: the UNet and VAE come from
//!   sibling files in the same directory, found by their keys;
//! - LDM first stage (`ddconfig`): encode mean, decode, the pixel-space-upsampling latent.

use candle_core::{DType, Tensor};

use super::{rel_err, Check, GoldenError, GoldenFile, RunOptions};
use crate::autoencoder::{Autoencoder, AutoencoderConfig, TileConfig};
use crate::base::{self, ClipConfig, ReplayNoise, Scheduler, SchedulerConfig, SchedulerKind, TextEncoder, UNetConfig};
use crate::progress;

/// Mean-absolute-error bound for tiled decoding against the untiled reference (image in [−1, 1]).
pub const TILED_MAE_TOLERANCE: f64 = 2e-2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Vae,
    Clip,
    Unet,
    Loops,
    Ldm,
}

fn has_suffix(file: &GoldenFile, suffix: &str) -> bool {
    file.tensors.keys().any(|k| k.ends_with(suffix))
}

fn recognise(file: &GoldenFile) -> Option<Family> {
    let meta = |k: &str| file.metadata.contains_key(k);
    if meta("ddconfig") && has_suffix(file, "encoder.down.0.block.0.conv1.weight") {
        return Some(Family::Ldm);
    }
    if (meta("ddim") || meta("lcm")) && file.has("input.cond") {
        return Some(Family::Loops);
    }
    if !meta("config") {
        return None;
    }
    if has_suffix(file, "time_embedding.linear_1.weight") {
        Some(Family::Unet)
    } else if has_suffix(file, "text_model.embeddings.token_embedding.weight") {
        Some(Family::Clip)
    } else if has_suffix(file, "encoder.down_blocks.0.resnets.0.conv1.weight") && has_suffix(file, "decoder.up_blocks.0.resnets.0.conv1.weight") {
        Some(Family::Vae)
    } else {
        None
    }
}

/// `None` when the file is not one of the Stable Diffusion / autoencoder golden files.
pub fn checks(file: &GoldenFile, options: &RunOptions) -> Option<Result<Vec<Check>, GoldenError>> {
    let family = recognise(file)?;
    Some(match family {
        Family::Vae => vae_checks(file, options),
        Family::Clip => clip_checks(file, options),
        Family::Unet => unet_checks(file, options),
        Family::Loops => loop_checks(file, options),
        Family::Ldm => ldm_checks(file, options),
    })
}

/// An input tensor on the run's device, floats in the run's dtype.
fn input(file: &GoldenFile, key: &str, options: &RunOptions) -> Result<Tensor, GoldenError> {
    let t = file.tensor(key)?;
    let t = if t.dtype().is_float() { t.to_dtype(options.dtype) } else { Ok(t.clone()) };
    t.and_then(|t| t.to_device(&options.device)).map_err(|e| file.run_error(format!("{key}: {e}")))
}

fn compare(file: &GoldenFile, name: &str, ours: candle_core::Result<Tensor>, reference: &str, tolerance: f64) -> Result<Check, GoldenError> {
    let ours = ours.map_err(|e| file.run_error(format!("{name}: {e}")))?;
    let rel_err = rel_err(&ours, file.tensor(reference)?).map_err(|e| file.run_error(format!("{name}: {e}")))?;
    Ok(Check { name: name.into(), rel_err, tolerance })
}

/// The diffusers VAE of a golden file (its `config` metadata and its weights).
pub fn vae_from(file: &GoldenFile, options: &RunOptions) -> Result<Autoencoder, GoldenError> {
    let config: AutoencoderConfig = file.meta_json("config")?;
    Autoencoder::from_diffusers_tensors(&config, &file.tensors, &file.name(), options.dtype, &options.device)
        .map_err(|e| file.run_error(e.to_string()))
}

/// Tiles for tiled-decoding checks: about 60% of the shorter side, overlapping by a third,
/// so any latent of a few tiles' size exercises both directions.
pub fn golden_tiles(height: usize, width: usize) -> TileConfig {
    let tile = (height.min(width) * 3).div_ceil(5).max(2);
    TileConfig { tile, overlap: tile / 3, auto_above: 0 }
}

/// Mean absolute difference, in f64 on the CPU.
pub fn mean_abs_err(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let a = a.to_device(&candle_core::Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_device(&candle_core::Device::Cpu)?.to_dtype(DType::F64)?;
    (a - b)?.abs()?.mean_all()?.to_scalar::<f64>()
}

fn vae_checks(file: &GoldenFile, options: &RunOptions) -> Result<Vec<Check>, GoldenError> {
    let ae = vae_from(file, options)?;
    let tol = options.forward_tolerance();
    let mut out = vec![
        compare(file, "encode.latent_mean", ae.encode_unscaled(&input(file, "input.image", options)?), "output.latent_mean", tol)?,
        compare(file, "decode", ae.decode_unscaled(&input(file, "output.latent_mean", options)?), "output.decoded", tol)?,
    ];
    if file.has("input.z_big") {
        let z = input(file, "input.z_big", options)?;
        out.push(compare(file, "decode.z_big", ae.decode_unscaled(&z), "output.decoded_big", tol)?);
        let (_, _, h, w) = z.dims4().map_err(|e| file.run_error(e.to_string()))?;
        let tiles = golden_tiles(h, w);
        let scaled = (z * ae.config().scaling_factor).map_err(|e| file.run_error(e.to_string()))?;
        let tiled = ae.decode_tiled(&scaled, &tiles, &mut progress::ignore).map_err(|e| file.run_error(format!("tiled decode: {e}")))?;
        let mae = mean_abs_err(&tiled, file.tensor("output.decoded_big")?).map_err(|e| file.run_error(e.to_string()))?;
        out.push(Check {
            name: format!("tiled_decode.z_big.tile{}_overlap{}.mean_abs_err", tiles.tile, tiles.overlap),
            rel_err: mae,
            tolerance: TILED_MAE_TOLERANCE.max(tol),
        });
    }
    Ok(out)
}

fn clip_checks(file: &GoldenFile, options: &RunOptions) -> Result<Vec<Check>, GoldenError> {
    let config: ClipConfig = file.meta_json("config")?;
    let encoder = TextEncoder::build(&config, &file.tensors, &file.name(), options.dtype, &options.device)
        .map_err(|e| file.run_error(e.to_string()))?;
    let tokens = input(file, "input.tokens", options)?;
    Ok(vec![compare(file, "last_hidden_state", encoder.forward(&tokens), "output.last_hidden_state", options.forward_tolerance())?])
}

fn unet_from(file: &GoldenFile, options: &RunOptions) -> Result<candle_transformers::models::stable_diffusion::unet_2d::UNet2DConditionModel, GoldenError> {
    let config: UNetConfig = file.meta_json("config")?;
    base::unet::build_unet(&config, &file.tensors, &file.name(), options.dtype, &options.device).map_err(|e| file.run_error(e.to_string()))
}

fn unet_checks(file: &GoldenFile, options: &RunOptions) -> Result<Vec<Check>, GoldenError> {
    let unet = unet_from(file, options)?;
    let t = file.tensor("input.timestep")?;
    let t = t.flatten_all().and_then(|t| t.to_dtype(DType::F64)?.to_vec1::<f64>()).map_err(|e| file.run_error(e.to_string()))?;
    let &[t] = t.as_slice() else {
        return Err(file.run_error(format!("input.timestep holds {} values, expected one", t.len())));
    };
    let sample = input(file, "input.sample", options)?;
    let context = input(file, "input.encoder_hidden_states", options)?;
    Ok(vec![compare(file, "eps", unet.forward(&sample, t, &context), "output.eps", options.forward_tolerance())?])
}

/// The sibling golden file of `family` in `file`'s directory.
fn sibling(file: &GoldenFile, family: Family, what: &str) -> Result<GoldenFile, GoldenError> {
    let dir = file.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let entries = std::fs::read_dir(dir).map_err(|source| GoldenError::Io { path: dir.into(), source })?;
    let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "safetensors")).collect();
    paths.sort();
    for path in paths {
        if path == file.path {
            continue;
        }
        let candidate = GoldenFile::load(&path)?;
        if recognise(&candidate) == Some(family) {
            return Ok(candidate);
        }
    }
    Err(file.run_error(format!(
        "these loops carry no weights and need {what} in the same directory ({}); none found",
        dir.display()
    )))
}

/// `(steps, guidance)` from a key such as `ddim.latents_3steps_cfg7.5` (guidance 1 without `_cfg`).
fn loop_key(file: &GoldenFile, prefix: &str) -> Result<(String, usize, f64), GoldenError> {
    let key = file
        .tensors
        .keys()
        .find(|k| k.starts_with(&format!("{prefix}.latents_")))
        .ok_or_else(|| file.run_error(format!("no `{prefix}.latents_<N>steps…` tensor")))?
        .clone();
    let spec = &key[prefix.len() + ".latents_".len()..];
    let (steps, rest) = spec.split_once("steps").ok_or_else(|| file.run_error(format!("`{key}`: no step count")))?;
    let steps: usize = steps.parse().map_err(|_| file.run_error(format!("`{key}`: bad step count")))?;
    let guidance = match rest.strip_prefix("_cfg") {
        Some(g) => g.parse().map_err(|_| file.run_error(format!("`{key}`: bad guidance")))?,
        None if rest.is_empty() => 1.0,
        None => return Err(file.run_error(format!("`{key}`: unexpected suffix `{rest}`"))),
    };
    Ok((key, steps, guidance))
}

fn timestep_check(file: &GoldenFile, name: &str, scheduler: &Scheduler, key: &str) -> Result<Check, GoldenError> {
    let reference = file.tensor(key)?;
    let ours = Tensor::new(scheduler.timesteps(), &candle_core::Device::Cpu).and_then(|t| t.to_dtype(reference.dtype()));
    compare(file, name, ours, key, 0.0)
}

fn loop_checks(file: &GoldenFile, options: &RunOptions) -> Result<Vec<Check>, GoldenError> {
    let unet = unet_from(&sibling(file, Family::Unet, "a diffusers UNet golden file (`*time_embedding.*` keys and a `config`)")?, options)?;
    let latents = input(file, "input.latents", options)?;
    let cond = input(file, "input.cond", options)?;
    let uncond = input(file, "input.uncond", options)?;
    let run = |e: String| file.run_error(e);
    let tol = options.loop_tolerance();
    let mut out = Vec::new();
    let mut ddim_latents = None;

    if file.metadata.contains_key("ddim") {
        let config: SchedulerConfig = file.meta_json("ddim")?;
        let eta: serde_json::Value = file.meta_json("ddim")?;
        if eta.get("eta").and_then(|e| e.as_f64()).unwrap_or(0.0) != 0.0 {
            return Err(run("ddim: only eta = 0 is supported".into()));
        }
        let (key, steps, guidance) = loop_key(file, "ddim")?;
        let scheduler = Scheduler::new(SchedulerKind::Ddim, &config, steps).map_err(run)?;
        out.push(timestep_check(file, "ddim.timesteps", &scheduler, &format!("ddim.timesteps_{steps}"))?);
        let start = (&latents * scheduler.init_noise_sigma()).map_err(|e| run(e.to_string()))?;
        let uncond = (guidance > 1.0).then_some(&uncond);
        let result = base::denoise(&unet, start, &cond, uncond, guidance, &scheduler, &mut ReplayNoise::new(vec![]), &mut progress::ignore)
            .map_err(|e| run(format!("ddim loop: {e}")))?;
        out.push(compare(file, &format!("ddim.{steps}steps_cfg{guidance}"), Ok(result.clone()), &key, tol)?);
        ddim_latents = Some(result);
    }

    if file.metadata.contains_key("lcm") {
        let config: SchedulerConfig = file.meta_json("lcm")?;
        let raw: serde_json::Value = file.meta_json("lcm")?;
        let guidance = raw.get("guidance_scale").and_then(|g| g.as_f64()).unwrap_or(1.0);
        let (key, steps, _) = loop_key(file, "lcm")?;
        let scheduler = Scheduler::new(SchedulerKind::Lcm, &config, steps).map_err(run)?;
        out.push(timestep_check(file, "lcm.timesteps", &scheduler, &format!("lcm.timesteps_{steps}"))?);
        let draws = (0..steps.saturating_sub(1)).map(|i| input(file, &format!("lcm.step_noise_{i}"), options)).collect::<Result<Vec<_>, _>>()?;
        let start = (&latents * scheduler.init_noise_sigma()).map_err(|e| run(e.to_string()))?;
        let uncond = (guidance > 1.0).then_some(&uncond);
        let result = base::denoise(&unet, start, &cond, uncond, guidance, &scheduler, &mut ReplayNoise::new(draws), &mut progress::ignore)
            .map_err(|e| run(format!("lcm loop: {e}")))?;
        out.push(compare(file, &format!("lcm.{steps}steps_replayed_noise"), Ok(result), &key, tol)?);
    }

    if file.has("decoded.ddim_image") {
        let latents = ddim_latents.ok_or_else(|| run("decoded.ddim_image without a ddim loop".into()))?;
        let vae = vae_from(&sibling(file, Family::Vae, "a diffusers VAE golden file (`*encoder.down_blocks.*` keys and a `config`)")?, options)?;
        out.push(compare(file, "decoded.ddim_image", vae.decode(&latents), "decoded.ddim_image", tol)?);
    }
    if out.is_empty() {
        return Err(run("no ddim or lcm loop found".into()));
    }
    Ok(out)
}

fn ldm_checks(file: &GoldenFile, options: &RunOptions) -> Result<Vec<Check>, GoldenError> {
    let ae = Autoencoder::load_ldm_file(&file.path, options.dtype, &options.device).map_err(|e| file.run_error(e.to_string()))?;
    let tol = options.forward_tolerance();
    let run = |e: candle_core::Error| file.run_error(e.to_string());
    let image = input(file, "input.image", options)?;
    let mean = ae.encode_unscaled(&image).map_err(run)?;
    let decoded = ae.decode_unscaled(&input(file, "output.latent_mean", options)?).map_err(run)?;
    let mut out = vec![
        compare(file, "encode.latent_mean", Ok(mean), "output.latent_mean", tol)?,
        compare(file, "decode", Ok(decoded.clone()), "output.decoded", tol)?,
    ];
    if file.has("output.psu_latent") {
        // Pixel-space upsampling: bilinear resize of the decoded image, then encode (scaled).
        let (_, _, h, w) = file.tensor("output.psu_latent")?.dims4().map_err(run)?;
        let f = ae.config().downscale();
        let psu = decoded.upsample_bilinear2d(h * f, w * f, false).and_then(|up| ae.encode(&up));
        out.push(compare(file, "psu_latent", psu, "output.psu_latent", tol)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_tiles_fit_the_readme_latent() {
        let t = golden_tiles(40, 56);
        assert_eq!((t.tile, t.overlap), (24, 8));
        assert!(t.origins(56).len() >= 3);
    }
}
