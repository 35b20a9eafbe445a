//! `fmboost generate` and `fmboost upscale`: the whole pipeline in this process — no Redis, no
//! network — through the executors the worker pools run, on the embedded `tiny` profile unless
//! told otherwise. Same spec and seed ⇒ the same PNG bytes as `fmboost submit`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use fmboost_core::profile::ProfileInfo;
use fmboost_core::spec::{validate, JobSpec, Limits, Upload};
use fmboost_engine::local::{LocalPipeline, LocalResult};
use fmboost_engine::picture::{crop_rgb8, encode_png, pad_to_multiple, Rgb8};
use fmboost_engine::registry::resolve_profile;
use fmboost_engine::stack::{Needs, ProfileModels};
use fmboost_models::device::parse_device;
use fmboost_proto::v1 as pb;
use indicatif::{ProgressBar, ProgressStyle};
use prost::Message;

use crate::job_args::JobSpecArgs;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    job: JobSpecArgs,
    /// Where to write the PNG.
    #[arg(long, default_value = "fmboost.png")]
    out: PathBuf,
    /// Where to write the final latent as a protobuf `fmboost.v1.Tensor`.
    #[arg(long)]
    latent_out: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(clap::Args, Debug)]
pub struct UpscaleArgs {
    /// The image to upscale (PNG or JPEG; any size, grayscale and alpha are converted).
    input: PathBuf,
    /// 2 or 4: one CFM hop per doubling.
    #[arg(long, default_value_t = 4)]
    scale: u32,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// CFM ODE solver (default: the profile's).
    #[arg(long)]
    cfm_solver: Option<String>,
    /// CFM solver steps (default: the profile's).
    #[arg(long)]
    cfm_steps: Option<u32>,
    #[arg(long, default_value = "tiny")]
    profile: String,
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// A profile's models and the limits/defaults its jobs are validated with.
struct Local {
    models: Arc<ProfileModels>,
    pipeline: LocalPipeline,
    limits: Limits,
}

impl Local {
    fn load(profile: &str, device: &str) -> anyhow::Result<Self> {
        let device = parse_device(device).map_err(|e| anyhow::anyhow!("--device: {e}"))?;
        let info = ProfileInfo::resolve(profile).map_err(|e| anyhow::anyhow!("--profile: {e}"))?;
        let (spec, files) = resolve_profile(profile).map_err(|e| anyhow::anyhow!("--profile: {e}"))?;
        let models = ProfileModels::load(spec, files, Needs::ALL, &device).map_err(|e| anyhow::anyhow!("--profile {profile}: {e}"))?;
        let limits = Limits::new(vec![info], usize::MAX);
        let models = Arc::new(models);
        Ok(Local { pipeline: LocalPipeline::new(models.clone()), models, limits })
    }

    /// Validates `spec` as the coordinator would (the profile name is what the file says).
    fn admit(&self, mut spec: pb::JobSpec) -> anyhow::Result<(JobSpec, Option<Upload>)> {
        spec.profile = self.limits.profiles[0].name.clone();
        validate(spec, &self.limits, fmboost_core::now_unix_ms()).map_err(|e| anyhow::anyhow!("invalid job: {e}"))
    }

    fn run(&self, spec: &JobSpec, upload: Option<Upload>) -> anyhow::Result<LocalResult> {
        let bar = ProgressBar::new(0);
        bar.set_style(ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {elapsed}").expect("valid template"));
        let result = self.pipeline.run(spec, upload, &mut |stage, step, total| {
            bar.set_message(stage.to_string());
            bar.set_length(total as u64);
            bar.set_position(step as u64);
            true
        });
        bar.finish_and_clear();
        result.map_err(|(stage, error)| anyhow::anyhow!("{stage}: {error}"))
    }
}

pub fn generate(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    let local = Local::load(&args.job.profile, &args.device)?;
    let (spec, upload) = local.admit(args.job.to_proto()?)?;
    let started = std::time::Instant::now();
    let result = local.run(&spec, upload)?;
    write(&args.out, &result.png, "--out")?;
    if let Some(path) = &args.latent_out {
        let tensor = result.final_latent.to_proto();
        write(path, &tensor.encode_to_vec(), "--latent-out")?;
    }
    let (width, height) = spec.output_size();
    eprintln!("wrote {} ({width}x{height} px) in {:.2} s", args.out.display(), started.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

pub fn upscale(args: UpscaleArgs) -> anyhow::Result<ExitCode> {
    let hops = match args.scale {
        2 => 1,
        4 => 2,
        other => bail!("--scale {other}: expected 2 or 4"),
    };
    let bytes = std::fs::read(&args.input).with_context(|| format!("{}", args.input.display()))?;
    let image = image::load_from_memory(&bytes)
        .with_context(|| format!("{}: not a readable PNG or JPEG image", args.input.display()))?
        .to_rgb8();
    let (width, height) = image.dimensions();
    let original = Rgb8 { width, height, data: image.into_raw() };
    let local = Local::load(&args.profile, &args.device)?;
    // The autoencoder and the hop UNets need sides of a multiple of some pixels (16 for tiny):
    // pad by repeating the border, crop the result back.
    let padded = pad_to_multiple(&original, local.models.pixel_multiple());
    let upload = encode_png(&padded, &Default::default()).context("encoding the padded input")?;
    let spec = pb::JobSpec {
        source: Some(pb::job_spec::Source::Image(pb::ImageSource { data: upload })),
        seed: args.seed,
        cfm: Some(pb::CfmSettings { hops: Some(hops), solver: args.cfm_solver.clone(), steps: args.cfm_steps }),
        decode: Some(pb::DecodeSettings::default()),
        ..Default::default()
    };
    let (spec, upload) = local.admit(spec)?;
    let result = local.run(&spec, upload)?;
    let decoded = image::load_from_memory(&result.png).context("reading back the decoded PNG")?.to_rgb8();
    let (w, h) = decoded.dimensions();
    let full = Rgb8 { width: w, height: h, data: decoded.into_raw() };
    let cropped = crop_rgb8(&full, width * args.scale, height * args.scale);
    let mut parameters = fmboost_engine::executor::generation_parameters(&spec, &local.limits.profiles[0].name);
    parameters.source = Some(format!("{} ({width}x{height} px), upscaled {}x", args.input.display(), args.scale));
    parameters.width = cropped.width;
    parameters.height = cropped.height;
    let png = encode_png(&cropped, &parameters).context("encoding the PNG")?;
    write(&args.out, &png, "--out")?;
    eprintln!("wrote {} ({}x{} px)", args.out.display(), cropped.width, cropped.height);
    Ok(ExitCode::SUCCESS)
}

fn write(path: &Path, bytes: &[u8], flag: &str) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("{flag} {}", path.display()))
}
