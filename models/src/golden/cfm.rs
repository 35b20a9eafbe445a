//! Golden checks for the CFM upsampler (issue A), recognised by content, not by file name:
//!
//! - a *UNet* file holds `net.*` weights, a UNet `config`, `input.x`, `input.t`, optionally
//!   `input.context`, and `output.v` → check `forward`;
//! - a *sampler* file holds `net.*` weights, a `config`, `alpha_bar`, `input.z_lo`,
//!   `<mode>.z_up` resizes, `input.eps`, `source.x0` (with `noising_step`) and `ode.<run>`
//!   results listed in the `runs` metadata → checks `alpha_bar`, each `<mode>.z_up`,
//!   `source.x0` and every run.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use super::{rel_err, Check, GoldenError, GoldenFile, RunOptions};
use crate::cfm::{
    alpha_bar_cosine, load_unet, noise_augment, sample_hop, upsample, EfficientUNet, HopConfig, Solver, UNetConfig,
    UpsampleMode, WeightSource, DIFFUSION_STEPS,
};
use crate::progress;

/// `None` when the file is not a CFM golden file.
pub fn checks(file: &GoldenFile, options: &RunOptions) -> Option<Result<Vec<Check>, GoldenError>> {
    let has_net = file.tensors.keys().any(|k| k.starts_with("net."));
    if !has_net || !file.metadata.contains_key("config") {
        return None;
    }
    if file.has("alpha_bar") && file.has("input.z_lo") {
        Some(sampler_checks(file, options))
    } else if file.has("input.x") && file.has("input.t") && file.has("output.v") {
        Some(unet_checks(file, options))
    } else {
        Some(Err(GoldenError::NotUnderstood {
            path: file.path.clone(),
            message: "has `net.*` weights and a config, but neither the UNet inputs (input.x, input.t, output.v) \
                      nor the sampler ones (alpha_bar, input.z_lo)"
                .into(),
        }))
    }
}

fn load(file: &GoldenFile, options: &RunOptions) -> Result<EfficientUNet, GoldenError> {
    if options.device.is_cpu() && matches!(options.dtype, DType::F16 | DType::BF16) {
        return Err(file.run_error(format!(
            "{:?} runs only on CUDA: candle's CPU convolutions and matmuls have no half-precision kernels",
            options.dtype
        )));
    }
    let raw = file.metadata.get("config").expect("checked by the caller");
    let config = UNetConfig::from_json(raw).map_err(|e| file.run_error(e))?;
    let (unet, report) = load_unet(WeightSource::Tensors(&file.tensors), &config, &options.device, options.dtype)
        .map_err(|e| file.run_error(e.to_string()))?;
    if report.prefix != "net." {
        return Err(file.run_error(format!("weights were read from `{}`, expected `net.`", report.prefix)));
    }
    Ok(unet)
}

/// The tensor at `key`, on the run's device.
fn input(file: &GoldenFile, key: &str, options: &RunOptions) -> Result<Tensor, GoldenError> {
    file.tensor(key)?.to_device(&options.device).map_err(|e| file.run_error(format!("{key}: {e}")))
}

fn check(file: &GoldenFile, name: &str, ours: candle_core::Result<Tensor>, reference: &str, tolerance: f64) -> Result<Check, GoldenError> {
    let context = |e: candle_core::Error| file.run_error(format!("{name}: {e}"));
    let ours = ours.map_err(context)?;
    let rel_err = rel_err(&ours, file.tensor(reference)?).map_err(context)?;
    Ok(Check { name: name.into(), rel_err, tolerance })
}

fn unet_checks(file: &GoldenFile, options: &RunOptions) -> Result<Vec<Check>, GoldenError> {
    let unet = load(file, options)?;
    let x = input(file, "input.x", options)?;
    let t = input(file, "input.t", options)?;
    let context = if file.has("input.context") { Some(input(file, "input.context", options)?) } else { None };
    let v = unet.forward(&x, &t, context.as_ref());
    Ok(vec![check(file, "forward", v, "output.v", options.forward_tolerance())?])
}

fn sampler_checks(file: &GoldenFile, options: &RunOptions) -> Result<Vec<Check>, GoldenError> {
    let unet = load(file, options)?;
    let mut checks = Vec::new();

    let table = Tensor::from_vec(alpha_bar_cosine(), DIFFUSION_STEPS, &candle_core::Device::Cpu);
    checks.push(check(file, "alpha_bar", table, "alpha_bar", options.forward_tolerance())?);

    let z_lo = input(file, "input.z_lo", options)?;
    let (_, _, h, w) = z_lo.dims4().map_err(|e| file.run_error(format!("input.z_lo: {e}")))?;
    let mut modes: Vec<&String> = file.tensors.keys().filter(|k| k.ends_with(".z_up")).collect();
    modes.sort();
    for key in modes {
        let mode: UpsampleMode = key.trim_end_matches(".z_up").parse().map_err(|e: String| file.run_error(format!("{key}: {e}")))?;
        if mode == UpsampleMode::Psu {
            return Err(file.run_error(format!("{key}: psu needs the file's autoencoder, which this check does not load")));
        }
        let dims = file.tensor(key)?.dims();
        let target = (dims[dims.len() - 2], dims[dims.len() - 1]);
        checks.push(check(file, key, upsample(&z_lo, mode, target, None), key, options.forward_tolerance())?);
    }

    // The source and the runs use the reference trainer's `upsampling_mode` (default bilinear).
    let mode: UpsampleMode = match file.metadata.get("upsampling_mode") {
        Some(raw) => raw.trim_matches('"').parse().map_err(|e: String| file.run_error(e))?,
        None => UpsampleMode::Bilinear,
    };
    let noising_step: usize = file.meta_json("noising_step")?;
    let eps = input(file, "input.eps", options)?;
    let (_, _, th, tw) = eps.dims4().map_err(|e| file.run_error(format!("input.eps: {e}")))?;
    if th % h != 0 || tw % w != 0 || th / h != tw / w {
        return Err(file.run_error(format!("input.eps is {th}×{tw}, not an integer multiple of input.z_lo's {h}×{w}")));
    }
    let factor = th / h;
    if noising_step >= DIFFUSION_STEPS {
        return Err(file.run_error(format!("noising_step {noising_step} is outside the ᾱ table")));
    }
    let x0 = upsample(&z_lo, mode, (th, tw), None)
        .and_then(|z_up| noise_augment(&z_up, &eps, alpha_bar_cosine()[noising_step]));
    checks.push(check(file, "source.x0", x0, "source.x0", options.forward_tolerance())?);

    let runs: BTreeMap<String, (String, usize)> = file.meta_json("runs")?;
    if runs.is_empty() {
        return Err(file.run_error("metadata `runs` lists no ODE runs"));
    }
    for (name, (method, grid_points)) in runs {
        let solver: Solver = method.parse().map_err(|e: String| file.run_error(format!("run {name}: {e}")))?;
        if grid_points < 2 {
            return Err(file.run_error(format!("run {name}: a grid of {grid_points} points has no step")));
        }
        let hop = HopConfig { upsample: mode, solver, steps: grid_points - 1, noising_step, factor };
        let result = sample_hop(&unet, &hop, &z_lo, &eps, None, &mut progress::ignore)
            .map(|sample| sample.latent)
            .map_err(|e| match e {
                progress::RunError::Candle(e) => e,
                other => candle_core::Error::msg(other.to_string()),
            });
        let key = format!("ode.{name}");
        checks.push(check(file, &key, result, &key, options.loop_tolerance())?);
    }
    Ok(checks)
}
